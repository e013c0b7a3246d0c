"""Every published test-set log-likelihood in one table, and the README kept in step with it.

    python compare.py                          # the table, in the terminal
    python compare.py --markdown               # the same table in README form
    python compare.py --dataset binarized-mnist
    python compare.py --update-readme          # rewrite README's generated blocks from results/
    python compare.py --check                  # exit 1 with a diff when README disagrees with results/ (CI)
    python compare.py --paired                 # rows scored on the same test images, compared image by image

The numbers come from results/*.json, one file per published number, each written by
`python modelNN.py ... --publish` (bench_*.json files are benchmarks and are skipped). A result evaluated since
per-image values are kept names results/per_image/<run name>.npy (every test image's L_S, checked by sha256):
two such rows on the same data set, test images and S differ by mean(a_i - b_i), and the standard error of
that mean (the paired one) leaves out the spread between images that both rows share. A --quick run is
never a published number: the terminal table flags it, and everything written for the README refuses it.

README holds generated blocks between marker comments; everything between a pair is overwritten, so
write prose outside them:
    <!-- results:start --> ... <!-- results:end -->                every result: the comparison table
    <!-- results:MODEL:start --> ... <!-- results:MODEL:end -->    one rung's results and their commands
    <!-- figures:MODEL:start --> ... <!-- figures:MODEL:end -->    one rung's figure rows (from assets/)
    <!-- bench:start --> ... <!-- bench:end -->                    the speed table, from results/bench_*.json
    <!-- bench-eval:start --> ... <!-- bench-eval:end -->          evaluation speed before/after, same files
    <!-- bench-code:start --> ... <!-- bench-code:end -->          a script's evaluation against the script at a commit
    <!-- bench-chunks:start --> ... <!-- bench-chunks:end -->      a rung's evaluation at several latents per pass
    <!-- paired:MODEL:start --> ... <!-- paired:MODEL:end -->      one rung's rows compared image by image
    <!-- paired:DATASET:start --> ... <!-- paired:DATASET:end -->  every rung's rows on one data set, the same way
    <!-- ablation:DATASET:start --> ... <!-- ablation:DATASET:end -->  what each fix buys inside model04 (paired.py)
    <!-- ladder:DATASET:start --> ... <!-- ladder:DATASET:end -->  each step up the ladder in bits/dim (paired.py)
    <!-- sentence:NAME:start --> ... <!-- sentence:NAME:end -->    a sentence with numbers, written by SENTENCES[NAME]
The markdown files of docs/ beside README may hold the same blocks (docs/speed.md holds the speed tables): they are
updated and checked with README, their links relative to their own folder.

--check fails (exit 1) when a generated block differs from what results/ say, when README shows an image that does
not exist, or when README's prose carries a number typed by hand. Every number README shows must come from a
generated block; the rule, applied line by line to README.md only:
  - not checked: generated blocks, fenced code blocks, headings (rung numbers), HTML comments, `inline code`
    (commands, flag values, file names), link targets, and the sections whose heading says "not measured here"
    (the literature table: other papers' numbers, quoted as citations);
  - in what is left, a number is a run of digits (with , or . between digits). It is allowed when it is part of a
    name or a setting: glued to a letter, digit or _ before it (model01, L_5000, z_1), after = or ^ (k=5, S=5000,
    2^18), after a word and a hyphen (batch-20), a size AxB (28x28, 4×4), a compound word (8-bit, 1-layer), a year after "et al." (Burda et al. 2015), or
    an ordered-list marker at the start of a line. Every other number fails the check, with its line: write it as a
    sentence block (SENTENCES below), move it into a table block, or leave it out.
"""
import argparse
import difflib
import math
import os
import re
import sys
from pathlib import Path

from bench_tables import (BenchReportError, bench_block, chunk_bench_block, code_bench_block, eval_bench_block,
                          load_benches)
from paired import (LADDER_ROWS, PAIRED_COLUMNS, PairedError, ablation_block, ladder_block, paired_block,
                    paired_cells, paired_comparisons)
from results_tables import (REPO_ROOT, CompareError, commands_block, dataset_names, figures_block, format_duration,
                            layers_block, ll_label, load_results, refuse_quick, results_block, terminal_table)

MARKER = re.compile(r"<!-- (results|figures|bench-eval|bench-code|bench-chunks|bench|paired|ablation|ladder|sentence|"
                    r"layers|commands)(?::([A-Za-z0-9_.-]+))?:(start|end) -->")
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)[^)]*\)|<img\s[^>]*src=\"([^\"]+)\"")
MAX_DIFF_LINES = 60


# ----------------------------------------------------------------------------- sentences


# Burda et al. 2015, Table 1, IWAE k=5, L_5000 (README's literature table, "not measured here"): a citation, the one
# number a sentence takes from outside results/.
BURDA_IWAE_K5_NATS = -85.54
MODEL01_RUNS = {"default": "model01_binarized-mnist_iwae_k5_seed0",
                "burda": "model01_binarized-mnist_iwae_k5_initburda_seed0",
                "b20": "model01_binarized-mnist_iwae_k5_b20_seed0",
                "b20 burda": "model01_binarized-mnist_iwae_k5_b20_initburda_seed0"}


def _row(results: list[dict], run_name: str) -> dict | None:
    return next((r for r in results if r["run_name"] == run_name), None)


def _gap(results: list[dict], a: str, b: str) -> str | None:
    """'+0.35 nats (paired SE 0.029)' for two published rows on the same test images, None when not both have
    per-image values."""
    for p in paired_comparisons([r for r in results if r["run_name"] in (a, b)]):
        sign = 1 if p["a"]["run_name"] == a else -1
        return f"{sign * p['diff_nats']:+.2f} nats (paired SE {p['paired_stderr']:.3f})"
    return None


def sentence_model01_recipe(results: list[dict]) -> str:
    """What the initialisation and the batch size are worth, image by image, among the four model01 runs."""
    g = {k: _gap(results, MODEL01_RUNS[a], MODEL01_RUNS[b]) for k, (a, b) in {
        "init100": ("burda", "default"), "init20": ("b20 burda", "b20"), "batch_default": ("b20", "default"),
        "batch_burda": ("b20 burda", "burda"), "both": ("b20 burda", "default")}.items()}
    if any(v is None for v in g.values()):
        return "_The four model01 runs do not all carry per-image values yet: no paired gains to state._"
    return (f"On the same test images, `--init burda` gains {g['init100']} at batch 100 and {g['init20']} at batch 20; "
            f"the batch of 20 gains {g['batch_default']} with PyTorch's default initialisation and {g['batch_burda']} "
            f"with `--init burda`; both together gain {g['both']}.")


def sentence_model01_paper(results: list[dict]) -> str:
    """The best model01 row against the paper's IWAE k=5 number."""
    rows = [r for r in results if r["model"] == "model01" and r["dataset"] == "binarized-mnist"]
    if not rows:
        return "_No model01 row on binarized-mnist yet._"
    best = max(rows, key=lambda r: r["test_ll_nats"])
    diff = best["test_ll_nats"] - BURDA_IWAE_K5_NATS
    return (f"The best model01 row, `{best['run_name']}`, reaches {ll_label(best)} nats at S={best['eval_samples']:,}: "
            f"{diff:+.2f} nats from Burda et al.'s IWAE k=5 ({BURDA_IWAE_K5_NATS:.2f}, the literature table), "
            f"{'inside' if abs(diff) <= best['test_ll_stderr'] else 'outside'} its own standard error.")


def _bound_sentence(model: str):
    def sentence(results: list[dict]) -> str:
        bounded = _row(results, f"{model}_fashion-mnist_iwae_k5_seed0")
        unbounded = _row(results, f"{model}_fashion-mnist_iwae_k5_unbounded_seed0")
        if bounded is None or unbounded is None:
            return f"_The bounded and unbounded {model} rows are not both published yet._"
        diff = bounded["test_ll_nats"] - unbounded["test_ll_nats"]
        combined = math.hypot(bounded["test_ll_stderr"], unbounded["test_ll_stderr"])
        same_s = bounded["eval_samples"] == unbounded["eval_samples"]
        at = (f"both at S={bounded['eval_samples']:,}" if same_s else
              f"at S={bounded['eval_samples']:,} and S={unbounded['eval_samples']:,}")
        return (f"The bounded row is {diff:+.2f} nats from the unbounded one ({bounded['test_bpd']:.3f} against "
                f"{unbounded['test_bpd']:.3f} bits/dim, {at}): {abs(diff) / combined:.1f} times their combined "
                f"standard error ({combined:.2f} nats).")
    sentence.__doc__ = f"{model}: the bounded row against the unbounded one."
    return sentence


def sentence_model04(results: list[dict]) -> str:
    """model04 against the earlier rungs: model01's rows on binarized MNIST, the best bits/dim on Fashion-MNIST."""
    parts = []
    hier = _row(results, "model04_binarized-mnist_vae_k1_L6_w32_seed0")
    m01 = [r for r in results if r["model"] == "model01" and r["dataset"] == "binarized-mnist"]
    if hier is not None and m01:
        below = sum(r["test_ll_nats"] < hier["test_ll_nats"] for r in m01)
        parts.append(f"On binarized MNIST model04 reaches {ll_label(hier)} nats after "
                     f"{format_duration(hier.get('train_time_s', hier['wall_time_s']))} of training, above {below} of "
                     f"the {len(m01)} model01 rows, whose training took "
                     f"{format_duration(min(r.get('train_time_s') or 0 for r in m01))} to "
                     f"{format_duration(max(r.get('train_time_s') or 0 for r in m01))}.")
        best01 = max(m01, key=lambda r: r["test_ll_nats"])
        gap = _gap(results, hier["run_name"], best01["run_name"])
        if gap is not None:
            parts.append(f"Image by image on the same test images it is {gap} from the best model01 row "
                         f"(`{best01['run_name']}`).")
        margin = hier["test_ll_nats"] - best01["test_ll_nats"]
        met = hier["eval_samples"] >= 5000 and hier["test_ll_nats"] >= -82.0 and margin >= 3.0
        parts.append(f"The goal (`L_5000 >= -82` nats, three above the best model01 row) is "
                     f"{'met' if met else 'not met yet'}: it is {abs(margin):.2f} nats "
                     f"{'above' if margin >= 0 else 'below'} that row.")
    fashion = {}
    for r in results:
        if r["dataset"] == "fashion-mnist" and r["test_bpd"] is not None:
            if r["model"] not in fashion or r["test_bpd"] < fashion[r["model"]]["test_bpd"]:
                fashion[r["model"]] = r
    if "model04" in fashion and len(fashion) > 1:
        others = "; ".join(f"{m} {r['test_bpd']:.3f}" for m, r in sorted(fashion.items()) if m != "model04")
        parts.append(f"On Fashion-MNIST it has {fashion['model04']['test_bpd']:.3f} bits/dim (best row of each "
                     f"earlier rung: {others}).")
    return " ".join(parts) or "_No model04 row to compare yet._"


SENTENCES = {
    "model01-recipe": sentence_model01_recipe,
    "model01-paper": sentence_model01_paper,
    "model02-bound": _bound_sentence("model02"),
    "model03-bound": _bound_sentence("model03"),
    "model04": sentence_model04,
}


# ----------------------------------------------------------------------------- numbers in prose


NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
INLINE_CODE = re.compile(r"(`+).+?\1")
HTML_COMMENT = re.compile(r"<!--.*?-->")
LINK_TARGET = re.compile(r"\]\([^)]*\)|https?://\S+")
EXEMPT_HEADING = "not measured here"


def _allowed_number(line: str, start: int, end: int) -> bool:
    before, after = line[start - 1:start] if start else "", line[end:end + 1]
    if before and (before.isalnum() or before in "_=^"):
        return True  # part of a name or a setting: model01, L_5000, k=5, 2^18
    if before == "-" and start >= 2 and line[start - 2].isalpha():
        return True  # a compound name: batch-20, top-1
    if re.match(r"(?:st|nd|rd|th|D)\b", line[end:]):
        return True  # an ordinal or a dimension: 3rd, 2D
    if after in "x×" and line[end + 1:end + 2].isdigit():
        return True  # a size: 28x28, 4×4
    if before in "x×" and start >= 2 and line[start - 2].isdigit():
        return True
    if after == "-" and line[end + 1:end + 2].isalpha():
        return True  # a compound word: 8-bit, 1-layer
    if re.search(r"et al\.,? $", line[:start]):
        return True  # a citation's year
    if not line[:start].strip() and line[end:end + 2] == ". ":
        return True  # an ordered-list marker
    return False


def typed_numbers(text: str) -> list[tuple[int, str, str]]:
    """(line number, number, the line) for every number in README's prose that no generated block wrote (the rule in
    this module's docstring)."""
    found, in_block, in_fence, exempt_level = [], False, False, None
    for lineno, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        markers = list(MARKER.finditer(raw))
        if markers:
            in_block = markers[-1].group(3) == "start"
            continue
        if in_block:
            continue
        if stripped.startswith("```") or stripped.startswith("~~~"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        heading = re.match(r"(#+)\s", stripped)
        if heading:
            level = len(heading.group(1))
            if exempt_level is not None and level <= exempt_level:
                exempt_level = None
            if EXEMPT_HEADING in stripped.lower():
                exempt_level = level
            continue
        if exempt_level is not None:
            continue
        line = LINK_TARGET.sub("]", INLINE_CODE.sub("``", HTML_COMMENT.sub("", raw)))
        for m in NUMBER.finditer(line):
            if not _allowed_number(line, m.start(), m.end()):
                found.append((lineno, m.group(0), raw.strip()))
    return found


# ----------------------------------------------------------------------------- README


def render_readme(text: str, results: list[dict], assets_dir: Path, link_base: Path,
                  benches: list[dict] = ()) -> str:
    """README text with every generated block rewritten from `results` (and `benches`, bench_*.json)."""
    out, pos, open_marker = [], 0, None
    datasets = {r["dataset"] for r in results}

    def where(match):
        return f"line {text.count(chr(10), 0, match.start()) + 1}"

    for m in MARKER.finditer(text):
        kind, model, edge = m.groups()
        if edge == "start":
            if open_marker is not None:
                raise CompareError(f"README {where(m)}: {m.group(0)} opens inside the block opened by "
                                   f"{open_marker.group(0)} ({where(open_marker)}); close that block first.")
            if kind == "sentence" and model not in SENTENCES:
                raise CompareError(f"README {where(m)}: {m.group(0)} names no sentence compare.py writes; known: "
                                   f"{', '.join(sorted(SENTENCES))}.")
            if kind == "ladder" and model not in LADDER_ROWS:
                raise CompareError(f"README {where(m)}: {m.group(0)} names {model}, which has no ladder in "
                                   f"paired.LADDER_ROWS ({', '.join(LADDER_ROWS)}); fix the marker.")
            if kind == "ablation" and model not in dataset_names():
                raise CompareError(f"README {where(m)}: {m.group(0)} names {model}, which is not a data set of "
                                   f"data.py ({', '.join(dataset_names())}); fix the marker.")
            if (model is not None and kind not in ("sentence", "ablation", "ladder")
                    and not (REPO_ROOT / f"{model}.py").is_file()
                    and not (kind == "paired" and model in datasets)):  # (a paired block may name a data set)
                raise CompareError(f"README {where(m)}: {m.group(0)} names {model}, but there is no {model}.py "
                                   f"in {REPO_ROOT}" + (" and no published row on a data set of that name"
                                                        if kind == "paired" else "") + "; fix the marker.")
            out.append(text[pos:m.end()])
            open_marker = m
        else:
            if open_marker is None or open_marker.groups()[:2] != (kind, model):
                raise CompareError(f"README {where(m)}: {m.group(0)} closes no open "
                                   f"<!-- {kind}{':' + model if model else ''}:start --> block.")
            if kind == "results":
                block = results_block(results, model, link_base)
            elif kind == "bench":
                block = bench_block(benches, link_base)
            elif kind == "bench-eval":
                block = eval_bench_block(benches, link_base)
            elif kind == "bench-code":
                block = code_bench_block(benches, link_base)
            elif kind == "bench-chunks":
                block = chunk_bench_block(benches, link_base)
            elif model is None:
                raise CompareError(f"README {where(open_marker)}: a {kind} block needs a model, e.g. "
                                   f"<!-- {kind}:model01:start -->.")
            elif kind == "paired":
                block = paired_block(results, model, link_base)
            elif kind == "ablation":
                block = ablation_block(results, model, link_base)
            elif kind == "ladder":
                block = ladder_block(results, model, link_base)
            elif kind == "sentence":
                block = SENTENCES[model](results)
            elif kind == "layers":
                block = layers_block(results, model, link_base)
            elif kind == "commands":
                block = commands_block(results, model)
            else:
                block = figures_block(results, model, assets_dir, link_base)
            out.append("\n" + block + "\n")
            pos, open_marker = m.start(), None
    if open_marker is not None:
        raise CompareError(f"README {where(open_marker)}: {open_marker.group(0)} is never closed.")
    out.append(text[pos:])
    return "".join(out)


def missing_images(text: str, base: Path) -> list[str]:
    """Relative image paths README shows that do not exist."""
    missing = []
    for m in IMAGE_LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z]+:", target) or target.startswith("#"):  # http(s):, data: ... not ours to check
            continue
        if not (base / target.split("#")[0]).is_file():
            missing.append(target)
    return missing


def read_readme(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError as e:
        raise CompareError(f"cannot read README {path} ({e.strerror}); point --readme at it.") from None
    if not MARKER.search(text):
        raise CompareError(f"README {path} has no generated block: add a <!-- results:start --> line and a "
                           f"<!-- results:end --> line where the comparison table belongs.")
    return text


def check_readme(readme: Path, expected: str, current: str, prose_rule: bool = True) -> int:
    problems = 0
    if current != expected:
        diff = list(difflib.unified_diff(current.splitlines(), expected.splitlines(),
                                         f"{readme} (as it is)", f"{readme} (as results/ say)", lineterm="", n=1))
        print(f"{readme.name} is out of date with results/: run `python compare.py --update-readme`.\n")
        print("\n".join(diff[:MAX_DIFF_LINES]))
        if len(diff) > MAX_DIFF_LINES:
            print(f"... ({len(diff) - MAX_DIFF_LINES} more diff lines)")
        problems += 1
    missing = missing_images(current, readme.parent)
    if missing:
        print(f"{readme.name} shows images that do not exist: {', '.join(missing)}. Publish or regenerate them "
              f"(`python regenerate_figures.py`), or remove the links.")
        problems += 1
    typed = typed_numbers(current) if prose_rule else []
    if typed:
        print(f"{readme.name} has numbers typed by hand in its prose (every number must come from a generated block; "
              f"see `python compare.py --help` for the rule):")
        for lineno, number, line in typed[:MAX_DIFF_LINES]:
            print(f"  line {lineno}: {number!r} in: {line[:160]}")
        problems += 1
    if not problems:
        print(f"{readme.name} agrees with results/ (generated blocks, images"
              f"{' and numbers in prose' if prose_rule else ''} checked).")
    return 1 if problems else 0


def docs_with_blocks(readme: Path) -> list[Path]:
    """The markdown files of docs/ beside README that hold generated blocks."""
    docs = readme.parent / "docs"
    return [p for p in sorted(docs.glob("*.md")) if MARKER.search(p.read_text())] if docs.is_dir() else []


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--markdown", action="store_true", help="print the table in README (markdown) form")
    mode.add_argument("--update-readme", action="store_true",
                      help="rewrite README's generated blocks (between <!-- results...:start/end --> markers)")
    mode.add_argument("--paired", action="store_true",
                      help="print every two rows on the same test images compared image by image (paired SE)")
    mode.add_argument("--check", action="store_true",
                      help="exit 1 with a diff when README's generated blocks differ from what results/ say, "
                           "README shows a missing image, or README's prose has a number typed by hand")
    parser.add_argument("--dataset", default=None,
                        help=f"show only results on this data set: one of {', '.join(dataset_names())} or an image "
                             f"folder's name (terminal and --markdown tables only)")
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md",
                        help="README to update or check (default: the repo's README.md)")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="directory of result files (default: results/ next to this script)")
    parser.add_argument("--assets-dir", type=Path, default=None,
                        help="directory of published figures (default: assets/ next to this script)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad flags: argparse prints usage and exits 2
    try:
        if args.dataset and (args.update_readme or args.check):
            raise CompareError("--dataset filters a printed table; README blocks always hold every result.")
        results = load_results(args.results_dir or REPO_ROOT / "results", must_exist=args.results_dir is not None)
        assets_dir = args.assets_dir or REPO_ROOT / "assets"
        if args.dataset:
            known = set(dataset_names()) | {r["dataset"] for r in results}
            if args.dataset not in known:
                raise CompareError(f"--dataset {args.dataset!r} is neither a data set of data.py nor the data set of a "
                                   f"result: choose one of {', '.join(sorted(known))}.")
            results = [r for r in results if r["dataset"] == args.dataset]
        if not (args.markdown or args.update_readme or args.check or args.paired):
            print(terminal_table(results, args.dataset))
            return 0
        refuse_quick(results)
        if args.paired:  # (a --quick row is refused above)
            pairs = paired_comparisons(results)
            if not pairs:
                print("no two published rows on the same test images have per-image log-likelihoods "
                      "(results/per_image/)")
            for p in pairs:
                print("  ".join(f"{h}: {c}" for h, c in zip(PAIRED_COLUMNS, paired_cells(p))))
            return 0
        if args.markdown:
            print(results_block(results, None, args.readme.parent) if results or not args.dataset
                  else f"_No published results on {args.dataset}._")
            return 0
        current = read_readme(args.readme)
        files = [(args.readme, current)] + [(p, p.read_text()) for p in docs_with_blocks(args.readme)]
        # bench reports are read (and must be valid) only when a file has a block that shows them
        benches = (load_benches(args.results_dir or REPO_ROOT / "results")
                   if any("<!-- bench" in text for _, text in files) else [])
        status = 0
        for path, text in files:
            expected = render_readme(text, results, assets_dir, path.parent, benches)
            if args.check:
                status = max(status, check_readme(path, expected, text, prose_rule=path == args.readme))
            elif expected == text:
                print(f"{path} is already up to date ({len(results)} results).")
            else:
                tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                tmp.write_text(expected)
                os.replace(tmp, path)
                print(f"updated the generated blocks of {path} from {len(results)} results.")
        return status
    except (CompareError, PairedError, BenchReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
