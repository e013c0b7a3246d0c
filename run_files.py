"""The files of a run in its out-dir: atomic writes, the out-dir itself (created, probed, locked, and removed again
when a start fails before writing anything), log.jsonl, and the training checkpoint ckpt.pt: what it holds, the
checks before a run resumes from it, and the restore.

Run layout (`--out-dir`, default runs/<run name>):
    config.json  log.jsonl (one JSON object per line, with a "type" field)  ckpt.pt (last state)
    best.pt (best validation bound)  result.json  test_ll_nats.npy (per-image test bounds)
    <figure prefix>_{imgs,recs,samples}.png  test_eval.pt (a test evaluation in progress)
"""
import json
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from config import RUN_CONTROL_KEYS, config_differences
from runtime import DistInfo, UserError, any_rank, precision_name, training_autocast

CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------- atomic writes


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


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- the out-dir


class OutDir:
    """This process's hold on the run's out-dir (process 0's, under torchrun): the flock that keeps a second process
    out, and the folders this invocation created, so that a start that fails before writing anything leaves none
    behind (see release)."""

    def __init__(self):
        self.lock_fd: int | None = None
        self.created: list[Path] = []  # deepest first

    def take(self, path: Path):
        """Create (with its missing parents), probe and lock `path`; UserError when it cannot be had."""
        missing = [p for p in (path, *path.parents) if not p.exists()]
        try:
            path.mkdir(parents=True, exist_ok=True)
            self.created = missing
            probe = path / f".write-test{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            self._lock(path)
        except OSError as e:
            raise UserError(f"out-dir {path} is not writable ({e.strerror}); choose another with --out-dir.") from None

    def _lock(self, path: Path):
        """Exclusive lock on the out-dir itself for as long as this run lasts: a second process on the same out-dir
        (a campaign started twice, the same command in two shells) would interleave its writes of ckpt.pt, log.jsonl
        and test_eval.pt with ours, so it stops at once instead. flock on the directory: no lock file to commit or
        clean up, and the kernel drops the lock when the holder dies. (No fcntl on Windows: no lock there.)"""
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
        self.lock_fd = fd

    def release(self):
        """Drop the lock, then remove the folders this invocation created that are still empty: a start that failed
        (missing data, an impossible batch size, a signal while loading) wrote nothing into them. rmdir removes only
        empty folders, so neither a run's files nor a folder that existed before are ever touched."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the descriptor releases the flock
            self.lock_fd = None
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:  # not empty (the run wrote into it) or already gone: keep it and its parents
                break
        self.created = []


out_dir_hold = OutDir()  # the out-dir of this process's run, released when training.main returns


def prepare_out_dir(path: Path, dist_info: DistInfo, device):
    """Create and probe the out-dir and lock it (process 0 does, for all). A collective under torchrun: every process
    stops with the same error when process 0 cannot have the out-dir, instead of the others going on alone into
    their first collective and aborting there."""
    error = None
    if dist_info.is_main:
        try:
            out_dir_hold.take(path)
        except UserError as e:
            error = e
    if any_rank(error is not None, dist_info, device):
        raise error or UserError(f"process 0 could not take out-dir {path} (see its message); stopping with it.")


# ----------------------------------------------------------------------------- log.jsonl and wandb


class JsonlLog:
    """Append-only JSONL log (every record has a "type"), mirrored to wandb when enabled."""

    def __init__(self, path: Path | None, wandb_run=None):
        self.path, self.wandb_run = path, wandb_run
        self._wandb_started = wandb_run  # finished by close() even when logging to it failed

    def close(self):
        """Finish the wandb run, if one was started; its failure is ignored (the JSONL log is complete)."""
        if self._wandb_started is not None:
            try:
                self._wandb_started.finish()
            except Exception:
                pass

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
                print(f"warning: wandb logging failed ({one_line(e)}); continuing without wandb", file=sys.stderr)
                self.wandb_run = None


def one_line(e: Exception) -> str:
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
            print(f"warning: wandb could not start online ({one_line(first_error)}); logging offline under "
                  f"{out_dir / 'wandb'} instead (upload later with `wandb sync`)", file=sys.stderr)
        return run
    print(f"warning: wandb could not start ({one_line(first_error)}); continuing without wandb", file=sys.stderr)
    return None


# ----------------------------------------------------------------------------- evaluation


# ----------------------------------------------------------------------------- resuming


def checkpoint_to_resume(out_dir: Path, rung_name: str, cfg) -> dict | None:
    """The checkpoint this run continues from, or None for a new run; UserError when the out-dir forbids either.

    Resume rules: an unfinished run in out_dir continues (with or without --resume); a finished one (result.json) is
    never overwritten without --resume; --resume with nothing to resume is an error. All checks come before anything
    is written."""
    ckpt_path, best_path = out_dir / "ckpt.pt", out_dir / "best.pt"
    if (out_dir / "result.json").exists() and not cfg.resume:
        raise UserError(f"out-dir {out_dir} holds a finished run (result.json). Use --eval-only --checkpoint "
                        f"{best_path} to re-evaluate it, or choose a new --out-dir.")
    if not ckpt_path.exists():
        if cfg.resume:
            raise UserError(f"--resume: nothing to resume, {ckpt_path} does not exist.")
        return None
    ckpt = load_checkpoint(ckpt_path, rung_name)
    if ckpt.get("optimizer") is None:
        raise UserError(f"checkpoint {ckpt_path} holds no optimizer state (a best.pt or weights-only copy?), "
                        f"so training cannot continue from it; evaluate it with --eval-only --checkpoint, or "
                        f"choose a new --out-dir.")
    diffs = config_differences(saved_config(ckpt, cfg), asdict(cfg), RUN_CONTROL_KEYS)
    if diffs:
        raise UserError(f"checkpoint {ckpt_path} comes from a different config ({'; '.join(diffs)}). "
                        f"Use the same flags to resume, or a new --out-dir.")
    return ckpt


def saved_config(ckpt: dict, cfg) -> dict:
    """The checkpoint's config; a key that an older checkpoint lacks was added later with its default (cpu_bf16)."""
    return {**asdict(type(cfg)()), **ckpt["config"]}


@dataclass
class TrainingState:
    """A training run as ckpt.pt holds it: the live objects whose state_dicts are saved, and the run's counters."""
    rung_name: str
    run_name: str
    cfg: object
    model: torch.nn.Module
    ema_model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    batcher: object  # data.Batcher: the data order
    meters: object  # training.StepMeters: skips since the last log step are counted on the device
    git_commit: str  # the code that trains these weights; a resumed run keeps its first commit
    precision_history: list  # [[first step, precision], ...]: the training precision from each step on
    step: int = 0
    n_skipped: int = 0  # skipped updates counted on the host at log steps (meters.skipped holds those since)
    best_val: float = -math.inf  # best validation bound (nats) so far, at best_step
    best_step: int = -1
    time_limited: bool = False  # --max-train-minutes ended training (a resumed run then goes straight to the test)
    last_finite: dict = field(default_factory=dict)  # the last log record with a taken update
    train_time_prev_s: float = 0.0  # training time of the earlier invocations
    t_train: float = field(default_factory=time.time)  # time.time() when this invocation's training began
    t_start: float = field(default_factory=time.time)  # the run's start: now, less the earlier invocations' wall time
    saved_step: int | None = None  # the step ckpt.pt holds (None: none written yet)
    dataset_sha256: str | None = None  # an image folder's content hash: the checkpoint belongs to those images

    def train_time_s(self) -> float:
        return self.train_time_prev_s + (time.time() - self.t_train)

    def checkpoint(self) -> dict:
        """ckpt.pt's contents (best.pt: the same with "optimizer": None)."""
        ema, meters = self.ema_model, self.meters
        return {"format": CHECKPOINT_FORMAT, "model_name": self.rung_name, "run_name": self.run_name,
                "config": asdict(self.cfg), "git_commit": self.git_commit, "dataset_sha256": self.dataset_sha256,
                "model": self.model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "batcher": self.batcher.state_dict(), "rng": rng_state(),
                "step": self.step, "epochs": self.step / self.batcher.steps_per_epoch,
                "n_skipped": self.n_skipped + int(meters.skipped.item()),
                "consecutive_skips": int(meters.consecutive_skips.item()), "last_finite_metrics": self.last_finite,
                "best_val_bound_nats": self.best_val, "best_step": self.best_step,
                "stopped_by_time_limit": self.time_limited, "precision_history": self.precision_history,
                "train_time_s": self.train_time_s(), "wall_time_s": time.time() - self.t_start}

    def restore(self, ckpt: dict, ckpt_path: Path, dist_info: DistInfo, device, total_steps: int):
        """Continue from `ckpt` (checked by checkpoint_to_resume): weights, EMA, Adam moments, data order, random
        state and counters, so that the run goes on bit-exactly as if it had never stopped."""
        cfg = self.cfg
        self.git_commit = ckpt.get("git_commit", self.git_commit)
        try:
            self.model.load_state_dict(ckpt["model"])
            if self.ema_model is not None:
                self.ema_model.load_state_dict(ckpt["ema"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.batcher.load_state_dict(ckpt["batcher"])
            set_rng_state(ckpt["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # e.g. the model's code changed since
            raise UserError(f"checkpoint {ckpt_path} does not fit this {self.rung_name}.py ({one_line(e)[:300]}); "
                            f"resume with the code that wrote it (commit {self.git_commit}), or choose a new "
                            f"--out-dir.") from None
        self.step, self.n_skipped = ckpt["step"], ckpt["n_skipped"]
        if dist_info.rank > 0:  # the checkpoint holds process 0's RNG state: draw distinct noise elsewhere
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, dist_info.rank, self.step]).generate_state(1)[0]))
        self.best_val, self.best_step = ckpt["best_val_bound_nats"], ckpt["best_step"]
        self.time_limited = ckpt.get("stopped_by_time_limit", False)
        # older checkpoints lack the history: they trained in what their config gives on this device type
        history = ckpt.get("precision_history") or [
            [0, precision_name(training_autocast(type(cfg).from_dict(saved_config(ckpt, cfg)), device))]]
        now = precision_name(training_autocast(cfg, device))
        if history[-1][1] != now and self.step < total_steps and not self.time_limited:
            history = [*history, [self.step, now]]
            if dist_info.is_main:
                print(f"training precision changes at step {self.step}: {history[-2][1]} -> {now} "
                      f"(--cpu-bf16 {'on' if cfg.cpu_bf16 else 'off'})")
        self.precision_history = history
        self.train_time_prev_s = ckpt["train_time_s"]
        # wall time of the earlier invocations (older checkpoints lack it: their training time stands in)
        self.t_start -= ckpt.get("wall_time_s", self.train_time_prev_s)
        self.saved_step = self.step
        # a streak of skips goes on across the interruption
        self.meters.consecutive_skips.fill_(ckpt.get("consecutive_skips", 0))
        self.last_finite = ckpt.get("last_finite_metrics") or {}
