"""Publishing a run's numbers: result.json's record, and the copies in git that a published number rests on --
results/<run name>.json (with its per-image values in results/per_image/), the figures in assets/ and the
weights-only checkpoint in checkpoints/."""
import datetime
import hashlib
import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from config import dataset_name
from run_files import atomic_copy, atomic_write_bytes, atomic_write_json, load_checkpoint
from runtime import REPO_ROOT, device_name

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


def result_record(rung, cfg, name, info, summary, n_test, extra, device, wall_time_s, argv, commit) -> dict:
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


def publish_figures(cfg, figures: list[Path]):
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


def publish(rung, cfg, result_path: Path, figures: list[Path], name: str, checkpoint_path: Path | None = None):
    """--publish: result.json, the figures and (when given) a weights-only copy of `checkpoint_path` into git's
    results/, assets/ and checkpoints/."""
    results = REPO_ROOT / "results"
    results.mkdir(exist_ok=True)
    publish_figures(cfg, figures)
    published = results / f"{name}.json"
    publish_result(result_path, published)
    print(f"published {published.relative_to(REPO_ROOT)} and {len(figures)} figures in assets/")
    if checkpoint_path is not None:
        _publish_checkpoint(checkpoint_path, name, rung.name)
