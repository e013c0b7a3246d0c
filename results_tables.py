"""The published results as tables: every results/*.json read and checked, its cells formatted, and the blocks of
README that show rows (results, commands, figures, per-layer statistics). compare.py puts them into README and
docs/; paired.py and bench_tables.py hold the blocks that compare rows image by image and the speed tables.
"""
import ast
import datetime
import json
import math
from pathlib import Path

from paired import commit_label, md_cell as _md, relative_link as _relative

REPO_ROOT = Path(__file__).resolve().parent
# Fields every result.json written by training.py carries (older files may lack the optional ones).
REQUIRED_KEYS = ("model", "run_name", "dataset", "likelihood", "latent_layers", "importance_samples", "objective",
                 "eval_samples", "n_test", "test_ll_nats", "test_ll_stderr", "test_bpd", "steps", "wall_time_s",
                 "device", "device_type", "git_commit", "quick")
FIGURE_KINDS = (("imgs", "test images"), ("recs", "reconstructions"), ("samples", "samples"))
# figures some rungs draw besides those (model04: samples at a lower prior temperature, what each layer encodes);
# a column appears in a rung's figure row when one of its rows has the file
EXTRA_FIGURE_KINDS = (("samples-t0.7", "samples at temperature 0.7"), ("layers", "what each layer encodes"))


class CompareError(RuntimeError):
    """Bad input (results, README markers, flags): one paragraph, exit status 2."""


def dataset_names() -> list[str]:
    """The keys of data.DATASETS, read from data.py's source so that this script needs no torch (CI runs
    --check often); falls back to importing data.py should DATASETS stop being a literal dict."""
    for node in ast.parse((REPO_ROOT / "data.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DATASETS" for t in node.targets):
            try:
                return [ast.literal_eval(key) for key in node.value.keys]
            except (AttributeError, ValueError):
                break
    import data
    return list(data.DATASETS)


# ----------------------------------------------------------------------------- results


def load_results(results_dir: Path, must_exist: bool) -> list[dict]:
    """Every result file of `results_dir` (bench_*.json skipped), validated, sorted for display."""
    if not results_dir.is_dir():
        if must_exist:
            raise CompareError(f"--results-dir {results_dir} is not a directory.")
        return []  # nothing published yet
    results = []
    for path in sorted(results_dir.glob("*.json")):
        if path.name.startswith("bench_"):
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CompareError(f"{path} is not readable JSON ({type(e).__name__}: {e}). Every file in "
                               f"{results_dir} must be a result.json written by `modelNN.py --publish`; "
                               f"restore it or move it out.") from None
        missing = [k for k in REQUIRED_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            raise CompareError(f"{path} lacks {', '.join(missing)}: it was not written by `modelNN.py --publish` "
                               f"(benchmarks belong in bench_*.json). Restore it or move it out of {results_dir}.")
        if not isinstance(record["test_ll_nats"], (int, float)) or not math.isfinite(record["test_ll_nats"]):
            raise CompareError(f"{path}: test_ll_nats is {record['test_ll_nats']!r}, not a finite number; "
                               f"a failed run is not a result. Move it out of {results_dir}.")
        results.append({**record, "_path": path})
    folders = {}  # data set name -> (content hash of its image folder, the first file that named it)
    for r in results:
        if r.get("dataset_sha256"):
            seen = folders.setdefault(r["dataset"], (r["dataset_sha256"], r["_path"]))
            if seen[0] != r["dataset_sha256"]:
                raise CompareError(f"{r['_path']} and {seen[1]} both call their data set {r['dataset']!r} but were "
                                   f"made on image folders with different content (dataset_sha256 "
                                   f"{r['dataset_sha256'][:16]}... and {seen[0][:16]}...): rename one folder and "
                                   f"run it again, or move one result out of {results_dir}.")
    return sorted(results, key=lambda r: (r["model"], r["dataset"], r["latent_layers"], r["objective"],
                                          r["importance_samples"], r["run_name"]))


def layers_block(results: list[dict], model: str, link_base: Path) -> str:
    """Per stochastic layer of each of the model's rows (result.json's latent_layer_stats, over the test images):
    its resolution, units, KL(q || p) in nats and active units -- a collapsed layer shows as a KL near 0."""
    rows = [r for r in results if r["model"] == model and r.get("latent_layer_stats")]
    if not rows:
        return f"_No published {model} row has per-layer statistics yet._"
    header = ["row", "layer", "resolution", "units", "KL (nats)", "active units"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        link = f"[{r['run_name']}]({_relative(r['_path'], link_base)})"
        for i, layer in enumerate(r["latent_layer_stats"]):
            lines.append("| " + " | ".join([link if i == 0 else "", str(layer["layer"]), layer["resolution"],
                                            f"{layer['units']:,}", f"{layer['kl_nats']:.2f}",
                                            f"{layer['active_units']:,}"]) + " |")
    return "\n".join(lines)


def refuse_quick(results: list[dict]):
    quick = [r["_path"] for r in results if r["quick"]]
    if quick:
        raise CompareError(f"{', '.join(str(p) for p in quick)} {'is a' if len(quick) == 1 else 'are'} --quick "
                           f"run{'s' if len(quick) > 1 else ''}: tiny runs for testing, never published numbers, "
                           f"so they never enter the README. Delete {'it' if len(quick) == 1 else 'them'} from "
                           f"results/ (and publish a full run instead).")


# ----------------------------------------------------------------------------- cells


def format_duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def device_label(r: dict) -> str:
    """The device as written by runtime.device_name; a CPU run always reads as one."""
    label = str(r["device"])
    if r["device_type"] == "cpu" and not label.upper().startswith("CPU"):
        label = f"CPU ({label})"
    world = r.get("world_size") or 1
    return f"{world} × {label}" if world > 1 else label


def ll_label(r: dict) -> str:
    stderr = r["test_ll_stderr"]
    if isinstance(stderr, (int, float)) and math.isfinite(stderr):
        return f"{r['test_ll_nats']:.2f} ± {stderr:.2f}"
    return f"{r['test_ll_nats']:.2f}"


def wall_time_label(r: dict) -> str:
    if r.get("evaluated_checkpoint"):  # an --eval-only re-evaluation: its own wall time is the evaluation's
        return f"{format_duration(r.get('train_time_s'))} training + {format_duration(r.get('eval_time_s'))} eval"
    return format_duration(r["wall_time_s"])


def steps_label(r: dict) -> str:
    steps = r["steps"]
    text = f"{steps:,}" if isinstance(steps, int) else str(steps)
    return text + (" (time limit)" if r.get("stopped_by_time_limit") else "")


# Data sets whose bits/dim look like a literature benchmark's but are not: said beside every such number.
BPD_CAVEATS = {"cifar10-jpeg": ("JPEG copy", "cifar10-jpeg is CIFAR-10 re-encoded as JPEG quality 75 with 4:2:0 "
                                "chroma: JPEG removed detail and colour resolution, so its bits/dim are lower than "
                                "CIFAR-10's and never compare with CIFAR-10 numbers in the literature.")}


def bpd_label(r: dict) -> str:
    if r["test_bpd"] is None:
        return "—"
    caveat = BPD_CAVEATS.get(r["dataset"])
    return f"{r['test_bpd']:.3f}" + (f" ({caveat[0]}, not comparable with the literature)" if caveat else "")


def bpd_notes(results: list[dict]) -> str:
    """The caveat of every data set in `results` that has one, as a note under a table ('' when none)."""
    notes = [BPD_CAVEATS[d][1] for d in sorted({r["dataset"] for r in results}) if d in BPD_CAVEATS]
    return "".join(f"\n\n_{note}_" for note in notes)


COLUMNS = [  # (header, cell) in display order
    ("model", lambda r: r["model"] + (" [QUICK: not a published number]" if r["quick"] else "")),
    ("dataset", lambda r: r["dataset"]),
    ("p(x|z)", lambda r: r["likelihood"]),
    ("latent layers", lambda r: str(r["latent_layers"])),
    ("training objective", lambda r: f"{r['objective'].upper()}, k={r['importance_samples']}"),
    ("eval samples S", lambda r: f"{r['eval_samples']:,}"),
    ("test images", lambda r: f"{r['n_test']:,}"),
    ("test log-likelihood L_S (nats)", ll_label),
    ("bits/dim", bpd_label),
    ("steps", steps_label),
    ("wall time", wall_time_label),
    ("device", device_label),
    ("commit", commit_label),
]

# the comparison at the end of README: one line per result, the full rows stand in each rung's block
COMPARISON_COLUMNS = [c for c in COLUMNS if c[0] in ("model", "dataset", "latent layers", "training objective",
                                                      "eval samples S", "test log-likelihood L_S (nats)", "bits/dim")]
COMPARISON_COLUMNS.insert(2, ("p(x|z)", lambda r: r["likelihood"].split(" (")[0]))
COMPARISON_COLUMNS.append(("device", lambda r: "CPU" if r["device_type"] == "cpu" else device_label(r)))


# ----------------------------------------------------------------------------- tables


def terminal_table(results: list[dict], dataset: str | None = None) -> str:
    if not results:
        return (f"no published results on {dataset}" if dataset else
                "no published results yet (results/ holds no result files)")
    rows = [[h for h, _ in COLUMNS]] + [[cell(r) for _, cell in COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(r["quick"] for r in results):
        lines.append("QUICK rows are tiny --quick runs: never published numbers (README output refuses them).")
    return "\n".join(lines)


def markdown_table(results: list[dict], link_base: Path, empty: str, columns=COLUMNS) -> str:
    """README form: each model cell links to its result file, so every number has its source."""
    if not results:
        return empty
    lines = ["| " + " | ".join(_md(h) for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        cells = [_md(cell(r)) for _, cell in columns]
        cells[0] = f"[{cells[0]}]({_relative(r['_path'], link_base)})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NO_RESULTS = ("_No published results yet: `results/` holds no result files. A full run with `--publish` writes "
              "one, then `python compare.py --update-readme` fills this table._")


def results_block(results: list[dict], model: str | None, link_base: Path) -> str:
    if model is None:
        table = markdown_table(results, link_base, NO_RESULTS, COMPARISON_COLUMNS)
        if not results:
            return table
        n_cpu = sum(r["device_type"] == "cpu" for r in results)
        cpu_note = (f" {n_cpu} of them ran on a CPU; each rung's table above has the full row (steps, wall time, "
                    f"commit)." if n_cpu else "")
        return (table + f"\n\n_Generated by `python compare.py --update-readme` from {len(results)} file"
                f"{'s' if len(results) > 1 else ''} in `results/`.{cpu_note}_" + bpd_notes(results))
    rows = [r for r in results if r["model"] == model]
    if not rows:
        return f"_No published results for {model} yet._"
    commands = _relative(REPO_ROOT / COMMANDS_DOC, link_base)
    return (markdown_table(rows, link_base, "") + bpd_notes(rows) + f"\n\n_Each model cell links to the row's result "
            f"file; the command behind each row is in [{COMMANDS_DOC}]({commands}#{model})._")


COMMANDS_DOC = "docs/commands.md"  # the <!-- commands:MODEL --> blocks: every row's command, away from README


def commands_block(results: list[dict], model: str) -> str:
    """The commands that produced the model's rows (and, for a re-scored row, the run that trained its weights)."""
    rows = [r for r in results if r["model"] == model]
    if not rows:
        return f"_No published results for {model} yet._"
    return "\n".join(f"- `{r['run_name']}`: `{r.get('command', '?')}`" + _earlier_commands(r) for r in rows)


def _earlier_commands(r: dict) -> str:
    """A re-scored row's earlier numbers (publishing.publish_result keeps them, with their commands, in
    previous_results), oldest first; the command only of the first, the run that trained the weights."""
    earlier = [p for p in r.get("previous_results") or [] if isinstance(p.get("test_ll_nats"), (int, float))]
    return "".join(f"; before it, L_{p.get('eval_samples')} = {p['test_ll_nats']:.2f} nats on {p.get('n_test', 0):,} "
                   f"images" + (f" from `{p.get('command', '?')}`" if i == 0 else "") for i, p in enumerate(earlier))


# ----------------------------------------------------------------------------- figures


def _date(r: dict) -> datetime.datetime:
    try:
        return datetime.datetime.fromisoformat(r.get("date", ""))
    except (TypeError, ValueError):
        return datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)


def figure_groups(results: list[dict], assets_dir: Path, kinds=FIGURE_KINDS) -> list[tuple[dict, int, dict]]:
    """Per (figure prefix, dataset): the newest result (its --publish wrote the files in assets/ last),
    how many results share those files, and {kind: path or None} for `kinds`."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r.get("figure_prefix") or r["model"], r["dataset"]), []).append(r)
    out = []
    for (prefix, dataset), members in sorted(groups.items()):
        newest = max(members, key=_date)
        paths = {kind: assets_dir / f"{prefix}_{dataset}_{kind}.png" for kind, _ in kinds}
        out.append((newest, len(members), {k: p if p.is_file() else None for k, p in paths.items()}))
    return out


def figures_block(results: list[dict], model: str, assets_dir: Path, link_base: Path) -> str:
    rows = [r for r in results if r["model"] == model]
    if not rows:
        return f"_No published figures for {model} yet._"
    extras = [(kind, title) for kind, title in EXTRA_FIGURE_KINDS
              if any(paths[kind] for _, _, paths in figure_groups(rows, assets_dir, [(kind, title)]))]
    kinds = [*FIGURE_KINDS, *extras]
    lines = ["| run | " + " | ".join(title for _, title in kinds) + " |", "|" + "---|" * (1 + len(kinds))]
    missing = False
    for newest, count, paths in figure_groups(rows, assets_dir, kinds):
        run = f"`{newest['run_name']}`" + (f" (newest of {count} runs sharing these figures)" if count > 1 else "")
        cells = []
        for kind, title in kinds:
            if paths[kind] is None:
                missing = True
                cells.append("_not in assets/_")
            else:
                cells.append(f"![{title}]({_relative(paths[kind], link_base)})")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    if missing:
        lines.append("\n_Some figures are missing from `assets/`: `python regenerate_figures.py` redraws them from "
                     "the published checkpoints._")
    return "\n".join(lines)
