"""The training loop shared by every rung, and the entry point of every modelNN.py.

A rung (modelNN.py) defines its model and its config and calls `run_script(RUNG, parser)`. A model is an
nn.Module whose `forward(x, k)` returns a dict of [k, B] tensors for k importance samples per image:
    log_px_z  log p(x | z)      (float32)
    log_pz    log p(z)          (summed over all stochastic layers)
    log_qz    log q(z | x)
plus `reconstruct(x)` and `sample(n)` returning images in [0, 1] for the figures. From these the
loop forms the importance log-weights log w = log p(x|z) + log p(z) - log q(z|x) and the
objective:  iwae: L_k = E[log mean_k w]   vae: E[mean_k log w]  (k-sample ELBO).

Here: the Rung contract, `main` (flags -> train or --eval-only, exit status), the learning-rate and KL schedules,
one training step, and `train`. The rest lives by concern in config.py (flags, TrainConfig), runtime.py (device,
torchrun, signals, exit statuses), run_files.py (the out-dir, atomic writes, ckpt.pt and resuming),
evaluation.py (the bounds, validation, the test evaluation, figures) and publishing.py (result.json, results/,
assets/, checkpoints/).
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

import data as data_lib
import runtime
from config import check_dataset_identity, explicit_flags, load_run_data, quick_overrides, run_name, validate_config
from evaluation import (bound_per_image, eval_chunk_size, evaluate_checkpoint, final_evaluation, log_weights,
                        validation_bound)
from run_files import (JsonlLog, TrainingState, atomic_torch_save, atomic_write_json, checkpoint_to_resume,
                       init_wandb, load_checkpoint, out_dir_hold, prepare_out_dir, remove_stale_temp_files)
from runtime import (EXIT_BAD_INPUT, EXIT_SEGMENT_END, EXIT_TOO_MANY_SKIPS, REPO_ROOT, DeferredStop, DistInfo,
                     Interrupted, SegmentEnd, UserError, any_rank, cpu_has_native_bf16, device_name, git_commit,
                     init_distributed, precision_name, prepare_model, resolve_device, training_autocast)


# ----------------------------------------------------------------------------- schedules


def get_lr(step: int, cfg, total_steps: int) -> float:
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


def get_kl_weight(step: int, cfg) -> float:
    """Weight of log p(z) - log q(z|x) in the training objective: ramps 0 -> 1 over cfg.kl_warmup_steps."""
    return 1.0 if cfg.kl_warmup_steps <= 0 else min(1.0, (step + 1) / cfg.kl_warmup_steps)


# ----------------------------------------------------------------------------- the step


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
    # enough for the caches (bench.py --phases eval measures both defaults); on CPU also (cfg) -> int, for a rung
    # whose best pass size depends on the data (model04: binary images or the colour mixture's many parameters)
    cuda_eval_chunk: int = 1 << 18
    cpu_eval_chunk: int | Callable[[Any], int] = 1024


def main(rung: Rung, parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse flags, then train + evaluate (or --eval-only). Returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)  # bad flags: argparse prints usage and exits 2
    # Distribution argument checks cost a host sync each and would turn a NaN into an exception;
    # inputs come from data.py, and non-finite values must reach the skip logic of the loop instead.
    torch.distributions.Distribution.set_default_validate_args(False)
    # SIGINT/SIGTERM outside the training steps (loading, evaluation) stop at once with a message; the
    # training loop defers them to the end of the step in progress (see train).
    previous_handlers = {sig: signal.signal(sig, runtime.interrupt_now) for sig in runtime.STOP_SIGNALS}
    agreed_exit = False  # an exit every torchrun process reaches together (see runtime.shutdown_distributed)
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
        return EXIT_BAD_INPUT
    except SegmentEnd as e:  # every process ends the segment at the same step (any_rank)
        agreed_exit = True
        print(str(e), file=sys.stderr)
        return EXIT_SEGMENT_END
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        runtime.shutdown_distributed(agreed_exit)
        out_dir_hold.release()  # the lock, and the out-dir itself where this start created it and wrote nothing


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
    if not runtime.torchrun_worker():
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


# ----------------------------------------------------------------------------- train


@dataclass
class Run:
    """The fixed facts of one invocation of a training run."""
    rung: Rung
    cfg: object  # the rung's TrainConfig, with out_dir filled in
    name: str
    out_dir: Path
    dist_info: DistInfo
    device: torch.device
    argv: list[str]

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "ckpt.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def command(self) -> str:
        return " ".join(["python", f"{self.rung.name}.py", *self.argv])


class Progress:
    """What a training run reports as it goes: log.jsonl records (process 0 only) and the progress bar."""

    def __init__(self, log: JsonlLog, bar, is_main: bool, step: int):
        self.log, self.bar, self.is_main = log, bar, is_main
        self.postfix = {}
        self.t_log, self.step_log = time.time(), step  # the last train record, for images/s

    def write(self, record_type: str, **values):
        if self.is_main:
            self.log.write(record_type, **values)

    def show(self, **values):
        if self.is_main:
            self.postfix.update(values)
            self.bar.set_postfix(self.postfix, refresh=False)


def new_training_state(run: Run, data, t_start: float) -> TrainingState:
    """The fresh model, its EMA copy, the optimizer, the batcher and the counters of step 0 (the caller seeded the
    random state: every process builds the same initial weights)."""
    cfg, rung, dist_info, device = run.cfg, run.rung, run.dist_info, run.device
    model = prepare_model(rung.build_model(cfg, data.info), device)
    if rung.init_from_data is not None:
        with torch.no_grad():
            rung.init_from_data(model, data.train, cfg)
    ema_model = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    if dist_info.rank > 0:  # then each process draws its own reparameterisation noise
        torch.manual_seed(cfg.seed + dist_info.rank)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    try:  # the Batcher checks the global batch against the data and the number of processes
        batcher = data_lib.Batcher(data.train, cfg.batch_size, seed=cfg.seed, rank=dist_info.rank,
                                   world_size=dist_info.world_size)
    except ValueError as e:
        raise UserError(f"--batch-size: {e}.") from None
    amp = training_autocast(cfg, device)
    if amp and device.type == "cpu" and cpu_has_native_bf16() is False and dist_info.is_main:
        print("warning: --cpu-bf16 on a CPU without AVX512-BF16/AMX: bf16 is emulated here and usually several "
              "times slower than float32 (python bench.py --device cpu --phases train measures both)", file=sys.stderr)
    return TrainingState(rung.name, run.name, cfg, model, ema_model, optimizer, batcher, StepMeters(device),
                         git_commit=git_commit(), precision_history=[[0, precision_name(amp)]], t_start=t_start,
                         dataset_sha256=data.info.content_sha256)


def start_or_resume(run: Run, state: TrainingState, saved: dict | None, total_steps: int) -> JsonlLog:
    """Restore `saved` (ckpt.pt) into the fresh state, or write config.json for a new run; then open log.jsonl with
    its first record of this invocation ("config" or "resume")."""
    cfg, is_main = run.cfg, run.dist_info.is_main
    if is_main:
        for tmp in remove_stale_temp_files(run.out_dir):
            print(f"removed {tmp}, left by an interrupted write")
    if saved is not None:
        state.restore(saved, run.ckpt_path, run.dist_info, run.device, total_steps)
        if is_main:
            print(f"resuming {run.out_dir} at step {state.step}/{total_steps}")
    elif is_main:
        atomic_write_json(run.out_dir / "config.json", {"model": run.rung.name, "run_name": run.name, **asdict(cfg)})
    wandb_run = init_wandb(cfg, run.name, run.out_dir) if cfg.wandb and is_main else None
    log = JsonlLog(run.out_dir / "log.jsonl" if is_main else None, wandb_run)
    if is_main and saved is None:
        log.write("config", step=0, model=run.rung.name, run_name=run.name, device=device_name(run.device),
                  command=run.command, git_commit=state.git_commit, config=asdict(cfg))
    elif is_main:  # records after this one replace those of later steps written before the stop
        log.write("resume", step=state.step, command=run.command, git_commit=git_commit(),
                  train_precision=precision_name(training_autocast(cfg, run.device)),
                  device=device_name(run.device))
    return log


def model_to_train(model: torch.nn.Module, run: Run) -> torch.nn.Module:
    """The model the steps call: DDP-wrapped under torchrun, compiled with --compile."""
    if run.dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.cfg.compile:  # compile the DDP-wrapped model: torch.compile splits its graph at DDP's buckets
        model = torch.compile(model)
    return model


def log_train_interval(state: TrainingState, progress: Progress, lr: float, cfg):
    """The "train" record of the steps since the last one (host syncs: only here and at check steps)."""
    meters, step = state.meters, state.step
    n_taken = meters.taken.item()
    state.n_skipped += int(meters.skipped.item())
    now = time.time()
    record = {"step": step, "epoch": round(step / state.batcher.steps_per_epoch, 3),
              "loss": meters.loss_sum.item() / n_taken if n_taken else None, "lr": lr,
              "grad_norm_max": meters.grad_norm_max.item(), "skipped_total": state.n_skipped,
              "images_per_s": round((step - progress.step_log) * cfg.batch_size / (now - progress.t_log), 1)}
    if n_taken:
        state.last_finite = record
    progress.write("train", **record)
    progress.show(loss=f"{record['loss']:.2f}" if n_taken else "nan", skipped=state.n_skipped)
    meters.reset_interval()
    progress.t_log, progress.step_log = now, step


def validate_and_keep_best(run: Run, state: TrainingState, eval_model, val: data_lib.Split, progress: Progress):
    """The validation bound L_{val_samples} (EMA weights if any); a new best is saved as best.pt (no optimizer)."""
    chunk = eval_chunk_size(run.rung, run.cfg, run.device)
    val_bound = validation_bound(eval_model, val, run.cfg, chunk, run.dist_info, run.device)
    progress.write("val", step=state.step, val_bound_nats=val_bound, val_samples=run.cfg.val_samples,
                   train_time_s=round(state.train_time_s(), 1))
    progress.show(val=f"{val_bound:.2f}")
    if val_bound > state.best_val:
        state.best_val, state.best_step = val_bound, state.step
        if run.dist_info.is_main:
            atomic_torch_save({**state.checkpoint(), "optimizer": None}, run.best_path)


def save_checkpoint(run: Run, state: TrainingState):
    if run.dist_info.is_main:
        atomic_torch_save(state.checkpoint(), run.ckpt_path)
    state.saved_step = state.step


def reason_to_stop(run: Run, state: TrainingState, stop: DeferredStop, at_check: bool, total_steps: int,
                   deadline: float | None) -> str | None:
    """"signal", "time" (--max-train-minutes) or "segment" (--segment-minutes) when the loop stops after this step.
    Under torchrun every process must stop at the same step: each check is a collective, taken at the same steps
    by all (signals at check steps, time limits at log steps)."""
    cfg, dist_info, device, step = run.cfg, run.dist_info, run.device, state.step
    if dist_info.enabled:
        if at_check and any_rank(bool(stop.received), dist_info, device):
            return "signal"
    elif stop.received:
        return "signal"
    at_log = step % cfg.log_every == 0 and step < total_steps
    if cfg.max_train_minutes > 0 and at_log and any_rank(state.train_time_s() > 60 * cfg.max_train_minutes,
                                                          dist_info, device):
        return "time"
    if deadline is not None and at_log and any_rank(time.time() >= deadline, dist_info, device):
        return "segment"
    return None


def end_training(run: Run, state: TrainingState, progress: Progress, stop_reason: str | None, stop: DeferredStop,
                 train_time: float, total_steps: int, first_step: int) -> int | None:
    """After the loop: raise or return the exit status of a run that stops here (signal, skips, segment end), or
    log "done" and return None for a run that goes on to its test evaluation."""
    cfg, step = run.cfg, state.step
    if stop_reason == "signal":
        raise stop.interrupted(step, run.ckpt_path)
    if stop_reason == "skips":
        # Skipped updates leave weights and optimizer untouched, so the last checkpoint holds good weights.
        consecutive = int(state.meters.consecutive_skips.item())
        kept = (f"{run.ckpt_path} (step {state.saved_step})" if state.saved_step is not None
                else "no checkpoint (none was written yet)")
        best = f" and {run.best_path}" if run.best_path.exists() else ""
        message = (f"error: {consecutive} consecutive updates were skipped (non-finite loss or gradient, or gradient "
                   f"norm above --skip-threshold {cfg.skip_threshold:g}) from step {step - consecutive + 1} to step "
                   f"{step}; stopping. Last finite metrics: {json.dumps(state.last_finite)}. Kept: {kept}{best}. To "
                   f"retry from there, rerun the same command (with a larger --max-consecutive-skips if the fault "
                   f"may pass); to change the optimisation (e.g. a lower --lr or --grad-clip), start a new --out-dir.")
        progress.write("stop", step=step, reason="consecutive_skips", skipped_total=state.n_skipped)
        if run.dist_info.is_main:
            print(message, file=sys.stderr)
        return EXIT_TOO_MANY_SKIPS
    if stop_reason == "segment":
        progress.write("segment_end", step=step, train_time_s=round(train_time, 1),
                       best_val_bound_nats=state.best_val, best_step=state.best_step)
        raise SegmentEnd(f"--segment-minutes {cfg.segment_minutes:g}: the segment ended after step {step}/{total_steps} "
                         f"(best validation bound {state.best_val:.2f} nats at step {state.best_step}); checkpoint "
                         f"written to {run.ckpt_path}. Run the same command again to continue.")
    if step > first_step:  # (a run resumed after its last step goes straight to the test)
        progress.write("done", step=step, train_time_s=round(train_time, 1), skipped_total=state.n_skipped,
                       best_val_bound_nats=state.best_val, best_step=state.best_step,
                       stop_reason=stop_reason or "completed")
    return None


def training_summary(run: Run, state: TrainingState, data, train_time: float) -> dict:
    """result.json's facts of the training run."""
    history = state.precision_history
    return {"steps": state.step, "epochs": round(state.step / state.batcher.steps_per_epoch, 2),
            "best_step": state.best_step, "best_val_bound_nats": state.best_val, "val_samples": run.cfg.val_samples,
            "n_val": len(data.val), "n_skipped": state.n_skipped, "train_time_s": round(train_time, 1),
            "stopped_by_time_limit": state.time_limited, "world_size": run.dist_info.world_size,
            # one precision throughout, or "mixed" with the steps of each in train_precision_history
            "train_precision": history[0][1] if len(history) == 1 else "mixed", "train_precision_history": history}


def train(rung: Rung, cfg, argv) -> int:
    """Train from scratch, or on from the out-dir's ckpt.pt, then evaluate the best weights on the test set."""
    t_start = time.time()
    deadline = runtime.segment_deadline(cfg, t_start)
    dist_info = init_distributed(cfg.device)
    device = resolve_device(cfg.device, dist_info)
    name = run_name(rung, cfg)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else REPO_ROOT / "runs" / name
    cfg = dataclasses.replace(cfg, out_dir=str(out_dir))
    run = Run(rung, cfg, name, out_dir, dist_info, device, argv)
    prepare_out_dir(out_dir, dist_info, device)
    saved = checkpoint_to_resume(out_dir, rung.name, cfg)  # all checks before anything is written

    torch.manual_seed(cfg.seed)  # every process builds the same initial weights (and EMA copy)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    data = load_run_data(cfg, device)
    if saved is not None:
        check_dataset_identity(saved, data.info, out_dir / "ckpt.pt")
    state = new_training_state(run, data, t_start)
    steps_per_epoch = state.batcher.steps_per_epoch
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    val_every = cfg.val_every if cfg.val_every > 0 else steps_per_epoch
    log = start_or_resume(run, state, saved, total_steps)
    model, meters, optimizer = state.model, state.meters, state.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    train_model = model_to_train(model, run)
    eval_model = state.ema_model if state.ema_model is not None else model
    ema = (state.ema_model, model) if state.ema_model is not None else None
    amp = training_autocast(cfg, device)
    nan_from, nan_to = runtime.inject_nan_steps()
    check_every = min(cfg.log_every, cfg.max_consecutive_skips)  # consecutive skips are read this often

    from tqdm import tqdm
    first_step, stop_reason = state.step, None
    with DeferredStop() as stop, tqdm(total=total_steps, initial=state.step, disable=not dist_info.is_main,
                                      mininterval=2.0, dynamic_ncols=True, desc=name) as bar:
        progress = Progress(log, bar, dist_info.is_main, state.step)
        state.t_train = time.time()
        while state.step < total_steps and not state.time_limited:
            lr = train_step(train_model, optimizer, params, state.batcher.next(), cfg, state.step, total_steps,
                            meters, amp, ema=ema, world_size=dist_info.world_size,
                            poison=nan_from <= state.step <= nan_to)
            state.step += 1
            step = state.step
            bar.update(1)

            at_check = step % check_every == 0 or step % cfg.log_every == 0 or step == total_steps
            if at_check:  # host syncs only here
                if step % cfg.log_every == 0 or step == total_steps:
                    log_train_interval(state, progress, lr, cfg)
                if meters.consecutive_skips.item() >= cfg.max_consecutive_skips:
                    state.n_skipped += int(meters.skipped.item())
                    meters.skipped.zero_()
                    stop_reason = "skips"
                    break
            if step % val_every == 0 or step == total_steps:
                validate_and_keep_best(run, state, eval_model, data.val, progress)
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                save_checkpoint(run, state)

            stop_reason = reason_to_stop(run, state, stop, at_check, total_steps, deadline)
            if stop_reason == "time":
                state.time_limited = True
                if step % val_every != 0:  # select on a fresh validation bound at the stopping point
                    validate_and_keep_best(run, state, eval_model, data.val, progress)
            if stop_reason is not None:
                save_checkpoint(run, state)
                break
    train_time = state.train_time_s()
    exit_status = end_training(run, state, progress, stop_reason, stop, train_time, total_steps, first_step)
    if exit_status is not None:
        return exit_status
    if cfg.no_test:  # a pilot: selection happens on the validation bound, the test set stays untouched
        log.close()
        if dist_info.is_main:
            print(f"--no-test: training ended at step {state.step} with best validation bound {state.best_val:.2f} "
                  f"nats (step {state.best_step}); the test set was not used.")
        return 0

    # The test set is used once, on the checkpoint with the best validation bound.
    if dist_info.enabled:  # process 0 writes best.pt; the others read it only after that
        dist.barrier()
    best = load_checkpoint(run.best_path, rung.name)
    eval_model.load_state_dict(best["ema"] if best.get("ema") is not None else best["model"])
    result = final_evaluation(rung, cfg, eval_model, data, dist_info, device, out_dir, name, argv,
                              training_summary(run, state, data, train_time), state.t_start, state.git_commit,
                              checkpoint_path=run.best_path, deadline=deadline)
    if result is not None:
        progress.write("test", step=state.step, test_ll_nats=result["test_ll_nats"],
                       test_ll_stderr=result["test_ll_stderr"], test_bpd=result["test_bpd"],
                       eval_samples=cfg.eval_samples, n_test=result["n_test"])
    log.close()
    return 0
