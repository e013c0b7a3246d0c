"""The one training loop, evaluation, checkpoints and figures shared by every rung.

A rung (modelNN.py) defines its model and its config and calls `main(...)`. A model is an
nn.Module whose `forward(x, k)` returns a dict of [k, B] tensors for k importance samples per image:
    log_px_z  log p(x | z)      (float32)
    log_pz    log p(z)          (summed over all stochastic layers)
    log_qz    log q(z | x)
plus `reconstruct(x)` and `sample(n)` returning images in [0, 1] for the figures. From these the
loop forms the importance log-weights log w = log p(x|z) + log p(z) - log q(z|x) and the
objective:  iwae: L_k = E[log mean_k w]   vae: E[mean_k log w]  (k-sample ELBO).

Run layout (`--out-dir`, default runs/<run name>):
    config.json  log.jsonl (one JSON object per line, with a "type" field)  ckpt.pt (last state)
    best.pt (best validation bound)  result.json  <figure prefix>_{imgs,recs,samples}.png
"""
import argparse
import copy
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import data as data_lib
from distributions import bits_per_dim, log_mean_exp

REPO_ROOT = Path(__file__).resolve().parent
CHECKPOINT_FORMAT = 1
EXIT_SEGMENT_END = 75  # --segment-minutes ran out: state saved, the same command continues (EX_TEMPFAIL)


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


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Flags shared by every rung. A rung subclasses it with its model's fields."""
    # data
    dataset: str = "binarized-mnist"
    data_dir: str | None = None  # None: $VAE_DATA_DIR, then ./data
    image_size: int | None = None  # image folders: side S of the S x S images (None: 32, one size in the folder)
    grey: bool = False  # image folders: 1 channel (luma) instead of RGB
    # objective
    importance_samples: int = 5  # k, importance samples per image in training
    objective: str = "iwae"  # iwae: L_k bound; vae: k-sample ELBO
    kl_warmup_steps: int = 0  # weight of log p(z) - log q(z|x) ramps 0 -> 1 over these steps
    # optimisation
    epochs: int = 100
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 100  # global batch (split across torchrun processes)
    lr: float = 1e-3
    min_lr: float = 1e-4  # end of the cosine schedule
    lr_schedule: str = "cosine"  # cosine | iwae (Burda et al.: 8 stages of 3^i, lr 10^(-i/7)) | constant
    warmup_steps: int = 0  # linear lr warm-up
    adam_eps: float = 1e-4  # as in the IWAE paper
    grad_clip: float = 100.0  # clip the global gradient norm to this
    skip_threshold: float = 1e4  # skip updates whose gradient norm (before clipping) exceeds this
    max_consecutive_skips: int = 200  # stop the run after this many skipped updates in a row
    ema_decay: float = 0.0  # > 0: evaluate an exponential moving average of the weights
    amp: bool = True  # bf16 autocast of training steps on CUDA (likelihood maths stays float32)
    # bf16 autocast of training steps on CPU as well: about 2x faster on CPUs with native bf16 matrix units
    # (AVX512-BF16, AMX), much slower elsewhere; off by default so CPU runs train in float32 everywhere
    cpu_bf16: bool = False
    compile: bool = False  # torch.compile the model's forward
    # evaluation
    eval_samples: int = 5000  # S, importance samples per test image for the final L_S
    val_samples: int = 100  # importance samples per validation image during training
    val_every: int = 0  # steps between validations; 0: once per epoch
    n_test: int = 0  # test images used; 0: the whole test set
    eval_chunk: int = 0  # latent samples (k*B) per forward pass in evaluation; 0: automatic
    # run
    seed: int = 0
    out_dir: str | None = None  # None: runs/<run name>
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 100  # steps between log lines (the only host syncs of the hot path)
    checkpoint_every: int = 5000  # steps between checkpoints (and one at the end)
    max_train_minutes: float = 0.0  # > 0: stop training after this wall time, then evaluate
    # > 0: this invocation stops after about this many minutes (of training or of the test evaluation), saves
    # its state and exits 75; the same command continues bit-exactly. Cuts a long run into resumable segments.
    segment_minutes: float = 0.0
    quick: bool = False  # a real but tiny run (see quick_overrides)
    publish: bool = False  # copy figures to assets/ and result.json to results/
    resume: bool = False  # continue the run in out_dir from ckpt.pt
    wandb: bool = False  # log to Weights & Biases (offline without an API key)
    eval_only: bool = False  # evaluate --checkpoint and redraw its figures, no training
    checkpoint: str | None = None  # checkpoint for --eval-only
    figures_only: bool = False  # with --eval-only: redraw the figures only (no test-set L_S, no result.json)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown config keys for {cls.__name__}: {', '.join(unknown)}")
        return cls(**values)


# Keys that may change between a checkpoint and the run that resumes or re-evaluates it.
RUN_CONTROL_KEYS = {"data_dir", "out_dir", "device", "log_every", "checkpoint_every", "max_train_minutes",
                    "segment_minutes",
                    "publish", "resume", "wandb", "eval_only", "checkpoint", "eval_samples", "n_test",
                    "eval_chunk", "compile", "epochs", "max_steps", "figures_only",
                    "max_consecutive_skips",  # only where a run stops, never what it computes ...
                    "cpu_bf16"}  # ... except the precision of CPU steps (as device): kept in precision_history
# cpu_bf16 may change on resume because bf16 is fast only where the CPU has it natively (AVX512-BF16, AMX) and
# emulated, several times slower than float32, elsewhere; a campaign that moves between machines picks the
# fast precision of each, and the checkpoint and result.json record which steps ran in which.
# Of those, the ones --eval-only takes from the command line (the rest come from the checkpoint).
EVAL_OVERRIDE_KEYS = {"data_dir", "out_dir", "device", "eval_samples", "n_test", "eval_chunk", "publish", "seed",
                      "segment_minutes"}


def quick_overrides(cfg) -> dict:
    """--quick: a real but tiny run, about a minute on 2 CPU cores."""
    return dict(max_steps=500, n_test=1000, eval_samples=100, val_samples=10, val_every=250,
                log_every=50, checkpoint_every=250)


def add_common_args(parser: argparse.ArgumentParser, defaults: TrainConfig, datasets: list[str] | None = None):
    """The flags every rung shares; defaults come from the rung's config dataclass. `datasets`
    restricts --dataset to the sets the rung can model (default: all of data.DATASETS)."""
    d = defaults
    a = parser.add_argument
    names = list(datasets or data_lib.DATASETS)
    folders = any(data_lib.is_folder(n) for n in names)  # rungs for 8-bit images take any image folder
    a("--dataset", default=d.dataset, type=data_lib.dataset_arg(names, folders), metavar="DATASET",
      help=f"data set: {', '.join(names)}" + (", or folder:PATH, a directory of images in torchvision's "
                                              "ImageFolder layout (train/, test/, optional val/)" if folders else "")
      + f" (default {d.dataset})")
    a("--data-dir", default=None, help="data root (default: $VAE_DATA_DIR, then ./data)")
    if folders:
        a("--image-size", type=int, default=None,
          help="image folders: centre-crop and resize every image to SxS (default: 32, and the folder's images "
               "must share one size)")
        a("--grey", action="store_true", help="image folders: convert the images to one grey channel instead of RGB")
    a("--importance-samples", "-k", type=int, default=d.importance_samples,
      help=f"importance samples k per image in training (default {d.importance_samples})")
    a("--objective", default=d.objective, choices=["iwae", "vae"],
      help="iwae: importance-weighted bound L_k; vae: k-sample ELBO")
    a("--kl-warmup-steps", type=int, default=d.kl_warmup_steps, help="steps over which the KL weight ramps to 1")
    a("--epochs", type=int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    a("--max-steps", type=int, default=d.max_steps, help="training steps; overrides --epochs when > 0")
    a("--batch-size", type=int, default=d.batch_size, help=f"global batch size (default {d.batch_size})")
    a("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    a("--min-lr", type=float, default=d.min_lr, help="final learning rate of the cosine schedule")
    a("--lr-schedule", default=d.lr_schedule, choices=["cosine", "iwae", "constant"],
      help="cosine decay to --min-lr; iwae: Burda et al.'s 8 stages (3^i) with lr*10^(-i/7); constant")
    a("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warm-up steps")
    a("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm to this")
    a("--skip-threshold", type=float, default=d.skip_threshold,
      help="skip (and count) updates whose gradient norm exceeds this")
    a("--max-consecutive-skips", type=int, default=d.max_consecutive_skips,
      help="stop after this many skipped updates in a row")
    a("--ema-decay", type=float, default=d.ema_decay, help="EMA of weights for evaluation (0: off)")
    a("--no-amp", dest="amp", action="store_false", help="disable bf16 autocast of training steps on CUDA")
    a("--cpu-bf16", action="store_true",
      help="bf16 autocast of training steps on CPU too (fast only with AVX512-BF16/AMX; may change when a run "
           "resumes, recorded in precision_history); evaluation stays float32")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--eval-samples", type=int, default=d.eval_samples,
      help=f"importance samples per test image for the final bound (default {d.eval_samples})")
    a("--val-samples", type=int, default=d.val_samples, help="importance samples per validation image")
    a("--val-every", type=int, default=d.val_every, help="steps between validations (0: every epoch)")
    a("--n-test", type=int, default=d.n_test, help="test images to evaluate (0: all)")
    a("--eval-chunk", type=int, default=d.eval_chunk, help="latent samples per evaluation pass (0: auto)")
    a("--seed", type=int, default=d.seed, help="random seed")
    a("--out-dir", default=None, help="run directory (default runs/<name built from the config>)")
    a("--device", default=d.device, help="auto (CUDA if present), cpu, cuda or cuda:N")
    a("--log-every", type=int, default=d.log_every, help="steps between log lines")
    a("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    a("--max-train-minutes", type=float, default=d.max_train_minutes,
      help="stop training after this many minutes, then evaluate (0: no limit)")
    a("--segment-minutes", type=float, default=d.segment_minutes,
      help="stop this invocation after about this many minutes of training or test evaluation, save the state "
           f"and exit {EXIT_SEGMENT_END}; the same command continues exactly where it stopped (0: no limit)")
    a("--quick", action="store_true", help="a real but tiny run, about a minute on 2 CPU cores (the rung's quick settings: a few hundred steps, a test subset, few eval samples)")
    a("--publish", action="store_true", help="copy figures to assets/ and result.json to results/")
    a("--resume", action="store_true", help="continue the run in --out-dir from its ckpt.pt")
    a("--wandb", action="store_true", help="log to Weights & Biases (offline without WANDB_API_KEY)")
    a("--eval-only", action="store_true",
      help="evaluate --checkpoint and redraw its figures, no training; writes into --out-dir "
           "(default: eval_<checkpoint name>/ beside the checkpoint)")
    a("--checkpoint", default=None, help="checkpoint file for --eval-only")
    a("--figures-only", action="store_true",
      help="with --eval-only: redraw the checkpoint's seeded figures (and copy them to assets/ with --publish); "
           "skips the test-set evaluation and writes no result.json")


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Config keys given on the command line (so --eval-only can take the rest from the checkpoint)."""
    given = set()
    for token in argv:
        opt = token.split("=", 1)[0]
        action = parser._option_string_actions.get(opt)
        if action is not None:
            given.add(action.dest)
    return given


def validate_config(cfg: TrainConfig):
    checks = [
        (cfg.importance_samples >= 1, f"--importance-samples must be >= 1, got {cfg.importance_samples}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.eval_samples >= 1, f"--eval-samples must be >= 1, got {cfg.eval_samples}"),
        (cfg.val_samples >= 1, f"--val-samples must be >= 1, got {cfg.val_samples}"),
        (cfg.epochs >= 1 or cfg.max_steps >= 1, "--epochs or --max-steps must be >= 1"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.n_test >= 0, f"--n-test must be >= 0, got {cfg.n_test}"),
        (0.0 <= cfg.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}"),
        (cfg.log_every >= 1 and cfg.checkpoint_every >= 1, "--log-every and --checkpoint-every must be >= 1"),
        (cfg.segment_minutes >= 0, f"--segment-minutes must be >= 0, got {cfg.segment_minutes}"),
        (cfg.max_consecutive_skips >= 1, f"--max-consecutive-skips must be >= 1, got {cfg.max_consecutive_skips}"),
        (not (cfg.eval_only and not cfg.checkpoint), "--eval-only needs --checkpoint PATH"),
        (not (cfg.eval_only and cfg.resume), "--eval-only and --resume exclude each other"),
        (not (cfg.figures_only and not cfg.eval_only), "--figures-only needs --eval-only --checkpoint PATH"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al.: a latent unit u is active if Var_x(E_q[u | x]) > 0.01


def count_active_units(variance: torch.Tensor) -> int:
    """Burda et al.'s count: units whose posterior mean varies over the images by more than ACTIVE_UNIT_THRESHOLD."""
    return int((variance > ACTIVE_UNIT_THRESHOLD).sum())


def latent_stats_result(layers: list[dict], n_images: int, **extra) -> dict:
    """result.json's latent statistics (a rung's extra_metrics) from per-layer {"units", "kl_nats", "active_units"}."""
    return {"latent_layer_stats": layers, "active_units_total": sum(x["active_units"] for x in layers),
            "latent_units_total": sum(x["units"] for x in layers), "active_unit_threshold": ACTIVE_UNIT_THRESHOLD,
            **extra, "latent_stats_images": n_images}


# ----------------------------------------------------------------------------- schedule & objective


def get_lr(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate at `step` (pure function of the step and the config)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.lr_schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "iwae":
        # Burda et al.: stage i = 0..7 lasts 3^i epochs at lr * 10^(-i/7); here stretched to the run.
        stage_ends = np.cumsum([3 ** i for i in range(8)]) / sum(3 ** i for i in range(8))
        stage = int(np.searchsorted(stage_ends, progress, side="right"))
        return cfg.lr * 10 ** (-min(stage, 7) / 7)
    raise UserError(f"unknown lr schedule {cfg.lr_schedule!r}")


def get_kl_weight(step: int, cfg: TrainConfig) -> float:
    return 1.0 if cfg.kl_warmup_steps <= 0 else min(1.0, (step + 1) / cfg.kl_warmup_steps)


def log_weights(out: dict, kl_weight: float = 1.0) -> torch.Tensor:
    """[k, B] importance log-weights; kl_weight < 1 only during KL warm-up."""
    return out["log_px_z"] + kl_weight * (out["log_pz"] - out["log_qz"])


def bound_per_image(log_w: torch.Tensor, objective: str) -> torch.Tensor:
    """[k, B] -> [B]: L_k = log mean_k w (iwae) or the k-sample ELBO mean_k log w (vae)."""
    return log_mean_exp(log_w, dim=0) if objective == "iwae" else log_w.mean(0)


# ----------------------------------------------------------------------------- environment


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


def _torchrun_worker() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_flag: str) -> DistInfo:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python modelNN.py` runs one process."""
    if not _torchrun_worker():
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_flag != "cpu"
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


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
    # the vector unit and bf16 support tell CPUs with the same model name apart (both measured here were
    # "AMD EPYC": one where --cpu-bf16 measured faster than float32, one with AVX2 only, where it is emulated and slow)
    capability = torch.backends.cpu.get_cpu_capability()
    if cpu_has_native_bf16():
        capability += " with native bf16"
    return f"{cpu}, {capability}"


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


def _write_atomically(path: Path, write):
    """Run write(file) on a temp file in the same directory, fsync, then rename over `path`: readers, and a
    crash at any moment, see the old file or the new one, never half of one. A write that raises (a signal,
    a full disk) removes its temp file; one killed outright leaves it, see remove_stale_temp_files."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, payload: bytes):
    _write_atomically(path, lambda f: f.write(payload))


def atomic_write_json(path: Path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


_checkpoint_saves = 0  # atomic_torch_save calls so far in this process (for the fault injection below)


def _inject_kill_during_save(f):
    """Fault injection for tests: VAE_INJECT_KILL_DURING_SAVE=N SIGKILLs this process when its N-th checkpoint
    save (ckpt.pt or best.pt, in the order the run writes them) has put half of the file into its temp file."""
    global _checkpoint_saves
    _checkpoint_saves += 1
    if os.environ.get("VAE_INJECT_KILL_DURING_SAVE") == str(_checkpoint_saves):
        f.truncate(f.tell() // 2)
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_torch_save(obj, path: Path):
    def write(f):
        torch.save(obj, f)
        _inject_kill_during_save(f)

    _write_atomically(path, write)


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete the temp files (.<name>.tmp<pid>, .write-test<pid>) that killed processes left in `directory`.
    The files they were to replace are intact; the temps only take space. Those of live processes stay."""
    removed = []
    for tmp in directory.glob(".*"):
        match = re.fullmatch(r"\..+\.tmp(\d+)|\.write-test(\d+)", tmp.name)
        if match is None or not tmp.is_file():
            continue
        pid = int(match.group(1) or match.group(2))
        if pid == os.getpid() or _process_exists(pid):  # a write in progress (or a reused pid): leave it
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def atomic_copy(src: Path, dst: Path):
    atomic_write_bytes(dst, Path(src).read_bytes())


def load_checkpoint(path: Path, model_name: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); it may be truncated "
                        f"or not a checkpoint of this repo.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise UserError(f"checkpoint {path} is not a vae-mdl checkpoint (format {CHECKPOINT_FORMAT}).")
    if ckpt.get("model_name") != model_name:
        raise UserError(f"checkpoint {path} was written by {ckpt.get('model_name')}.py, not {model_name}.py; "
                        f"run it with {ckpt.get('model_name')}.py.")
    return ckpt


def config_differences(saved: dict, current: dict, ignore: set[str]) -> list[str]:
    keys = sorted((set(saved) | set(current)) - ignore)
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


class JsonlLog:
    """Append-only JSONL log (every record has a "type"), mirrored to wandb when enabled."""

    def __init__(self, path: Path | None, wandb_run=None):
        self.path, self.wandb_run = path, wandb_run

    def write(self, record_type: str, **values):
        record = {"type": record_type, "time": round(time.time(), 3), **values}
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({f"{record_type}/{k}": v for k, v in values.items()
                                    if isinstance(v, (int, float))}, step=values.get("step"))
            except Exception as e:  # a logging backend must never stop training
                print(f"warning: wandb logging failed ({_one_line(e)}); continuing without wandb", file=sys.stderr)
                self.wandb_run = None


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def init_wandb(cfg, run_name: str, out_dir: Path):
    """wandb only when asked, and never in the way: offline without an API key; when online start-up fails
    (no network, bad key: after at most init_timeout seconds) it logs offline instead, and when that fails
    too the run goes on without wandb. Either way one warning line says so."""
    try:
        import wandb
    except ImportError:
        print("warning: --wandb given but wandb is not installed; continuing without it", file=sys.stderr)
        return None
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    first_error = None
    for attempt in [mode, "offline"] if mode == "online" else [mode]:
        try:
            run = wandb.init(project="vae-mdl", name=run_name, config=asdict(cfg), dir=str(out_dir), mode=attempt,
                             resume="allow", settings=wandb.Settings(silent=True, init_timeout=30))
        except Exception as e:
            first_error = first_error or e
            continue
        if first_error is not None:
            print(f"warning: wandb could not start online ({_one_line(first_error)}); logging offline under "
                  f"{out_dir / 'wandb'} instead (upload later with `wandb sync`)", file=sys.stderr)
        return run
    print(f"warning: wandb could not start ({_one_line(first_error)}); continuing without wandb", file=sys.stderr)
    return None


# ----------------------------------------------------------------------------- evaluation


def eval_chunk_size(rung, cfg, device) -> int:
    """Latents per evaluation pass: --eval-chunk, else the rung's `cuda_eval_chunk` (2^18 unless it says otherwise) on
    CUDA and its `cpu_eval_chunk` on CPU (small passes whose activations stay in the CPU's caches: several times
    faster than 2^14 there, results/bench_cpu_eval.json)."""
    if cfg.eval_chunk > 0:
        return cfg.eval_chunk
    return rung.cuda_eval_chunk if device.type == "cuda" else rung.cpu_eval_chunk


def _device_rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_device_rng_state(device: torch.device, state: torch.Tensor):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


@torch.no_grad()
def evaluate_bound(model, split: data_lib.Split, num_samples: int, seed: int, chunk: int,
                   progress: bool = False, desc: str = "eval", *, resume: dict | None = None,
                   deadline: float | None = None, on_save=None, save_every_s: float = 60.0) -> torch.Tensor | None:
    """Per-image L_S = log mean_{s<=S} w_s for every image of `split` -> float64 [N] on the CPU.

    Images go through in batches and the S samples in chunks, each chunk folded into one forward
    pass of about `chunk` latents; a running log-sum-exp combines chunks, so S never has to fit at
    once. Seeded and RNG-neutral: the caller's random state is unchanged afterwards. On CUDA
    out-of-memory the chunk is halved and the batch retried (from the same random state).

    Resumable: `on_save(progress)` receives {"done": images finished, "ll": their [done] values, "rng": the random
    state at that point, "chunk": latents per pass} every `save_every_s` seconds, when `deadline` (a time.time()
    value) has passed -- then the function returns None; every call finishes at least one pass first, so a chain of
    calls always progresses -- and on SIGINT/SIGTERM (Interrupted) before re-raising. `resume=progress` continues
    from such a record; the result is bit-identical to an uninterrupted call.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    device = split.images.device
    n = len(split)
    results = torch.empty(n, dtype=torch.float64)
    start = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if resume is not None:  # the random stream and the pass layout continue where the record left them
            start, chunk = resume["done"], resume["chunk"]
            results[:start] = resume["ll"]
            if resume["rng"] is not None:  # None: a finished record (torchrun: kept while other processes go on)
                _set_device_rng_state(device, resume["rng"])
        bar = tqdm(total=n, initial=start, desc=desc, disable=not progress, leave=False, mininterval=1.0)
        last_save = time.time()
        boundary_rng = _device_rng_state(device)  # the random state at `start`, a pass boundary
        first = start

        def progress_record():
            return {"done": start, "ll": results[:start].clone(), "rng": boundary_rng, "chunk": chunk}

        try:
            while start < n:
                if deadline is not None and start > first and time.time() >= deadline:
                    if on_save is not None:
                        on_save(progress_record())
                    results = None
                    break
                images_per_pass = max(1, min(n - start, chunk // num_samples))
                samples_per_pass = max(1, min(num_samples, chunk // images_per_pass))
                x = split.to_float(split.images[start:start + images_per_pass])
                try:
                    log_sum = torch.full((x.shape[0],), -math.inf, device=device)
                    done = 0
                    while done < num_samples:
                        s = min(samples_per_pass, num_samples - done)
                        log_w = log_weights(model(x, s)).float()  # [s, B]
                        log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_w, dim=0))
                        done += s
                except torch.cuda.OutOfMemoryError:
                    if chunk <= 1:
                        raise
                    chunk //= 2
                    torch.cuda.empty_cache()
                    _set_device_rng_state(device, boundary_rng)
                    continue
                results[start:start + x.shape[0]] = (log_sum - math.log(num_samples)).double().cpu()
                start += x.shape[0]
                boundary_rng = _device_rng_state(device)
                bar.update(x.shape[0])
                if on_save is not None and time.time() - last_save >= save_every_s and start < n:
                    on_save(progress_record())
                    last_save = time.time()
        except Interrupted:
            if on_save is not None:
                on_save(progress_record())
            raise
        finally:
            bar.close()
    model.train(was_training)
    return results


def gather_per_image(values: torch.Tensor, dist_info: DistInfo, device) -> torch.Tensor:
    """Per-image results of all ranks (ranks may hold different counts), in the order of the split `shard` cut."""
    if not dist_info.enabled:
        return values
    count = torch.tensor([values.numel()], device=device)
    counts = [torch.zeros_like(count) for _ in range(dist_info.world_size)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros(longest, dtype=torch.float64, device=device)
    padded[:values.numel()] = values.to(device)
    parts = [torch.zeros_like(padded) for _ in range(dist_info.world_size)]
    dist.all_gather(parts, padded)
    return in_split_order(torch.cat([p[:int(c.item())] for p, c in zip(parts, counts)]).cpu(), dist_info.world_size)


def in_split_order(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """Per-image values gathered from `shard`ed splits (process 0's images, then process 1's, ...) back in the
    split's own order: process r holds images r, r + world_size, r + 2 * world_size, ..."""
    if world_size == 1:
        return values
    n = values.numel()
    held = torch.cat([torch.arange(n)[rank::world_size] for rank in range(world_size)])  # [n] image index per value
    ordered = torch.empty_like(values)
    ordered[held] = values
    return ordered


def shard(split: data_lib.Split, dist_info: DistInfo) -> data_lib.Split:
    if not dist_info.enabled:
        return split
    return data_lib.Split(split.images[dist_info.rank::dist_info.world_size], split.binary,
                          split.dynamic_binarize)


def summarize(ll: torch.Tensor, num_dims: int, binary: bool) -> dict:
    mean = ll.mean().item()
    stderr = (ll.std(unbiased=True) / math.sqrt(ll.numel())).item() if ll.numel() > 1 else float("nan")
    return {"ll_nats": mean, "ll_stderr": stderr, "bpd": None if binary else bits_per_dim(mean, num_dims)}


# ----------------------------------------------------------------------------- figures


@torch.no_grad()
def save_figures(model, test: data_lib.Split, out_dir: Path, prefix: str, seed: int) -> list[Path]:
    """8x8 grids: test images, reconstructions and prior samples, as the model defines them."""
    from torchvision.utils import make_grid
    from PIL import Image

    was_training = model.training
    model.eval()
    device = test.images.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        x = test.to_float(test.images[:64])
        grids = {"imgs": x, "recs": model.reconstruct(x), "samples": model.sample(64)}
        if hasattr(model, "extra_figure_grids"):  # optional: {kind: images [64, C, H, W]}, kind without "_"
            grids.update(model.extra_figure_grids(x))
    model.train(was_training)
    paths = []
    for kind, images in grids.items():
        grid = make_grid(images.float().clamp(0, 1).cpu(), nrow=8, padding=2, pad_value=1.0)
        array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # [H, W, C]
        if array.shape[2] == 1:
            array = array[:, :, 0]
        path = out_dir / f"{prefix}_{kind}.png"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- the step


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A freshly built model on the device; conv models (attribute channels_last = True) go NHWC, which is faster
    on CUDA (tensor cores) and on CPU (oneDNN: model02/03's evaluation measured 1.6x faster at 1 thread)."""
    model = model.to(device)
    if getattr(model, "channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(params: list, cfg) -> torch.optim.Optimizer:
    # Fused Adam applies an update only when `found_inf` is 0: the skip decision stays on the device.
    return torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), eps=cfg.adam_eps, fused=True)


class StepMeters:
    """Device-side running sums of the hot loop; the host reads them only at log intervals."""

    def __init__(self, device):
        zero = torch.zeros((), device=device)
        self.loss_sum, self.taken, self.skipped = zero.clone(), zero.clone(), zero.clone()
        self.consecutive_skips, self.grad_norm_max = zero.clone(), zero.clone()

    def update(self, loss: torch.Tensor, grad_norm: torch.Tensor, skip: torch.Tensor):
        taken = 1.0 - skip
        self.loss_sum += torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * taken
        self.taken += taken
        self.skipped += skip
        self.consecutive_skips = (self.consecutive_skips + 1.0) * skip
        self.grad_norm_max = torch.maximum(self.grad_norm_max, torch.nan_to_num(grad_norm, nan=0.0) * taken)

    def reset_interval(self):
        """After a log line: the interval sums restart (consecutive_skips runs on)."""
        for t in (self.loss_sum, self.taken, self.skipped, self.grad_norm_max):
            t.zero_()


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


def train_step(train_model, optimizer: torch.optim.Optimizer, params: list, x: torch.Tensor, cfg, step: int,
               total_steps: int, meters: StepMeters, amp: bool, ema: tuple | None = None,
               world_size: int = 1, poison: bool = False) -> float:
    """One update of the shared loop, with no host synchronisation (nothing reads a device value).

    x: this process's [B_local, C, H, W] batch. The update is skipped on the device when the loss or
    the gradient norm is non-finite or the norm exceeds cfg.skip_threshold: fused Adam takes the skip
    flag as its `found_inf`. Under torchrun the loss is averaged over the processes first, so every
    process takes the same decision (the gradients are already averaged by DDP). `ema`: (ema_model,
    model) or None. `poison`: make the loss NaN (fault injection for tests). Returns the learning rate.
    """
    lr = get_lr(step, cfg, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = train_model(x, cfg.importance_samples)  # dict of [k, B_local]
    kl_weight = get_kl_weight(step, cfg)
    bound = bound_per_image(log_weights(out, kl_weight), cfg.objective)
    loss = -bound.mean()
    free_bits = getattr(cfg, "free_bits", 0.0)  # optional, per stochastic layer (Kingma et al. 2016)
    if free_bits > 0 and "kl_per_layer" in out:
        # the ELBO's KL term of a layer whose batch-mean KL is below free_bits becomes the constant free_bits
        kl = out["kl_per_layer"].float().mean(dim=1)  # [L, B] -> [L]
        loss = loss + kl_weight * (kl.clamp_min(free_bits) - kl).sum()
    if poison:
        loss = loss * float("nan")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    loss = loss.detach()
    if world_size > 1:  # the global-batch loss (NaN/inf anywhere reaches every process)
        dist.all_reduce(loss)
        loss = loss / world_size
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    skip = (~torch.isfinite(loss) | ~torch.isfinite(grad_norm) | (grad_norm > cfg.skip_threshold)).float()
    optimizer.grad_scale, optimizer.found_inf = None, skip  # the GradScaler protocol of fused Adam
    optimizer.step()
    del optimizer.grad_scale, optimizer.found_inf
    if ema is not None:  # the EMA moves only on taken steps
        ema_model, model = ema
        weight = (1.0 - cfg.ema_decay) * (1.0 - skip)
        for p_ema, p in zip(ema_model.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), weight)
    meters.update(loss, grad_norm.detach(), skip)
    return lr


def _any_rank(flag: bool, dist_info: DistInfo, device) -> bool:
    """True on every process when `flag` is True on any (a collective: all must call it at the same step)."""
    if not dist_info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------- the run


@dataclass
class Rung:
    """What a modelNN.py script hands to `main`."""
    name: str  # "model01"
    config_class: type
    build_model: callable  # (cfg, DatasetInfo) -> nn.Module
    likelihood: callable  # (cfg, DatasetInfo) -> str, recorded in result.json
    figure_prefix: callable = None  # (cfg) -> str, default: the model name
    run_suffix: callable = None  # (cfg) -> str appended to the run name
    latent_layers: callable = None  # (cfg) -> int
    quick: callable = quick_overrides  # (cfg) -> dict of overrides for --quick
    extra_metrics: callable = None  # (model, test Split, cfg) -> dict of extra result.json entries
    # (model, train Split, cfg) -> None: initialisation that needs the training data (e.g. an output bias at the
    # data's mean), run once on the fresh model before the EMA copy; a resumed run then loads its own weights
    init_from_data: callable = None
    # latents per evaluation pass when --eval-chunk is 0: on CUDA as many as memory allows, on CPU passes small
    # enough for the caches (bench.py --phases eval measures both defaults)
    cuda_eval_chunk: int = 1 << 18
    cpu_eval_chunk: int = 1024


def dataset_name(cfg) -> str:
    """The data set's name in run names, result files and assets (an image folder's is built from its name)."""
    return data_lib.dataset_info(cfg.dataset, cfg.image_size, cfg.grey).name


def load_data(cfg, device) -> data_lib.Data:
    return data_lib.load_data(cfg.dataset, cfg.data_dir, device, image_size=cfg.image_size, grey=cfg.grey)


def check_dataset_identity(ckpt: dict, info: data_lib.DatasetInfo, path):
    """An image-folder checkpoint belongs to the folder content it was trained on (content_sha256)."""
    trained_on = ckpt.get("dataset_sha256")
    if trained_on and trained_on != info.content_sha256:
        raise UserError(f"checkpoint {path} was trained on an image folder with content sha256 {trained_on[:16]}..., "
                        f"but {info.folder} has {str(info.content_sha256)[:16]}...: another set of images. Point "
                        f"--data-dir at the folder it was trained on.")


def run_name(rung: Rung, cfg) -> str:
    name = f"{rung.name}_{dataset_name(cfg)}_{cfg.objective}_k{cfg.importance_samples}"
    if rung.run_suffix is not None:
        name += rung.run_suffix(cfg)
    name += f"_seed{cfg.seed}"
    return name + ("_quick" if cfg.quick else "")


def main(rung: Rung, parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse flags, then train + evaluate (or --eval-only). Returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)  # bad flags: argparse prints usage and exits 2
    # Distribution argument checks cost a host sync each and would turn a NaN into an exception;
    # inputs come from data.py, and non-finite values must reach the skip logic of the loop instead.
    torch.distributions.Distribution.set_default_validate_args(False)
    # SIGINT/SIGTERM outside the training steps (loading, evaluation) stop at once with a message; the
    # training loop defers them to the end of the step in progress (see train).
    previous_handlers = {sig: signal.signal(sig, _interrupt_now) for sig in (signal.SIGINT, signal.SIGTERM)}
    agreed_exit = False  # an exit every torchrun process reaches together (see _shutdown_distributed)
    try:
        cfg = rung.config_class.from_dict(vars(args))
        if cfg.quick:
            cfg = dataclasses.replace(cfg, **{k: v for k, v in rung.quick(cfg).items()
                                              if k not in explicit_flags(parser, argv)})
        validate_config(cfg)
        if cfg.eval_only:
            code = evaluate_checkpoint(rung, cfg, explicit_flags(parser, argv), argv)
        else:
            code = train(rung, cfg, argv)
        agreed_exit = code == 0
        return code
    except (UserError, data_lib.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SegmentEnd as e:  # every process ends the segment at the same step (_any_rank)
        agreed_exit = True
        print(str(e), file=sys.stderr)
        return EXIT_SEGMENT_END
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        _shutdown_distributed(agreed_exit)
        _release_out_dir_lock()


def _shutdown_distributed(agreed_exit: bool):
    """Tear the process group down. After an exit that every process reaches together (a finished run, a segment
    end), a barrier first: process 0 still writes figures and results while the others are done. After an error
    no barrier: the others may never get there. This does not end gloo's threads (see run_script)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if agreed_exit:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_script(rung: Rung, parser: argparse.ArgumentParser):
    """`if __name__ == "__main__"` of every modelNN.py: run `main` and leave with its status.

    A torchrun worker leaves through os._exit, after main has written its files, torn its process group down and
    released the out-dir lock, and after stdout/stderr are flushed, so it never runs interpreter shutdown.
    Why: once DistributedDataParallel has been built on the group, destroy_process_group does not end gloo's
    threads (gloo_tcp_loop and two pt_gloo_runloop stay alive even after gc.collect(), torch 2.14), and one of
    them may still be releasing the last collective's tensors while Python finalizes. It then needs the GIL, the
    finalizing interpreter ends the thread, and the process dies with "terminate called without an active
    exception" (SIGABRT) after its work is done, and torchrun reports a failed run (pytorch/pytorch#179291 has
    the same mechanism for a group never destroyed). A 2-process script that builds DDP, trains a few steps,
    all-reduces, barriers, destroys the group and returns aborted in 2 of 20 runs on a loaded 2-core machine, and
    the test suite's torchrun runs now and then. Nothing that needs interpreter shutdown is lost: result files
    are written atomically and closed, the JSONL log is opened per record, and wandb is finished in train.
    A plain `python modelNN.py` (one process, no group) exits as usual."""
    if not _torchrun_worker():
        sys.exit(main(rung, parser))
    try:
        status = main(rung, parser)
    except SystemExit as e:  # argparse's exit 2 on bad flags, after its usage message
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:  # a bug: main already tore the group down (finally); show the traceback, exit 1
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _interrupt_now(signum, frame):
    raise Interrupted(f"{signal.Signals(signum).name} received outside a training step: stopped. Files in the "
                      f"out-dir are whole (every write is atomic); run the same command again to continue from "
                      f"the last checkpoint.", signum)


_out_dir_lock_fd: int | None = None  # the descriptor holding this run's out-dir lock, released when main returns


def _lock_out_dir(path: Path):
    """Exclusive lock on the out-dir itself for as long as this run lasts: a second process on the same out-dir (a
    campaign started twice, the same command in two shells) would interleave its writes of ckpt.pt, log.jsonl and
    test_eval.pt with ours, so it stops at once instead. flock on the directory: no lock file to commit or clean
    up, and the kernel drops the lock when the holder dies. (No fcntl on Windows: no lock there.)"""
    global _out_dir_lock_fd
    try:
        import fcntl
    except ImportError:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"out-dir {path} is in use by another running process (it holds a lock on the folder); "
                        f"two runs writing one out-dir would corrupt its checkpoint. Wait for it, stop it, or "
                        f"choose another --out-dir.") from None
    _out_dir_lock_fd = fd


def _release_out_dir_lock():
    global _out_dir_lock_fd
    if _out_dir_lock_fd is not None:
        os.close(_out_dir_lock_fd)  # closing the descriptor releases the flock
        _out_dir_lock_fd = None


def _prepare_out_dir(path: Path, dist_info: DistInfo, device):
    """Create and probe the out-dir and lock it (process 0 does, for all). A collective under torchrun: every process
    stops with the same error when process 0 cannot have the out-dir, instead of the others going on alone into
    their first collective and aborting there."""
    error = None
    if dist_info.is_main:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            _lock_out_dir(path)
        except OSError as e:
            error = UserError(f"out-dir {path} is not writable ({e.strerror}); choose another with --out-dir.")
        except UserError as e:
            error = e
    if _any_rank(error is not None, dist_info, device):
        raise error or UserError(f"process 0 could not take out-dir {path} (see its message); stopping with it.")


def _result_record(rung, cfg, name, info, summary, n_test, extra, device, wall_time_s, argv, commit) -> dict:
    return {
        "model": rung.name,
        "run_name": name,
        "dataset": info.name,
        **({"dataset_folder": info.folder, "dataset_sha256": info.content_sha256} if info.folder else {}),
        "likelihood": rung.likelihood(cfg, info),
        "latent_layers": rung.latent_layers(cfg) if rung.latent_layers else 1,
        "importance_samples": cfg.importance_samples,
        "objective": cfg.objective,
        "eval_samples": cfg.eval_samples,
        "n_test": n_test,
        "test_ll_nats": summary["ll_nats"],
        "test_ll_stderr": summary["ll_stderr"],
        "test_bpd": summary["bpd"],
        "eval_precision": "float32",
        **extra,
        "wall_time_s": round(wall_time_s, 1),
        "device": device_name(device),
        "device_type": device.type,
        "command": " ".join(["python", f"{rung.name}.py", *argv]),
        "git_commit": commit,
        "seed": cfg.seed,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "quick": cfg.quick,
        "config": asdict(cfg),
    }


PUBLISHED_CHECKPOINT_MAX_BYTES = 8 * 2 ** 20  # weights-only checkpoints up to this size are kept in git


def weights_only_checkpoint(ckpt: dict) -> dict:
    """The evaluated weights (the EMA when there is one) with the config and training summary: all that
    --eval-only needs, without optimizer, batcher or RNG state."""
    keep = ("format", "model_name", "run_name", "config", "dataset_sha256", "git_commit", "step", "epochs", "n_skipped",
            "best_val_bound_nats", "best_step", "train_time_s", "precision_history", "stopped_by_time_limit")
    weights = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    return {**{k: ckpt.get(k) for k in keep}, "model": weights, "ema": None, "weights_only": True}


def _publish_figures(cfg, figures: list[Path]):
    assets = REPO_ROOT / "assets"
    assets.mkdir(exist_ok=True)
    for fig in figures:  # model01_imgs.png -> assets/model01_binarized-mnist_imgs.png
        prefix, kind = fig.stem.rsplit("_", 1)
        atomic_copy(fig, assets / f"{prefix}_{dataset_name(cfg)}_{kind}.png")


def _publish_checkpoint(source: Path, name: str, model_name: str):
    """checkpoints/<run name>.pt: the weights behind a published number, so that its figures (and the number)
    can be regenerated from git alone. Larger ones stay in the run directory (the README says where)."""
    buffer = io.BytesIO()
    torch.save(weights_only_checkpoint(load_checkpoint(source, model_name)), buffer)
    target = REPO_ROOT / "checkpoints" / f"{name}.pt"
    if buffer.tell() > PUBLISHED_CHECKPOINT_MAX_BYTES:
        if target.exists():  # a stale checkpoint must never pass for this result's weights
            target.unlink()
        print(f"note: the weights-only checkpoint is {buffer.tell() / 2 ** 20:.1f} MB, over the "
              f"{PUBLISHED_CHECKPOINT_MAX_BYTES // 2 ** 20} MB kept in checkpoints/; keep {source} to regenerate "
              f"this result's figures")
        return
    target.parent.mkdir(exist_ok=True)
    atomic_write_bytes(target, buffer.getvalue())
    print(f"published {target.relative_to(REPO_ROOT)} ({buffer.tell() / 2 ** 20:.1f} MB, weights only)")


# Facts of the training run that an --eval-only re-evaluation of an older weights-only checkpoint cannot know
TRAINING_SUMMARY_KEYS = ("val_samples", "n_val", "stopped_by_time_limit", "world_size", "train_precision",
                         "train_precision_history")


def carry_run_totals(record: dict, old: dict) -> list[str]:
    """A published checkpoint holds the run's best weights (validation-selected), so re-scoring it sees the step of
    those weights, not how long the run trained: when the checkpoint is that run's best (its step is the old result's
    best_step, before the end of the run), the run's totals (steps, epochs, train_time_s) stay the old result's.
    Returns the keys it carried."""
    best, steps = old.get("best_step"), old.get("steps")
    if best is None or steps is None or record.get("steps") != best or steps <= best:
        return []
    keys = [k for k in ("steps", "epochs", "train_time_s") if old.get(k) is not None]
    record.update({k: old[k] for k in keys})
    return keys


def publish_result(result_path: Path, published: Path):
    """Copy result.json to results/. A re-evaluation (--eval-only) of the run that `published` already holds keeps
    that run's training facts the checkpoint lacks (named in training_summary_from_previous_result) and the numbers
    it replaces, in previous_results, so an S=100 row re-scored at S=5000 keeps its history."""
    record = json.loads(result_path.read_text())
    if record.get("evaluated_checkpoint") and published.exists():
        try:
            old = json.loads(published.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("run_name") == record.get("run_name"):
            copied = [k for k in TRAINING_SUMMARY_KEYS if record.get(k) is None and old.get(k) is not None]
            record.update({k: old[k] for k in copied})
            copied += carry_run_totals(record, old)
            if copied:
                record["training_summary_from_previous_result"] = copied
            keep = ("eval_samples", "n_test", "test_ll_nats", "test_ll_stderr", "test_bpd", "device", "command",
                    "git_commit", "date")
            record["previous_results"] = [*old.get("previous_results", []), {k: old.get(k) for k in keep}]
    # results/per_image/<run name>.npy, named relative to results/; a result without per-image values (evaluated
    # before they were kept) leaves no stale file behind
    per_image = published.parent / "per_image" / f"{published.stem}.npy"
    if record.get("test_ll_per_image"):
        per_image.parent.mkdir(exist_ok=True)
        atomic_copy(result_path.parent / record["test_ll_per_image"], per_image)
        record["test_ll_per_image"] = per_image.relative_to(published.parent).as_posix()
    else:
        per_image.unlink(missing_ok=True)
    atomic_write_json(published, record)


def _publish(rung, cfg, out_dir: Path, result_path: Path, figures: list[Path], name: str,
             checkpoint_path: Path | None = None):
    results = REPO_ROOT / "results"
    results.mkdir(exist_ok=True)
    _publish_figures(cfg, figures)
    published = results / f"{name}.json"
    publish_result(result_path, published)
    print(f"published {published.relative_to(REPO_ROOT)} and {len(figures)} figures in assets/")
    if checkpoint_path is not None:
        _publish_checkpoint(checkpoint_path, name, rung.name)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's state (names and values, layout-independent): ties a partial evaluation to its weights."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_eval_state(path: Path, identity: dict) -> dict | None:
    """The partial test evaluation in `path` when there is one for exactly these weights and settings."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["identity"]
    except Exception as e:
        raise UserError(f"partial test evaluation {path} is unreadable ({type(e).__name__}); delete it to start the "
                        f"test evaluation over.") from None
    diffs = config_differences(saved, identity, set())
    if diffs:
        raise UserError(f"partial test evaluation {path} belongs to other weights or settings ({'; '.join(diffs)}). "
                        f"Use the flags it was started with, or delete it to start the test evaluation over.")
    return state


# Every test image's L_S (float64 nats, test-set order) beside result.json: two rows scored on the same images
# compare with a paired standard error (compare.py's paired blocks): 0.029 nats for the two model01 rows,
# whose own standard errors are 0.22 and 0.23.
PER_IMAGE_FILE = "test_ll_nats.npy"


def save_per_image(ll: torch.Tensor, path: Path) -> dict:
    """Write the per-image test log-likelihoods as .npy; returns the result.json fields that name them."""
    buffer = io.BytesIO()
    np.save(buffer, ll.detach().cpu().double().numpy())
    atomic_write_bytes(path, buffer.getvalue())
    return {"test_ll_per_image": path.name, "test_ll_per_image_sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}


def _final_evaluation(rung, cfg, model, data, dist_info, device, out_dir, name, argv, extra, t_start, commit,
                      checkpoint_path: Path | None = None, deadline: float | None = None):
    """Test-set L_S (the only use of the test set), figures, result.json, optional publish (of the result,
    the figures and a weights-only copy of `checkpoint_path`).

    The evaluation keeps its progress in test_eval.pt (one file per process under torchrun), saved every minute,
    at `deadline` and on SIGINT/SIGTERM, so that a long L_5000 survives interruption: the same command continues
    it bit-exactly (SegmentEnd at the deadline). The file is removed once result.json is written."""
    test = data.test if cfg.n_test == 0 else data.test.subset(cfg.n_test)
    local_test = shard(test, dist_info)
    state_path = out_dir / (f"test_eval.rank{dist_info.rank}.pt" if dist_info.enabled else "test_eval.pt")
    identity = {"weights_sha256": weights_fingerprint(model), "eval_samples": cfg.eval_samples, "seed": cfg.seed + 1,
                "n_test": len(test), "world_size": dist_info.world_size,
                "eval_chunk": eval_chunk_size(rung, cfg, device), "device_type": device.type}
    state = _load_eval_state(state_path, identity)
    eval_time_prev, segments = (state["eval_time_s"], state["segments"]) if state is not None else (0.0, 0)
    # Where each invocation ran: a long evaluation may span sessions on different machines (same device type).
    # A state saved before this record existed started on a device not written down (None).
    done_before = state["progress"]["done"] if state is not None else 0
    segment_log = (state.get("segment_log") or [{"from_image": 0, "device": None, "git_commit": None}]
                   if state is not None else [])
    segment_log = [*segment_log, {"from_image": done_before, "device": device_name(device), "git_commit": git_commit()}]
    if state is not None:  # wall time so far: what the earlier invocations had when they saved
        t_start = time.time() - state["wall_time_s"]
        if dist_info.is_main:
            print(f"resuming the test evaluation in {state_path}: {state['progress']['done']}/{len(local_test)} "
                  f"images done")
    t_eval = time.time()

    def save_state(progress):
        atomic_torch_save({"identity": identity, "progress": progress, "segments": segments + 1,
                           "segment_log": segment_log, "eval_time_s": eval_time_prev + time.time() - t_eval,
                           "wall_time_s": time.time() - t_start}, state_path)

    ll = evaluate_bound(model, local_test, cfg.eval_samples, seed=cfg.seed + 1, chunk=identity["eval_chunk"],
                        progress=dist_info.is_main, desc="test L_S",
                        resume=state["progress"] if state is not None else None, deadline=deadline, on_save=save_state)
    if _any_rank(ll is None, dist_info, device):  # the segment ended before every process was done
        if ll is not None:  # this one is: keep its values for the next invocation
            save_state({"done": len(local_test), "ll": ll, "rng": None, "chunk": identity["eval_chunk"]})
        raise SegmentEnd(f"--segment-minutes {cfg.segment_minutes:g}: the segment ended during the test evaluation "
                         f"(L_{cfg.eval_samples}); its progress is in {state_path}. Run the same command again to "
                         f"continue it.")
    ll = gather_per_image(ll, dist_info, device)
    eval_time = eval_time_prev + time.time() - t_eval
    if not dist_info.is_main:
        state_path.unlink(missing_ok=True)
        return None
    summary = summarize(ll, data.info.num_dims, data.info.binary)
    per_image = save_per_image(ll, out_dir / PER_IMAGE_FILE)
    prefix = rung.figure_prefix(cfg) if rung.figure_prefix else rung.name
    figures = save_figures(model, test, out_dir, prefix, seed=cfg.seed)
    if rung.extra_metrics is not None:  # the rung's own analysis of the same test images
        extra = {**extra, **rung.extra_metrics(model, test, cfg)}
    result = _result_record(rung, cfg, name, data.info, summary, len(test),
                            {**extra, "eval_time_s": round(eval_time, 1), "eval_segments": segments + 1,
                             # [{from_image, device, git_commit}] per invocation (process 0's images under torchrun)
                             "eval_segment_log": segment_log,
                             "eval_chunk": identity["eval_chunk"], "figure_prefix": prefix, **per_image}, device,
                            time.time() - t_start, argv, commit)
    result_path = out_dir / "result.json"
    atomic_write_json(result_path, result)
    state_path.unlink(missing_ok=True)
    bpd = f", {summary['bpd']:.4f} bits/dim" if summary["bpd"] is not None else ""
    print(f"test L_{cfg.eval_samples} on {len(test)} images: {summary['ll_nats']:.2f} "
          f"± {summary['ll_stderr']:.2f} nats{bpd}  ({out_dir / 'result.json'})")
    if cfg.publish:
        _publish(rung, cfg, out_dir, result_path, figures, name, checkpoint_path)
    return result


def evaluate_checkpoint(rung: Rung, cfg, given: set[str], argv) -> int:
    """--eval-only: rebuild the model from the checkpoint's own config, evaluate, redraw figures."""
    t_start = time.time()
    ckpt = load_checkpoint(Path(cfg.checkpoint), rung.name)
    saved = ckpt["config"]
    try:
        base = rung.config_class.from_dict(saved)
    except (UserError, TypeError) as e:
        raise UserError(f"checkpoint {cfg.checkpoint} has a config this {rung.name}.py cannot read: {e}") from None
    overrides = {k: getattr(cfg, k) for k in EVAL_OVERRIDE_KEYS if k in given}
    # publish and figures_only always come from this command line (a dict merge: --publish is also an override)
    cfg = dataclasses.replace(base, **{**overrides, "eval_only": True, "checkpoint": cfg.checkpoint, "resume": False,
                                       "wandb": False, "publish": cfg.publish, "figures_only": cfg.figures_only})
    dist_info = init_distributed(cfg.device)
    device = resolve_device(cfg.device, dist_info)
    # Default: a folder beside the checkpoint, so the training run's own result.json is never replaced.
    checkpoint = Path(cfg.checkpoint).resolve()
    out_dir = Path(cfg.out_dir) if "out_dir" in given else checkpoint.parent / f"eval_{checkpoint.stem}"
    _prepare_out_dir(out_dir, dist_info, device)
    data = load_data(cfg, device)
    check_dataset_identity(ckpt, data.info, cfg.checkpoint)
    model = prepare_model(rung.build_model(cfg, data.info), device)
    weights = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"checkpoint {cfg.checkpoint} does not fit {rung.name}'s model built from its own "
                        f"config: {str(e).splitlines()[0]}") from None
    if cfg.figures_only:  # the run's seeded figures, redrawn from its weights; no test L_S, result.json untouched
        if dist_info.is_main:
            test = data.test if cfg.n_test == 0 else data.test.subset(cfg.n_test)
            prefix = rung.figure_prefix(cfg) if rung.figure_prefix else rung.name
            figures = save_figures(model, test, out_dir, prefix, seed=cfg.seed)
            if cfg.publish:
                _publish_figures(cfg, figures)
            print(f"redrew {len(figures)} figures of {cfg.checkpoint} in {out_dir}"
                  + (" and copied them to assets/" if cfg.publish else ""))
        return 0
    name = ckpt.get("run_name", run_name(rung, cfg))
    extra = {k: ckpt.get(k) for k in ("steps", "epochs", "n_skipped", "best_val_bound_nats", "best_step",
                                      "train_time_s", "stopped_by_time_limit")}
    extra["steps"] = ckpt.get("step")
    extra["val_samples"] = saved.get("val_samples")
    _final_evaluation(rung, cfg, model, data, dist_info, device, out_dir, name, argv,
                      {**extra, "evaluated_checkpoint": str(cfg.checkpoint), "train_git_commit": ckpt.get("git_commit")},
                      t_start, git_commit(), checkpoint_path=Path(cfg.checkpoint),
                      deadline=segment_deadline(cfg, t_start))
    return 0


def segment_deadline(cfg, t_start: float) -> float | None:
    """The time.time() at which this invocation's --segment-minutes run out (None: no segments).
    Fault injection for tests: VAE_INJECT_SEGMENT_END=1 makes it the start, so every invocation trains to the next
    log step or evaluates one pass, then ends its segment."""
    if cfg.segment_minutes <= 0:
        return None
    return t_start if os.environ.get("VAE_INJECT_SEGMENT_END") == "1" else t_start + 60.0 * cfg.segment_minutes


def _inject_nan_steps() -> tuple[int, int]:
    """Fault injection for tests: VAE_INJECT_NAN="S" makes step S's loss NaN, "S:" every step from S."""
    spec = os.environ.get("VAE_INJECT_NAN", "")
    if not spec:
        return -1, -1
    if spec.endswith(":"):
        return int(spec[:-1]), 1 << 62
    return int(spec), int(spec)


def train(rung: Rung, cfg, argv) -> int:
    t_start = time.time()
    deadline = segment_deadline(cfg, t_start)
    dist_info = init_distributed(cfg.device)
    device = resolve_device(cfg.device, dist_info)
    name = run_name(rung, cfg)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else REPO_ROOT / "runs" / name
    cfg = dataclasses.replace(cfg, out_dir=str(out_dir))
    _prepare_out_dir(out_dir, dist_info, device)
    ckpt_path, best_path, result_path = out_dir / "ckpt.pt", out_dir / "best.pt", out_dir / "result.json"

    # Resume rules: an unfinished run in out_dir continues (with or without --resume); a finished one
    # (result.json) is never overwritten without --resume; --resume with nothing to resume is an error.
    # All checks come before anything is written.
    resume_state = None
    if result_path.exists() and not cfg.resume:
        raise UserError(f"out-dir {out_dir} holds a finished run (result.json). Use --eval-only --checkpoint "
                        f"{best_path} to re-evaluate it, or choose a new --out-dir.")
    if ckpt_path.exists():
        resume_state = load_checkpoint(ckpt_path, rung.name)
        if resume_state.get("optimizer") is None:
            raise UserError(f"checkpoint {ckpt_path} holds no optimizer state (a best.pt or weights-only copy?), "
                            f"so training cannot continue from it; evaluate it with --eval-only --checkpoint, or "
                            f"choose a new --out-dir.")
        # a key that an older checkpoint lacks was added later with its default (e.g. cpu_bf16)
        saved_config = {**asdict(type(cfg)()), **resume_state["config"]}
        diffs = config_differences(saved_config, asdict(cfg), RUN_CONTROL_KEYS)
        if diffs:
            raise UserError(f"checkpoint {ckpt_path} comes from a different config ({'; '.join(diffs)}). "
                            f"Use the same flags to resume, or a new --out-dir.")
    elif cfg.resume:
        raise UserError(f"--resume: nothing to resume, {ckpt_path} does not exist.")

    torch.manual_seed(cfg.seed)  # every process builds the same initial weights (and EMA copy)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    data = load_data(cfg, device)
    if resume_state is not None:
        check_dataset_identity(resume_state, data.info, ckpt_path)
    model = prepare_model(rung.build_model(cfg, data.info), device)
    if rung.init_from_data is not None:
        with torch.no_grad():
            rung.init_from_data(model, data.train, cfg)
    ema_model = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    if dist_info.rank > 0:  # then each process draws its own reparameterisation noise
        torch.manual_seed(cfg.seed + dist_info.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    try:  # the Batcher checks the global batch against the data and the number of processes
        batcher = data_lib.Batcher(data.train, cfg.batch_size, seed=cfg.seed, rank=dist_info.rank,
                                   world_size=dist_info.world_size)
    except ValueError as e:
        raise UserError(f"--batch-size: {e}.") from None
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * batcher.steps_per_epoch
    val_every = cfg.val_every if cfg.val_every > 0 else batcher.steps_per_epoch

    amp = training_autocast(cfg, device)
    if amp and device.type == "cpu" and cpu_has_native_bf16() is False and dist_info.is_main:
        print("warning: --cpu-bf16 on a CPU without AVX512-BF16/AMX: bf16 is emulated here and usually several "
              "times slower than float32 (python bench.py --device cpu --phases train measures both)", file=sys.stderr)
    # [[first step, precision], ...]: the training precision from each step on (cpu_bf16 may change on resume)
    precision_history = [[0, precision_name(amp)]]
    step, n_skipped, best_val, best_step, train_time_prev = 0, 0, -math.inf, -1, 0.0
    time_limited = False  # --max-train-minutes ended training (then a resumed run goes straight to the test set)
    commit = git_commit()  # the code that trains these weights; a resumed run keeps its first commit
    if dist_info.is_main:
        for tmp in remove_stale_temp_files(out_dir):
            print(f"removed {tmp}, left by an interrupted write")
    if resume_state is not None:
        commit = resume_state.get("git_commit", commit)
        try:
            model.load_state_dict(resume_state["model"])
            if ema_model is not None:
                ema_model.load_state_dict(resume_state["ema"])
            optimizer.load_state_dict(resume_state["optimizer"])
            batcher.load_state_dict(resume_state["batcher"])
            set_rng_state(resume_state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # e.g. the model's code changed since
            raise UserError(f"checkpoint {ckpt_path} does not fit this {rung.name}.py ({_one_line(e)[:300]}); "
                            f"resume with the code that wrote it (commit {commit}), or choose a new --out-dir.") from None
        step, n_skipped = resume_state["step"], resume_state["n_skipped"]
        if dist_info.rank > 0:  # the checkpoint holds process 0's RNG state: draw distinct noise elsewhere
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, dist_info.rank, step]).generate_state(1)[0]))
        best_val, best_step = resume_state["best_val_bound_nats"], resume_state["best_step"]
        time_limited = resume_state.get("stopped_by_time_limit", False)
        # older checkpoints lack the history: they trained in what their config gives on this device type
        precision_history = resume_state.get("precision_history") or [
            [0, precision_name(training_autocast(type(cfg).from_dict(saved_config), device))]]
        if precision_history[-1][1] != precision_name(amp) and step < total_steps and not time_limited:
            precision_history = [*precision_history, [step, precision_name(amp)]]
            if dist_info.is_main:
                print(f"training precision changes at step {step}: {precision_history[-2][1]} -> "
                      f"{precision_history[-1][1]} (--cpu-bf16 {'on' if cfg.cpu_bf16 else 'off'})")
        train_time_prev = resume_state["train_time_s"]
        # wall time of the earlier invocations (older checkpoints lack it: their training time stands in)
        t_start -= resume_state.get("wall_time_s", train_time_prev)
        if dist_info.is_main:
            print(f"resuming {out_dir} at step {step}/{total_steps}")
    elif dist_info.is_main:
        atomic_write_json(out_dir / "config.json", {"model": rung.name, "run_name": name, **asdict(cfg)})

    train_model = model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # compile the DDP-wrapped model: torch.compile splits its graph at DDP's buckets
        train_model = torch.compile(train_model)
    eval_model = ema_model if ema_model is not None else model

    wandb_run = init_wandb(cfg, name, out_dir) if cfg.wandb and dist_info.is_main else None
    log = JsonlLog(out_dir / "log.jsonl" if dist_info.is_main else None, wandb_run)
    if dist_info.is_main and resume_state is None:
        log.write("config", step=0, model=rung.name, run_name=name, device=device_name(device),
                  command=" ".join(["python", f"{rung.name}.py", *argv]), git_commit=commit, config=asdict(cfg))
    elif dist_info.is_main:  # records after this one replace those of later steps written before the stop
        log.write("resume", step=step, command=" ".join(["python", f"{rung.name}.py", *argv]),
                  git_commit=git_commit(), train_precision=precision_name(amp), device=device_name(device))

    def checkpoint_state():
        return {"format": CHECKPOINT_FORMAT, "model_name": rung.name, "run_name": name, "config": asdict(cfg),
                "git_commit": commit, "dataset_sha256": data.info.content_sha256,
                "model": model.state_dict(), "ema": ema_model.state_dict() if ema_model is not None else None,
                "optimizer": optimizer.state_dict(), "batcher": batcher.state_dict(), "rng": rng_state(),
                "step": step, "epochs": step / batcher.steps_per_epoch,
                "n_skipped": n_skipped + int(meters.skipped.item()),
                "consecutive_skips": int(meters.consecutive_skips.item()), "last_finite_metrics": last_finite,
                "best_val_bound_nats": best_val, "best_step": best_step, "stopped_by_time_limit": time_limited,
                "precision_history": precision_history,
                "train_time_s": train_time_prev + (time.time() - t_train), "wall_time_s": time.time() - t_start}

    saved_step = resume_state["step"] if resume_state is not None else None

    def save_checkpoint():
        nonlocal saved_step
        if dist_info.is_main:
            atomic_torch_save(checkpoint_state(), ckpt_path)
        saved_step = step

    def validate_and_keep_best():
        """The validation bound L_{val_samples} (EMA weights if any); a new best is saved as best.pt."""
        nonlocal best_val, best_step
        val_ll = gather_per_image(evaluate_bound(eval_model, shard(data.val, dist_info), cfg.val_samples,
                                                 seed=cfg.seed, chunk=eval_chunk_size(rung, cfg, device)),
                                  dist_info, device)
        val_bound = val_ll.mean().item()
        if dist_info.is_main:
            log.write("val", step=step, val_bound_nats=val_bound, val_samples=cfg.val_samples)
            postfix.update(val=f"{val_bound:.2f}")
            bar.set_postfix(postfix, refresh=False)
        if val_bound > best_val:
            best_val, best_step = val_bound, step
            if dist_info.is_main:
                atomic_torch_save({**checkpoint_state(), "optimizer": None}, best_path)

    # Stop signals: finish the current step, checkpoint, exit non-zero (see Interrupted).
    stop_signal = []
    previous_handlers = {}

    def on_signal(signum, frame):
        stop_signal.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous_handlers[sig] = signal.signal(sig, on_signal)

    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=not dist_info.is_main, mininterval=2.0,
               dynamic_ncols=True, desc=name)
    postfix = {}
    nan_from, nan_to = _inject_nan_steps()
    meters = StepMeters(device)
    ema = (ema_model, model) if ema_model is not None else None
    last_finite = {}  # the last log record with a taken update, for the message if the run must stop
    if resume_state is not None:  # a streak of skips goes on across the interruption
        meters.consecutive_skips.fill_(resume_state.get("consecutive_skips", 0))
        last_finite = resume_state.get("last_finite_metrics") or {}
    t_train, t_log, step_log = time.time(), time.time(), step
    first_step = step
    stop_reason = None
    check_every = min(cfg.log_every, cfg.max_consecutive_skips)  # consecutive skips are read this often
    try:
        while step < total_steps and not time_limited:
            lr = train_step(train_model, optimizer, params, batcher.next(), cfg, step, total_steps, meters, amp,
                            ema=ema, world_size=dist_info.world_size, poison=nan_from <= step <= nan_to)
            step += 1
            bar.update(1)

            at_check = step % check_every == 0 or step == total_steps
            if at_check:  # host syncs only here
                consecutive = int(meters.consecutive_skips.item())
                if step % cfg.log_every == 0 or step == total_steps:
                    n_taken = meters.taken.item()
                    n_skipped += int(meters.skipped.item())
                    now = time.time()
                    record = {"step": step, "epoch": round(step / batcher.steps_per_epoch, 3),
                              "loss": meters.loss_sum.item() / n_taken if n_taken else None, "lr": lr,
                              "grad_norm_max": meters.grad_norm_max.item(), "skipped_total": n_skipped,
                              "images_per_s": round((step - step_log) * cfg.batch_size / (now - t_log), 1)}
                    if n_taken:
                        last_finite = record
                    if dist_info.is_main:
                        log.write("train", **record)
                        postfix.update(loss=f"{record['loss']:.2f}" if n_taken else "nan", skipped=n_skipped)
                        bar.set_postfix(postfix, refresh=False)
                    meters.reset_interval()
                    t_log, step_log = now, step
                if consecutive >= cfg.max_consecutive_skips:
                    n_skipped += int(meters.skipped.item())
                    meters.skipped.zero_()
                    stop_reason = "skips"
                    break

            if step % val_every == 0 or step == total_steps:
                validate_and_keep_best()

            if step % cfg.checkpoint_every == 0 or step == total_steps:
                save_checkpoint()
            if dist_info.enabled:  # every process must stop at the same step: they agree at check steps only
                stop_now = at_check and _any_rank(bool(stop_signal), dist_info, device)
            else:
                stop_now = bool(stop_signal)
            if stop_now:
                save_checkpoint()
                stop_reason = "signal"
                break
            if cfg.max_train_minutes > 0 and step % cfg.log_every == 0 and step < total_steps \
                    and _any_rank(train_time_prev + time.time() - t_train > 60 * cfg.max_train_minutes, dist_info,
                                  device):
                stop_reason, time_limited = "time", True
                if step % val_every != 0:  # select on a fresh validation bound at the stopping point
                    validate_and_keep_best()
                save_checkpoint()
                break
            if deadline is not None and step % cfg.log_every == 0 and step < total_steps \
                    and _any_rank(time.time() >= deadline, dist_info, device):
                save_checkpoint()
                stop_reason = "segment"
                break
    finally:
        bar.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    train_time = train_time_prev + (time.time() - t_train)
    if stop_reason == "signal":
        signum = stop_signal[0] if stop_signal else signal.SIGTERM  # torchrun: another process got it
        name_of = signal.Signals(signum).name
        raise Interrupted(f"{name_of} received: stopped after step {step}, checkpoint written to {ckpt_path}. "
                          f"Run the same command again (or add --resume) to continue.", signum)
    if stop_reason == "skips":
        # Skipped updates leave weights and optimizer untouched, so the last checkpoint holds good weights.
        kept = f"{ckpt_path} (step {saved_step})" if saved_step is not None else "no checkpoint (none was written yet)"
        message = (f"error: {consecutive} consecutive updates were skipped (non-finite loss or gradient, or gradient "
                   f"norm above --skip-threshold {cfg.skip_threshold:g}) from step {step - consecutive + 1} to step "
                   f"{step}; stopping. Last finite metrics: {json.dumps(last_finite)}. Kept: {kept}"
                   f"{' and ' + str(best_path) if best_path.exists() else ''}. To retry from there, rerun the same "
                   f"command (with a larger --max-consecutive-skips if the fault may pass); to change the "
                   f"optimisation (e.g. a lower --lr or --grad-clip), start a new --out-dir.")
        if dist_info.is_main:
            log.write("stop", step=step, reason="consecutive_skips", skipped_total=n_skipped)
            print(message, file=sys.stderr)
        return 3
    if stop_reason == "segment":
        if dist_info.is_main:
            log.write("segment_end", step=step, train_time_s=round(train_time, 1), best_val_bound_nats=best_val,
                      best_step=best_step)
        raise SegmentEnd(f"--segment-minutes {cfg.segment_minutes:g}: the segment ended after step {step}/{total_steps} "
                         f"(best validation bound {best_val:.2f} nats at step {best_step}); checkpoint written to "
                         f"{ckpt_path}. Run the same command again to continue.")
    if dist_info.is_main and step > first_step:  # (a run resumed after its last step goes straight to the test)
        log.write("done", step=step, train_time_s=round(train_time, 1), skipped_total=n_skipped,
                  best_val_bound_nats=best_val, best_step=best_step, stop_reason=stop_reason or "completed")

    # The test set is used once, on the checkpoint with the best validation bound.
    if dist_info.enabled:  # process 0 writes best.pt; the others read it only after that
        dist.barrier()
    best = load_checkpoint(best_path, rung.name)
    eval_model.load_state_dict(best["ema"] if best.get("ema") is not None else best["model"])
    extra = {"steps": step, "epochs": round(step / batcher.steps_per_epoch, 2), "best_step": best_step,
             "best_val_bound_nats": best_val, "val_samples": cfg.val_samples, "n_val": len(data.val),
             "n_skipped": n_skipped, "train_time_s": round(train_time, 1),
             "stopped_by_time_limit": time_limited, "world_size": dist_info.world_size,
             # one precision throughout, or "mixed" with the steps of each in train_precision_history
             "train_precision": precision_history[0][1] if len(precision_history) == 1 else "mixed",
             "train_precision_history": precision_history}
    result = _final_evaluation(rung, cfg, eval_model, data, dist_info, device, out_dir, name, argv, extra, t_start,
                               commit, checkpoint_path=best_path, deadline=deadline)
    if dist_info.is_main and result is not None:
        log.write("test", step=step, test_ll_nats=result["test_ll_nats"], test_ll_stderr=result["test_ll_stderr"],
                  test_bpd=result["test_bpd"], eval_samples=cfg.eval_samples, n_test=result["n_test"])
    if wandb_run is not None:
        try:
            wandb_run.finish()
        except Exception:
            pass
    return 0
