"""Redraw every published figure in assets/ from the weights behind it: one command.

    python regenerate_figures.py                    # every result in results/
    python regenerate_figures.py --dry-run          # what would run, and which checkpoints are missing
    python regenerate_figures.py --run model01_binarized-mnist_iwae_k5_seed0
    python regenerate_figures.py --export-checkpoint runs/<run>/best.pt   # add a run's weights to checkpoints/
    python regenerate_figures.py --curves           # validation bound against epochs and hours, from the logs


For each results/<run>.json the run's weights are looked up in
    checkpoints/<run>.pt     the weights-only copy that `--publish` writes when it is <= 8 MB (kept in git)
    runs/<run>/best.pt       the run directory, on the machine that trained it
and `python <model>.py --eval-only --checkpoint CKPT --figures-only --publish` redraws the figures into
assets/. Figures are seeded: on the device type the run used and the same torch build they come out
bit for bit as published. A result made on a GPU is redrawn on the CPU when no GPU is visible, and the
command says so: a few pixels of such a grid may then differ from the published one by one 8-bit level
(as they may on another CPU model; docs/numbers.md). Results run oldest first, so where several runs
share figure files the newest one's figures end in assets/, as with --publish. Exit status 1 when any
result could not be redrawn (its checkpoint is missing or its script failed): each is reported.

--curves also draws assets/layers_<dataset>.png: each stochastic layer's KL and share of active units, a bar per
model04 row. And it draws, per data set, the validation bound of every published run that has a log.jsonl in the
tree (campaign/<run>/ or runs/<run>/) against epochs and against hours of training, into
assets/curves_<dataset>.png (fixed size, no timestamps: the same logs give the same bytes). Runs without a
log are named in the figure and in the output.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent


class RegenerateError(RuntimeError):
    """Bad input: one paragraph, exit status 2."""


def load_results(results_dir: Path) -> list[dict]:
    """Published results (bench_*.json skipped), oldest first."""
    results = []
    for path in sorted(results_dir.glob("*.json")) if results_dir.is_dir() else []:
        if path.name.startswith("bench_"):
            continue
        try:
            record = json.loads(path.read_text())
            results.append({"run_name": record["run_name"], "model": record["model"], "quick": record.get("quick"),
                            "device_type": record.get("device_type", "cpu"), "date": record.get("date", ""),
                            "dataset": record.get("dataset", "?"), "steps": record.get("steps"),
                            "epochs": record.get("epochs"), "latent_layer_stats": record.get("latent_layer_stats"),
                            "path": path})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RegenerateError(f"{path} is not a result file written by `modelNN.py --publish` "
                                  f"({type(e).__name__}: {e}); `python compare.py` says more.") from None

    def date(r):
        try:
            return datetime.datetime.fromisoformat(r["date"]).timestamp()
        except (TypeError, ValueError):
            return 0.0

    return sorted(results, key=lambda r: (date(r), r["run_name"]))


def find_checkpoint(run_name: str, checkpoints_dir: Path, runs_dir: Path) -> Path | None:
    for candidate in (checkpoints_dir / f"{run_name}.pt", runs_dir / run_name / "best.pt"):
        if candidate.is_file():
            return candidate
    return None


def export_checkpoint(source: Path, checkpoints_dir: Path) -> Path:
    """checkpoints/<run>.pt from a run's best.pt: the evaluated weights and config only."""
    import torch

    import publishing
    import run_files

    if not source.is_file():
        raise RegenerateError(f"--export-checkpoint: {source} does not exist.")
    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != run_files.CHECKPOINT_FORMAT or "model" not in ckpt:
        raise RegenerateError(f"--export-checkpoint: {source} is not a vae-mdl checkpoint.")
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    target = checkpoints_dir / f"{ckpt['run_name']}.pt"
    run_files.atomic_torch_save(publishing.weights_only_checkpoint(ckpt), target)
    size_mb = target.stat().st_size / 2 ** 20
    if target.stat().st_size > publishing.PUBLISHED_CHECKPOINT_MAX_BYTES:
        print(f"warning: {target} is {size_mb:.1f} MB, over the {publishing.PUBLISHED_CHECKPOINT_MAX_BYTES >> 20} MB "
              f"meant for git; keep it out of commits.", file=sys.stderr)
    print(f"wrote {target} ({size_mb:.1f} MB, weights only) from {source}")
    return target


def gpu_visible() -> bool:
    import torch
    return torch.cuda.is_available()


def draw_device(result: dict, flag: str, have_gpu) -> tuple[str, str | None]:
    """(the device to redraw a result on, a line saying why it is not the run's own device, or None)."""
    if flag != "result":
        return flag, None
    if result["device_type"] == "cuda" and not have_gpu():
        return "cpu", (f"{result['run_name']}: made on CUDA, redrawn on CPU (no GPU visible): pixels may differ from "
                       f"the published grid by one level in a few places")
    return result["device_type"], None


# ----------------------------------------------------------------------------- validation curves


def find_log(run_name: str, log_dirs: list[Path]) -> Path | None:
    for folder in log_dirs:
        if (folder / run_name / "log.jsonl").is_file():
            return folder / run_name / "log.jsonl"
    return None


def validation_points(log: Path, steps_per_epoch: float) -> list[tuple[float, float, float]]:
    """[(epoch, hours of training, validation bound in nats)] from a run's log.jsonl. Hours count the time between
    consecutive records within a segment (a `config` or `resume` record starts one), so the gaps between segments of
    a run cut into segments are left out; a resumed segment's records replace the ones logged after its checkpoint."""
    points, hours, last_time = [], 0.0, None
    for line in log.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        kind, when = record.get("type"), record.get("time")
        if kind in ("config", "resume"):
            last_time = when
            if kind == "resume":
                points = [p for p in points if p[0] <= record.get("step", 0)]
            continue
        if isinstance(when, (int, float)) and last_time is not None:
            hours += (when - last_time) / 3600
            last_time = when
        if kind == "val" and isinstance(record.get("val_bound_nats"), (int, float)):
            points.append((record["step"], hours, record["val_bound_nats"]))
    return [(step / steps_per_epoch, h, bound) for step, h, bound in points]


def draw_curves(results: list[dict], log_dirs: list[Path], out_dir: Path) -> list[Path]:
    """assets/curves_<dataset>.png per data set with at least one logged run; prints the runs without a log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for dataset in sorted({r["dataset"] for r in results}):
        rows = sorted((r for r in results if r["dataset"] == dataset), key=lambda r: r["run_name"])
        curves, no_log = {}, []
        for r in rows:
            log = find_log(r["run_name"], log_dirs)
            points = (validation_points(log, r["steps"] / r["epochs"])
                      if log and isinstance(r["steps"], int) and r["epochs"] else [])
            if points:
                curves[r["run_name"]] = points
            else:
                no_log.append(r["run_name"])
        for name in no_log:
            print(f"{dataset}: {name}: no log in the tree")
        if not curves:
            print(f"{dataset}: no published run has a log in the tree; no curves drawn")
            continue
        plt.rcParams.update({"font.size": 8, "svg.hashsalt": "vae-mdl"})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100, sharey=True)
        tail = [b for pts in curves.values() for e, _, b in pts if e >= 0.05 * pts[-1][0]]
        for name, pts in curves.items():
            epochs, hours, bounds = zip(*pts)
            axes[0].plot(epochs, bounds, linewidth=1, label=name)
            axes[1].plot(hours, bounds, linewidth=1, label=name)
        axes[0].set_xlabel("epoch")
        axes[1].set_xlabel("hours of training (segments joined)")
        axes[0].set_ylabel("validation bound (nats, higher is better)")
        axes[0].set_ylim(min(tail) - 0.2, max(tail) + 0.2)
        for ax in axes:
            ax.grid(True, linewidth=0.3)
        axes[1].legend(loc="lower right", fontsize=7)
        fig.suptitle(f"{dataset}: validation bound of the published runs, from their log.jsonl")
        if no_log:
            fig.text(0.01, 0.01, "no log in the tree: " + ", ".join(no_log), fontsize=7)
        fig.tight_layout(rect=(0, 0.04 if no_log else 0, 1, 1))
        written.append(save_figure(fig, out_dir / f"curves_{dataset}.png", f"{len(curves)} runs"))
    return written


def save_figure(fig, target: Path, what: str) -> Path:
    """A matplotlib figure as a PNG without a timestamp or software tag (the same figure, the same bytes), written
    atomically; closes the figure."""
    import matplotlib.pyplot as plt

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, target)
    print(f"wrote {target} ({what})")
    return target


def draw_layer_statistics(results: list[dict], out_dir: Path) -> list[Path]:
    """assets/layers_<dataset>.png per data set with a model04 row (the rung with layers to compare): each stochastic
    layer's KL(q || p) in nats and its share of active units, a bar per row, so a collapsed layer (KL near 0, no
    active units) shows at a glance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for dataset in sorted({r["dataset"] for r in results}):
        rows = sorted((r for r in results if r["dataset"] == dataset and r["model"] == "model04"
                       and r.get("latent_layer_stats")), key=lambda r: r["run_name"])
        if not rows:
            continue
        plt.rcParams.update({"font.size": 8})
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), dpi=100)
        width = 0.8 / len(rows)
        for i, r in enumerate(rows):
            stats = r["latent_layer_stats"]
            x = [s["layer"] - 0.4 + width * (i + 0.5) for s in stats]
            axes[0].bar(x, [s["kl_nats"] for s in stats], width, label=r["run_name"])
            axes[1].bar(x, [s["active_units"] / s["units"] for s in stats], width, label=r["run_name"])
        labels = {s["layer"]: f"{s['layer']}\n{s['resolution']}" for r in rows for s in r["latent_layer_stats"]}
        for ax, ylabel in zip(axes, ("KL(q || p) over the test images (nats)", "active units (share of the layer)")):
            ax.set_xticks(sorted(labels), [labels[k] for k in sorted(labels)])
            ax.set_xlabel("stochastic layer (top first) and its resolution")
            ax.set_ylabel(ylabel)
            ax.grid(True, axis="y", linewidth=0.3)
        axes[1].set_ylim(0, 1)
        axes[1].legend(loc="upper left", fontsize=7)
        fig.suptitle(f"{dataset}: what each stochastic layer carries, from result.json (latent_layer_stats)")
        fig.tight_layout()
        written.append(save_figure(fig, out_dir / f"layers_{dataset}.png", f"{len(rows)} rows"))
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "results",
                        help="published results to redraw (default: results/)")
    parser.add_argument("--checkpoints-dir", type=Path, default=REPO_ROOT / "checkpoints",
                        help="weights-only checkpoints <run>.pt (default: checkpoints/)")
    parser.add_argument("--runs-dir", type=Path, default=REPO_ROOT / "runs",
                        help="run directories <run>/best.pt, searched second (default: runs/)")
    parser.add_argument("--data-dir", default=None, help="data root (default: $VAE_DATA_DIR, then ./data)")
    parser.add_argument("--device", choices=["result", "cpu", "cuda"], default="result",
                        help="device to draw on; 'result' (default): the run's own device type, which makes "
                             "the figures bit-identical to the published ones")
    parser.add_argument("--run", action="append", default=None, metavar="RUN_NAME",
                        help="redraw only this run (repeatable)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="keep each run's redrawn figures in OUT_DIR/<run> (default: a temporary directory)")
    parser.add_argument("--dry-run", action="store_true", help="list the commands and missing checkpoints; run nothing")
    parser.add_argument("--curves", action="store_true",
                        help="draw assets/curves_<dataset>.png from the published runs' log.jsonl and "
                             "assets/layers_<dataset>.png from their per-layer statistics, then exit")
    parser.add_argument("--log-dirs", type=Path, nargs="+", default=[REPO_ROOT / "campaign", REPO_ROOT / "runs"],
                        help="where --curves looks for <run>/log.jsonl (default: campaign/ runs/)")
    parser.add_argument("--assets-dir", type=Path, default=REPO_ROOT / "assets",
                        help="where --curves writes its figures (default: assets/)")
    parser.add_argument("--export-checkpoint", type=Path, default=None, metavar="BEST_PT",
                        help="write a weights-only copy of a run's best.pt to --checkpoints-dir, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.export_checkpoint is not None:
            export_checkpoint(args.export_checkpoint, args.checkpoints_dir)
            return 0
        results = load_results(args.results_dir)
        if args.run:
            unknown = sorted(set(args.run) - {r["run_name"] for r in results})
            if unknown:
                raise RegenerateError(f"--run {', '.join(unknown)}: no such result in {args.results_dir}.")
            results = [r for r in results if r["run_name"] in args.run]
    except RegenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        if r["quick"]:
            print(f"skip {r['run_name']}: a --quick run is not a published result (python compare.py refuses it)")
    results = [r for r in results if not r["quick"]]
    if not results:
        print(f"no published results in {args.results_dir}: no figures to redraw.")
        return 0
    if args.curves:
        draw_curves(results, args.log_dirs, args.assets_dir)
        draw_layer_statistics(results, args.assets_dir)
        return 0

    data_dir = args.data_dir or os.environ.get("VAE_DATA_DIR") or "data"  # never the trainer's own path
    gpu = []  # asked once, and only when a result was made on a GPU (importing torch takes seconds)

    def have_gpu() -> bool:
        if not gpu:
            gpu.append(gpu_visible())
        return gpu[0]
    failed, redrawn = [], 0
    with tempfile.TemporaryDirectory(prefix="vae-mdl-figures-") as scratch:
        out_root = args.out_dir or Path(scratch)
        for r in results:
            name = r["run_name"]
            script = REPO_ROOT / f"{r['model']}.py"
            ckpt = find_checkpoint(name, args.checkpoints_dir, args.runs_dir)
            if ckpt is None or not script.is_file():
                why = (f"no checkpoint: neither {args.checkpoints_dir / (name + '.pt')} nor "
                       f"{args.runs_dir / name / 'best.pt'} exists" if ckpt is None else f"{script.name} is missing")
                print(f"MISSING {name}: {why}")
                failed.append(name)
                continue
            device, why = draw_device(r, args.device, have_gpu)
            if why:
                print(why)
            command = [sys.executable, str(script), "--eval-only", "--checkpoint", str(ckpt), "--figures-only",
                       "--publish", "--out-dir", str(out_root / name), "--data-dir", data_dir, "--device", device]
            print(f"{'would run' if args.dry_run else 'redraw'} {name}: {' '.join(command[1:])}")
            if args.dry_run:
                continue
            proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"FAILED {name} (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
                failed.append(name)
            else:
                redrawn += 1
    verb = "would redraw" if args.dry_run else "redrew"
    print(f"{verb} the figures of {len(results) - len(failed)} of {len(results)} results"
          + (f"; not redrawn: {', '.join(failed)}" if failed else "")
          + ("" if args.dry_run or not redrawn else "; assets/ updated (git diff assets/ shows any change)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
