"""The process a run lives in: its device, torchrun's process group, stop signals, exit statuses and the code's
commit. Nothing here reads or writes the files of a run."""
import os
import platform
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parent

# Exit statuses of a modelNN.py process (besides 0 and argparse's 2 for bad flags)
EXIT_BAD_INPUT = 2  # UserError or DataError: one paragraph on stderr, no file changed
EXIT_TOO_MANY_SKIPS = 3  # --max-consecutive-skips updates in a row were skipped; the last checkpoint is kept
EXIT_SEGMENT_END = 75  # --segment-minutes ran out: state saved, the same command continues (EX_TEMPFAIL)
# SIGINT/SIGTERM: 128 + the signal's number (130, 143), as a shell reports a process the signal ended


class UserError(RuntimeError):
    """Bad input (flags, paths, checkpoints): reported as one paragraph, no traceback."""


class SegmentEnd(RuntimeError):
    """--segment-minutes ran out: the run's state (ckpt.pt, or the partial test evaluation) is saved and the
    same command continues it; the process exits with EXIT_SEGMENT_END."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM during training: a checkpoint was written before raising."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


# ----------------------------------------------------------------------------- torchrun


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def torchrun_worker() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_flag: str) -> DistInfo:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python modelNN.py` runs one process."""
    if not torchrun_worker():
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_flag != "cpu"
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


def any_rank(flag: bool, dist_info: DistInfo, device) -> bool:
    """True on every process when `flag` is True on any (a collective: all must call it at the same step)."""
    if not dist_info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shutdown_distributed(agreed_exit: bool):
    """Tear the process group down. After an exit that every process reaches together (a finished run, a segment
    end), a barrier first: process 0 still writes figures and results while the others are done. After an error
    no barrier: the others may never get there. This does not end gloo's threads (see training.run_script)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if agreed_exit:
            dist.barrier()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- device and machine


def resolve_device(flag: str, dist_info: DistInfo) -> torch.device:
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    if flag.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {flag} was requested but no CUDA GPU is visible to PyTorch "
                            f"(torch {torch.__version__}). Use --device cpu or --device auto.")
        # PyTorch lets cuDNN convolutions run in TF32 by default (10-bit mantissa): evaluation is recorded as
        # "float32" (result.json's eval_precision) and compared with CPU numbers, so float32 must mean float32.
        # Training steps are unaffected in speed: they run under bf16 autocast (--amp) or opted out of it.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        if dist_info.enabled:
            return torch.device("cuda", dist_info.local_rank)
    elif flag != "cpu":
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {flag!r}")
    return torch.device(flag)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_description()}, {torch.get_num_threads()} threads)"


def cpu_description() -> str:
    """The CPU's model name and vector unit, e.g. "AMD EPYC, AVX2" or "AMD EPYC, AVX512 with native bf16"."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # the vector unit and bf16 support tell CPUs with the same model name apart (one "AMD EPYC" may have native bf16,
    # where --cpu-bf16 is faster than float32, another AVX2 only, where bf16 is emulated and slow)
    capability = torch.backends.cpu.get_cpu_capability()
    if cpu_has_native_bf16():
        capability += " with native bf16"
    return f"{cpu}, {capability}"


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16): then --cpu-bf16 is faster than
    float32; without it torch emulates bf16 and is several times slower (bench.py measures both).
    None where it cannot tell (no /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_name(amp: bool) -> str:
    return "bf16 autocast" if amp else "float32"


def training_autocast(cfg, device: torch.device) -> bool:
    """Whether training steps run under bf16 autocast: --amp on CUDA, --cpu-bf16 on CPU. Evaluation
    (validation, test bound, figures) always runs in float32."""
    return (cfg.amp and device.type == "cuda") or (cfg.cpu_bf16 and device.type == "cpu")


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A freshly built model on the device; conv models (attribute channels_last = True) go NHWC, which is faster
    on CUDA (tensor cores) and on CPU (oneDNN: model02/03's evaluation measured 1.6x faster at 1 thread)."""
    model = model.to(device)
    if getattr(model, "channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    return model


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        # "-dirty": tracked code or docs differ from HEAD. Published outputs (results/, assets/, checkpoints/)
        # and the committed state of long runs (campaign/) do not count: a second benchmark, publish or campaign
        # segment would otherwise mark itself dirty by the files of the first.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results", ":(exclude)assets", ":(exclude)checkpoints",
                                ":(exclude)campaign"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- files


# ----------------------------------------------------------------------------- signals and time limits


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def interrupt_now(signum, frame):
    """The handler outside the training steps (loading, evaluation): stop at once with one paragraph."""
    raise Interrupted(f"{signal.Signals(signum).name} received outside a training step: stopped. Files in the "
                      f"out-dir are whole (every write is atomic); run the same command again to continue from "
                      f"the last checkpoint.", signum)


class DeferredStop:
    """SIGINT/SIGTERM during the training steps are recorded, not raised: the step in progress finishes, the loop
    checkpoints and then stops (see Interrupted). A context manager; the previous handlers come back on leaving."""

    def __init__(self):
        self.received: list[int] = []

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
        return self

    def _record(self, signum, frame):
        self.received.append(signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def interrupted(self, step: int, ckpt_path: Path) -> Interrupted:
        """The exception that ends the process after the checkpoint of `step` was written."""
        signum = self.received[0] if self.received else signal.SIGTERM  # torchrun: another process got it
        return Interrupted(f"{signal.Signals(signum).name} received: stopped after step {step}, checkpoint written "
                           f"to {ckpt_path}. Run the same command again (or add --resume) to continue.", signum)


def segment_deadline(cfg, t_start: float) -> float | None:
    """The time.time() at which this invocation's --segment-minutes run out (None: no segments).
    Fault injection for tests: VAE_INJECT_SEGMENT_END=1 makes it the start, so every invocation trains to the next
    log step or evaluates one pass, then ends its segment."""
    if cfg.segment_minutes <= 0:
        return None
    return t_start if os.environ.get("VAE_INJECT_SEGMENT_END") == "1" else t_start + 60.0 * cfg.segment_minutes


def inject_nan_steps() -> tuple[int, int]:
    """Fault injection for tests: VAE_INJECT_NAN="S" makes step S's loss NaN, "S:" every step from S."""
    spec = os.environ.get("VAE_INJECT_NAN", "")
    if not spec:
        return -1, -1
    if spec.endswith(":"):
        return int(spec[:-1]), 1 << 62
    return int(spec), int(spec)
