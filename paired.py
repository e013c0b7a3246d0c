"""Published rows compared image by image: the paired differences of compare.py, and model04's ablation table.

Two rows scored on the same test images differ by mean_i (a_i - b_i), where a_i, b_i are the per-image bounds that
results/per_image/<run name>.npy hold (test-set order). The standard error of that mean (the paired SE) leaves out
the spread between images that both rows share, which dominates the rows' own standard errors. A row scored on the
first N test images (`--n-test N`) pairs with a row scored on more of them over those N: every evaluation takes the
test images in one fixed order, so the first N are the same images.

The ablation block reads the same pairs as fixes: two model04 rows whose configurations differ in exactly one factor
(ABLATION_FACTORS) and agree in everything else that shapes what is learned (HELD_EQUAL, the steps trained) form
one row of "what this fix buys", in bits/dim with its paired SE.
"""
import hashlib
import io
import math
import os
from pathlib import Path


class PairedError(RuntimeError):
    """A per-image file that is missing or not the one its result was published with."""


def md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def relative_link(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def commit_label(r: dict) -> str:
    commit = str(r["git_commit"])
    if commit == "unknown":
        return "unknown"
    dirty = commit.endswith("-dirty")
    return commit[:7] + (" (uncommitted changes)" if dirty else "")


def load_per_image(r: dict):
    """The row's per-image test log-likelihoods (numpy float64, test-set order), or None when it has none."""
    rel = r.get("test_ll_per_image")
    if not rel:
        return None
    import numpy as np  # (only here: the tables need no numpy)

    path = r["_path"].parent / rel
    if not path.is_file():
        raise PairedError(f"{r['_path']} names per-image values {rel}, which do not exist ({path}). Restore the "
                          f"file from git (it is published with the result) or publish the run again.")
    payload = path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != r.get("test_ll_per_image_sha256"):
        raise PairedError(f"{path} is not the file {r['_path'].name} was published with (its sha256 differs). "
                          f"Restore it from git or publish the run again.")
    values = np.load(io.BytesIO(payload), allow_pickle=False)
    if values.shape != (r["n_test"],) or abs(float(values.mean()) - r["test_ll_nats"]) > 1e-6 * abs(r["test_ll_nats"]):
        raise PairedError(f"{path} holds {values.shape} values with mean {float(values.mean()):.6f}, not the "
                          f"{r['n_test']} test images of {r['_path'].name} with mean {r['test_ll_nats']:.6f}.")
    return values


def _same_images(a: dict, b: dict) -> bool:
    """Same data set and S, and for an image folder the same content (the order of its test images follows it)."""
    if (a["dataset"], a["eval_samples"]) != (b["dataset"], b["eval_samples"]):
        return False
    return a.get("dataset_sha256") == b.get("dataset_sha256") or not (a.get("dataset_sha256") and b.get("dataset_sha256"))


def paired_comparisons(results: list[dict], rung_or_dataset: str | None = None) -> list[dict]:
    """Every two rows (of one rung, of every rung on one data set -- model04 against model01 on binarized-mnist --
    or all) on the same data set and S that both have per-image values, over the test images both scored (the first
    min(n_a, n_b)): L(a) - L(b) with its paired standard error, and the unpaired one it replaces."""
    rows = [(r, v) for r in results if rung_or_dataset is None or rung_or_dataset in (r["model"], r["dataset"])
            for v in [load_per_image(r)] if v is not None]
    pairs = []
    for i, (a, va) in enumerate(rows):
        for b, vb in rows[i + 1:]:
            if not _same_images(a, b):
                continue
            n = min(va.size, vb.size)
            diff = va[:n] - vb[:n]  # [n] per image, nats
            if n == a["n_test"] == b["n_test"]:
                unpaired = math.hypot(a["test_ll_stderr"], b["test_ll_stderr"])
            else:  # the rows' own standard errors over these n images
                unpaired = math.hypot(va[:n].std(ddof=1), vb[:n].std(ddof=1)) / math.sqrt(n)
            pairs.append({"a": a, "b": b, "n_images": n, "diff_nats": float(diff.mean()),
                          "paired_stderr": float(diff.std(ddof=1) / math.sqrt(n)), "unpaired_stderr": float(unpaired),
                          "a_higher_fraction": float((diff > 0).mean())})
    return pairs


PAIRED_COLUMNS = ["data set", "row a", "row b", "L(a) - L(b) (nats)", "paired SE", "unpaired SE",
                  "images where a is higher", "test images, S"]


def paired_cells(p: dict) -> list[str]:
    a, b = p["a"], p["b"]
    first = "" if p["n_images"] == a["n_test"] == b["n_test"] else "first "
    return [a["dataset"], a["run_name"], b["run_name"], f"{p['diff_nats']:+.2f}", f"{p['paired_stderr']:.3f}",
            f"{p['unpaired_stderr']:.2f}", f"{100 * p['a_higher_fraction']:.1f}%",
            f"{first}{p['n_images']:,}, {a['eval_samples']:,}"]


def paired_block(results: list[dict], model: str, link_base: Path) -> str:
    pairs = paired_comparisons(results, model)
    if not pairs:
        return (f"_No two {model} rows on the same test images have per-image log-likelihoods yet "
                f"(`results/per_image/`, written by evaluations since they are kept)._")
    lines = ["| " + " | ".join(md_cell(h) for h in PAIRED_COLUMNS) + " |", "|" + "---|" * len(PAIRED_COLUMNS)]
    for p in pairs:
        cells = [md_cell(c) for c in paired_cells(p)]
        cells[1] = f"[{cells[1]}]({relative_link(p['a']['_path'], link_base)})"
        cells[2] = f"[{cells[2]}]({relative_link(p['b']['_path'], link_base)})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\n_Generated by `python compare.py --update-readme` from `results/per_image/`: "
                               "the paired SE is the standard error of the mean of L(a) - L(b) over the same test "
                               "images; the unpaired one, sqrt(SE_a^2 + SE_b^2), ignores that they are the same._")


# ----------------------------------------------------------------------------- model04's ablation

# factor -> its level in a row's config; levels compare with <, and the higher level is the fix
ABLATION_FACTORS = {
    "stochastic layers": lambda c: c["latent_layers"],
    "p(x|z)": lambda c: (c.get("mixture_components", 10), c.get("rgb_coupling", True)),
    "width": lambda c: c["width"],
}
# what else must agree for two rows to differ by one fix (with the steps trained, from the result)
HELD_EQUAL = ("dataset", "image_size", "grey", "likelihood", "batch_size", "seed", "lr", "min_lr", "lr_schedule",
              "warmup_steps", "objective", "importance_samples", "kl_warmup_steps", "free_bits", "analytic_kl",
              "ema_decay", "latent_channels", "downsamplings", "encoder_blocks", "blocks_per_layer", "min_log_scale")


def _level(factor: str, config: dict) -> str:
    value = ABLATION_FACTORS[factor](config)
    if factor == "stochastic layers":
        total = config.get("top_down_layers") or value
        return f"L={value}" + (f" of {total} top-down layers" if total != value else "")
    if factor == "p(x|z)":
        k, coupling = value
        if k == 1:
            return "discretized logistic" + (" with RGB coupling" if coupling else "")
        return f"MoDL K={k} " + ("with RGB coupling" if coupling else "without coupling")
    return f"width {value}"


def _held(r: dict) -> tuple:
    c = r["config"]
    return (r["steps"], c.get("top_down_layers") or c["latent_layers"], *(c.get(key) for key in HELD_EQUAL))


def ablation_pairs(results: list[dict], dataset: str) -> list[dict]:
    """Per pair of model04 rows on `dataset` with per-image values that differ in exactly one ABLATION_FACTORS factor:
    {"factor", "without", "with", "others" (the other factors' levels), and the paired comparison}."""
    rows = [r for r in results if r["model"] == "model04" and r["dataset"] == dataset and r.get("config")
            and r.get("test_bpd") is not None]
    pairs = []
    for p in paired_comparisons(rows):
        a, b = p["a"], p["b"]
        if _held(a) != _held(b):
            continue
        differing = [f for f, value in ABLATION_FACTORS.items() if value(a["config"]) != value(b["config"])]
        if len(differing) != 1:
            continue
        factor = differing[0]
        value = ABLATION_FACTORS[factor]
        with_fix, without = (a, b) if value(a["config"]) > value(b["config"]) else (b, a)
        sign = 1 if with_fix is a else -1
        bpd_per_nat = with_fix["test_bpd"] / -with_fix["test_ll_nats"]  # 1 / (dims * ln 2)
        pairs.append({"factor": factor, "with": with_fix, "without": without, "n_images": p["n_images"],
                      "others": ", ".join(_level(f, with_fix["config"]) for f in ABLATION_FACTORS if f != factor),
                      "gain_bpd": sign * p["diff_nats"] * bpd_per_nat, "paired_se_bpd": p["paired_stderr"] * bpd_per_nat})
    return sorted(pairs, key=lambda q: (list(ABLATION_FACTORS).index(q["factor"]), q["others"]))


ABLATION_COLUMNS = ["fix", "the other factors", "without", "with", "gain (bits/dim)", "paired SE", "test images, S",
                    "what it buys"]


def ablation_block(results: list[dict], dataset: str, link_base: Path) -> str:
    """What each fix buys inside model04's architecture on `dataset`: a row per pair of published rows that differ in
    one factor, its gain in bits/dim (lower bits/dim is better, so a positive gain is an improvement) with the
    paired SE, and a verdict: a gain within two paired SEs of zero buys nothing measurable."""
    pairs = ablation_pairs(results, dataset)
    if not pairs:
        return (f"_No two model04 rows on {dataset} that differ in one factor carry per-image values yet: the "
                f"ablation table fills in as its rows are scored._")
    lines = ["| " + " | ".join(ABLATION_COLUMNS) + " |", "|" + "---|" * len(ABLATION_COLUMNS)]
    for q in pairs:
        gain, se = q["gain_bpd"], q["paired_se_bpd"]
        verdict = ("nothing measurable (within 2 paired SE)" if abs(gain) < 2 * se
                   else "an improvement" if gain > 0 else "a loss")
        cells = [q["factor"], q["others"],
                 f"[{_level(q['factor'], q['without']['config'])}]({relative_link(q['without']['_path'], link_base)})",
                 f"[{_level(q['factor'], q['with']['config'])}]({relative_link(q['with']['_path'], link_base)})",
                 f"{gain:+.4f}", f"{se:.4f}", f"first {q['n_images']:,}, {q['with']['eval_samples']:,}", verdict]
        lines.append("| " + " | ".join(md_cell(c) if i < 2 else c for i, c in enumerate(cells)) + " |")
    return "\n".join(lines) + ("\n\n_Generated by `python compare.py --update-readme` from `results/per_image/`: "
                               "gain = bits/dim without the fix minus bits/dim with it, on the same test images; "
                               "the paired SE is that of the per-image differences._")


# ----------------------------------------------------------------------------- the ladder in bits/dim

# per data set, the ladder's row of each rung, lowest first: the rung's own experiment (model02 and model03 with
# their bounds, model04 with six layers and the coupled mixture) at one width, batch, step count and seed
LADDER_ROWS = {
    "cifar10-jpeg": ("model02_cifar10-jpeg_iwae_k1_seed0", "model03_cifar10-jpeg_iwae_k1_seed0",
                     "model04_cifar10-jpeg_vae_k1_L6_w32_seed0"),
}
LADDER_COLUMNS = ["step", "lower rung", "bits/dim", "higher rung", "bits/dim", "change (bits/dim)", "paired SE",
                  "test images, S", "the higher rung's bits/dim"]


def ladder_block(results: list[dict], dataset: str, link_base: Path) -> str:
    """Each step up the ladder on `dataset` (LADDER_ROWS): the two rungs' bits/dim on the test images both scored,
    the change (higher rung minus lower: negative is better) with its paired SE, and whether the higher rung is
    lower by more than two paired SEs. A step whose rows are not both published with per-image values is left out."""
    names = LADDER_ROWS.get(dataset)
    if names is None:
        raise PairedError(f"no ladder is defined for {dataset} (paired.LADDER_ROWS: {', '.join(LADDER_ROWS)})")
    by_name = {r["run_name"]: r for r in results if r.get("test_bpd") is not None}
    lines = ["| " + " | ".join(LADDER_COLUMNS) + " |", "|" + "---|" * len(LADDER_COLUMNS)]
    for lower_name, higher_name in zip(names, names[1:]):
        lower, higher = by_name.get(lower_name), by_name.get(higher_name)
        pairs = paired_comparisons([lower, higher]) if lower and higher else []
        if not pairs:
            continue
        p = pairs[0]  # a = the lower rung (first in the list), b = the higher
        n = p["n_images"]
        bpd_per_nat = higher["test_bpd"] / -higher["test_ll_nats"]  # 1 / (dims * ln 2), the same for both rows
        lower_bpd = -float(load_per_image(lower)[:n].mean()) * bpd_per_nat
        higher_bpd = -float(load_per_image(higher)[:n].mean()) * bpd_per_nat
        # bits/dim = -L / (dims ln 2), so bits/dim(higher) - bits/dim(lower) = (L(lower) - L(higher)) / (dims ln 2)
        change, se = p["diff_nats"] * bpd_per_nat, p["paired_stderr"] * bpd_per_nat
        verdict = ("lower (by more than 2 paired SE)" if change < -2 * se else
                   "higher (by more than 2 paired SE)" if change > 2 * se else "no measurable difference")
        lines.append("| " + " | ".join([
            f"{lower['model']} -> {higher['model']}",
            f"[{lower_name}]({relative_link(lower['_path'], link_base)})", f"{lower_bpd:.4f}",
            f"[{higher_name}]({relative_link(higher['_path'], link_base)})", f"{higher_bpd:.4f}",
            f"{change:+.4f}", f"{se:.4f}", paired_cells(p)[-1], verdict]) + " |")
    if len(lines) == 2:
        return (f"_The ladder on {dataset} ({', '.join(f'`{n}`' for n in names)}) fills in as its rows are published "
                f"with per-image values._")
    return "\n".join(lines) + ("\n\n_Generated by `python compare.py --update-readme` from `results/per_image/`: each "
                               "step compares two rungs on the test images both scored (the whole test set once the "
                               "re-scores are in); the paired SE is that of the per-image differences._")
