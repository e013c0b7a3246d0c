"""Evaluation: the importance-weighted bounds (L_k, the k-sample ELBO), their seeded and resumable evaluation per
image, across torchrun processes, the validation bound, the figures, and the test-set evaluation that ends a run
(or is the whole of an --eval-only run) and writes result.json."""
import dataclasses
import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import data as data_lib
from config import EVAL_OVERRIDE_KEYS, check_dataset_identity, config_differences, load_run_data, run_name
from distributions import bits_per_dim, log_mean_exp
from publishing import PER_IMAGE_FILE, publish, publish_figures, result_record, save_per_image
from run_files import atomic_torch_save, atomic_write_json, load_checkpoint, prepare_out_dir
from runtime import (DistInfo, Interrupted, SegmentEnd, UserError, any_rank, device_name, git_commit,
                     init_distributed, prepare_model, resolve_device, segment_deadline)


# ----------------------------------------------------------------------------- the bounds


def log_weights(out: dict, kl_weight: float = 1.0) -> torch.Tensor:
    """[k, B] importance log-weights; kl_weight < 1 only during KL warm-up."""
    return out["log_px_z"] + kl_weight * (out["log_pz"] - out["log_qz"])


def bound_per_image(log_w: torch.Tensor, objective: str) -> torch.Tensor:
    """[k, B] -> [B]: L_k = log mean_k w (iwae) or the k-sample ELBO mean_k log w (vae)."""
    return log_mean_exp(log_w, dim=0) if objective == "iwae" else log_w.mean(0)


# ----------------------------------------------------------------------------- environment


ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al.: a latent unit u is active if Var_x(E_q[u | x]) > 0.01


def count_active_units(variance: torch.Tensor) -> int:
    """Burda et al.'s count: units whose posterior mean varies over the images by more than ACTIVE_UNIT_THRESHOLD."""
    return int((variance > ACTIVE_UNIT_THRESHOLD).sum())


def latent_stats_result(layers: list[dict], n_images: int, **extra) -> dict:
    """result.json's latent statistics (a rung's extra_metrics) from per-layer {"units", "kl_nats", "active_units"}."""
    return {"latent_layer_stats": layers, "active_units_total": sum(x["active_units"] for x in layers),
            "latent_units_total": sum(x["units"] for x in layers), "active_unit_threshold": ACTIVE_UNIT_THRESHOLD,
            **extra, "latent_stats_images": n_images}


# ----------------------------------------------------------------------------- evaluating a bound


def eval_chunk_size(rung, cfg, device) -> int:
    """Latents per evaluation pass: --eval-chunk, else the rung's `cuda_eval_chunk` (2^18 unless it says otherwise) on
    CUDA and its `cpu_eval_chunk` on CPU (small passes whose activations stay in the CPU's caches: several times
    faster than 2^14 there, results/bench_cpu_eval.json)."""
    if cfg.eval_chunk > 0:
        return cfg.eval_chunk
    if device.type == "cuda":
        return rung.cuda_eval_chunk
    return rung.cpu_eval_chunk(cfg) if callable(rung.cpu_eval_chunk) else rung.cpu_eval_chunk


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


def validation_bound(model, val: data_lib.Split, cfg, chunk: int, dist_info: DistInfo, device) -> float:
    """The validation bound L_{cfg.val_samples} in nats, averaged over all of `val` (every process evaluates its
    shard). Seeded with cfg.seed and RNG-neutral, like evaluate_bound."""
    per_image = evaluate_bound(model, shard(val, dist_info), cfg.val_samples, seed=cfg.seed, chunk=chunk)
    return gather_per_image(per_image, dist_info, device).mean().item()


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

# ----------------------------------------------------------------------------- the test set


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's state (names and values, layout-independent): ties a partial evaluation to its weights."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_eval_state(path: Path, identity: dict) -> dict | None:
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


def final_evaluation(rung, cfg, model, data, dist_info, device, out_dir, name, argv, extra, t_start, commit,
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
    state = load_eval_state(state_path, identity)
    eval_time_prev, segments = (state["eval_time_s"], state["segments"]) if state is not None else (0.0, 0)
    # Where each invocation ran: a long evaluation may continue on another machine (of the same device type).
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
    if any_rank(ll is None, dist_info, device):  # the segment ended before every process was done
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
    result = result_record(rung, cfg, name, data.info, summary, len(test),
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
        publish(rung, cfg, result_path, figures, name, checkpoint_path)
    return result


def evaluate_checkpoint(rung, cfg, given: set[str], argv) -> int:
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
    prepare_out_dir(out_dir, dist_info, device)
    data = load_run_data(cfg, device)
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
                publish_figures(cfg, figures)
            print(f"redrew {len(figures)} figures of {cfg.checkpoint} in {out_dir}"
                  + (" and copied them to assets/" if cfg.publish else ""))
        return 0
    name = ckpt.get("run_name", run_name(rung, cfg))
    extra = {k: ckpt.get(k) for k in ("steps", "epochs", "n_skipped", "best_val_bound_nats", "best_step",
                                      "train_time_s", "stopped_by_time_limit")}
    extra["steps"] = ckpt.get("step")
    extra["val_samples"] = saved.get("val_samples")
    final_evaluation(rung, cfg, model, data, dist_info, device, out_dir, name, argv,
                      {**extra, "evaluated_checkpoint": str(cfg.checkpoint), "train_git_commit": ckpt.get("git_commit")},
                      t_start, git_commit(), checkpoint_path=Path(cfg.checkpoint),
                      deadline=segment_deadline(cfg, t_start))
    return 0
