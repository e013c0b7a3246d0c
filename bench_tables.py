"""The speed tables of docs/speed.md, from the reports bench.py writes (results/bench_*.json); compare.py puts them
into their generated blocks:

    bench         training (and evaluation) images/s of ours against the naive loop, per device and thread count
    bench-eval    evaluation samples/s before and after the CPU evaluation defaults changed (previous_cpu_defaults)
    bench-code    a rung's evaluation against its own script at an earlier commit (--baseline-commit)
    bench-chunks  a rung's evaluation at several latents per pass (--eval-chunks): how its default was chosen

Each table has a row per report result that carries what the table shows, the device linked to its report, and a
note per report under it with the command that wrote it.
"""
import json
from pathlib import Path

from paired import commit_label, md_cell as _md, relative_link as _relative


class BenchReportError(RuntimeError):
    """A results/bench_*.json that bench.py did not write."""


def load_benches(results_dir: Path) -> list[dict]:
    """Every results/bench_*.json written by bench.py, in file-name order."""
    benches = []
    for path in sorted(results_dir.glob("bench_*.json")) if results_dir.is_dir() else []:
        try:
            report = json.loads(path.read_text())
            first = report["results"][0]  # the shape bench.py writes: training and/or evaluation (--phases)
            if first["train"]:
                first["train"]["ours"]["images_per_s"]
            else:
                first["eval"]["ours"]["samples_per_s"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise BenchReportError(f"{path} is not a report written by bench.py ({type(e).__name__}: {e}); "
                               f"rerun `python bench.py` or move it out of {results_dir}.") from None
        benches.append({**report, "_path": path})
    return benches


BENCH_HEADER = ("| device | model | threads | batch | training: ours / naive (images/s) | speed-up | "
                "ours with --cpu-bf16 | evaluation: ours / naive (samples/s) | speed-up | "
                "host syncs per step: ours / naive |")


def _bench_note(report: dict, link: str) -> str:
    return (f"- [{link}]({link}): `{report.get('command', '?')}` at commit {commit_label(report)}, "
            f"batch {report['results'][0]['batch_size']}, k={report['results'][0]['importance_samples']}, "
            f"load average {report.get('load_average_1min_at_start', '?')} -> "
            f"{report.get('load_average_1min_at_end', '?')} (other processes on the machine)")


def _bench_table(benches: list[dict], link_base: Path, header: str, row, note=_bench_note) -> str:
    """A table with one row per report result that `row(result)` turns into cells (None: no row), the report's
    device (linked to the report) first, and a note per report under it."""
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    notes = []
    for report in benches:
        link = _relative(report["_path"], link_base)
        for r in report["results"]:
            cells = row(r)
            if cells is not None:
                lines.append(f"| [{report['device']}]({link}) | " + " | ".join(_md(c) for c in cells) + " |")
        notes.append(note(report, link))
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def _training_row(r: dict) -> list[str]:
    train, ev = r["train"], r["eval"]
    bf16 = (f"{train['ours_cpu_bf16']['images_per_s']:.0f} ({train['speedup_cpu_bf16']:.2f}x)"
            if "ours_cpu_bf16" in train else "—")
    syncs = " / ".join(str(train[v].get("host_syncs_per_step", {}).get("total", "?")) for v in ("ours", "naive"))
    evaluation = ([f"{ev['ours']['samples_per_s']:.0f} / {ev['naive']['samples_per_s']:.0f}", f"**{ev['speedup']:.2f}x**"]
                  if ev else ["—", "—"])  # bench.py --phases train
    # the batch sets the step's cost: images/s at batch 20 and at 100 are different measurements
    return [r["model"], str(r["threads"]), str(r["batch_size"]),
            f"{train['ours']['images_per_s']:.0f} / {train['naive']['images_per_s']:.0f}",
            f"**{train['speedup']:.2f}x**", bf16, *evaluation, syncs]


def bench_block(benches: list[dict], link_base: Path) -> str:
    benches = [b for b in benches if b["results"][0]["train"]]  # reports that measured training
    if not benches:
        return "_No benchmark yet: `python bench.py` writes results/bench_<device>.json._"
    return _bench_table(benches, link_base, BENCH_HEADER, _training_row)


EVAL_BENCH_HEADER = ("| device | model | threads | samples/s: previous CPU defaults -> ours | speed-up | naive per-sample "
                     "loop | ours / naive | L_5000 on 10k test images at this rate |")


def _evaluation_row(r: dict) -> list[str] | None:
    ev = r["eval"]
    if "previous_cpu_defaults" not in ev:
        return None
    return [r["model"], str(r["threads"]),
            f"{ev['previous_cpu_defaults']['samples_per_s']:.0f} -> {ev['ours']['samples_per_s']:.0f}",
            f"**{ev['speedup_vs_previous_cpu_defaults']:.2f}x**", f"{ev['naive']['samples_per_s']:.0f}",
            f"{ev['speedup']:.2f}x", f"{ev['hours_for_test_l5000']:.1f} h"]


def _eval_bench_note(report: dict, link: str) -> str:
    ev = report["results"][0]["eval"]
    return _bench_note(report, link) + f"; S={ev['eval_samples']} on {ev['eval_images']} test images per repeat"


def _eval_block(benches: list[dict], link_base: Path, shows, empty: str, header: str, row) -> str:
    """An evaluation table of the reports with a result whose eval phase `shows(eval)` holds for; `empty` without."""
    benches = [b for b in benches if any(shows(r["eval"]) for r in b["results"])]
    if not benches:
        return empty
    return _bench_table(benches, link_base, header, row, _eval_bench_note)


def eval_bench_block(benches: list[dict], link_base: Path) -> str:
    """The evaluation speed of every rung, before and after the CPU evaluation defaults changed (bench.py's
    previous_cpu_defaults variant), from the reports that have it."""
    return _eval_block(benches, link_base, lambda ev: "previous_cpu_defaults" in ev,
                       "_No evaluation benchmark yet: `python bench.py --device cpu --phases eval --models ...`._",
                       EVAL_BENCH_HEADER, _evaluation_row)


CODE_BENCH_HEADER = ("| device | model | threads | settings | samples/s: script at commit -> ours | speed-up | "
                     "per-image values | L_5000 on 10k test images at this rate |")


def _settings(r: dict) -> str:
    """The --set overrides the report's rung ran with, as inline code."""
    return ", ".join(f"`{k}={v}`" for k, v in r.get("config_overrides", {}).items()) or "defaults"


def _code_row(r: dict) -> list[str] | None:
    ev = r["eval"]
    if "baseline" not in ev:
        return None
    return [r["model"], str(r["threads"]), _settings(r),
            f"{ev['baseline']['samples_per_s']:.0f} ({ev['baseline']['commit']}) -> {ev['ours']['samples_per_s']:.0f}",
            f"**{ev['speedup_vs_baseline']:.2f}x**",
            "the same, bit for bit" if ev["baseline"]["same_per_image_values"] else "different",
            f"{ev['hours_for_test_l5000']:.1f} h"]


def code_bench_block(benches: list[dict], link_base: Path) -> str:
    """A rung's evaluation speed against its own script at an earlier commit (bench.py --baseline-commit), from the
    reports that have it."""
    return _eval_block(benches, link_base, lambda ev: "baseline" in ev,
                       "_No such benchmark yet: `python bench.py --phases eval --baseline-commit REV ...`._",
                       CODE_BENCH_HEADER, _code_row)


CHUNK_BENCH_HEADER = ("| device | model | data set | threads | settings | latents per pass: samples/s | fastest | "
                      "L_5000 on 10k test images at the default's rate |")


def _chunk_row(r: dict) -> list[str] | None:
    ev = r["eval"]
    sizes = {ev["chunk_latents"]: ev["ours"]["samples_per_s"]}  # ours: the rung's default for this data
    sizes.update({v["chunk_latents"]: v["samples_per_s"] for name, v in ev.items()
                  if name.startswith("chunk_") and isinstance(v, dict)})  # the variants chunk_N (not chunk_latents)
    if len(sizes) < 2:
        return None
    fastest = max(sizes, key=sizes.get)
    rates = ", ".join(f"{size}{' (default)' if size == ev['chunk_latents'] else ''}: {rate:.0f}"
                      for size, rate in sorted(sizes.items()))
    return [r["model"], r["dataset"], str(r["threads"]), _settings(r), rates,
            f"**{fastest}** ({sizes[fastest] / sizes[ev['chunk_latents']]:.2f}x the default)",
            f"{ev['hours_for_test_l5000']:.1f} h"]


def chunk_bench_block(benches: list[dict], link_base: Path) -> str:
    """A rung's evaluation at several pass sizes (bench.py --eval-chunks), from the reports that have them."""
    return _eval_block(benches, link_base, lambda ev: any(k.startswith("speedup_chunk_") for k in ev),
                       "_No such benchmark yet: `python bench.py --phases eval --eval-chunks N ...`._",
                       CHUNK_BENCH_HEADER, _chunk_row)
