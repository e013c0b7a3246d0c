"""paired.py: rows compared image by image over the test images both scored, and model04's ablation table read from
the rows' configurations. Synthetic result files with chosen per-image values, so every number is known."""
import hashlib
import io
import json
import math

import numpy as np
import pytest

import compare
import paired

LOG2 = math.log(2)
DIMS = 3 * 32 * 32


def _config(**overrides) -> dict:
    return {"dataset": "cifar10-jpeg", "batch_size": 32, "seed": 0, "lr": 1e-3, "objective": "vae",
            "importance_samples": 1, "latent_layers": 6, "top_down_layers": 0, "width": 32, "mixture_components": 10,
            "rgb_coupling": True, "likelihood": None, **overrides}


def _publish(results, name, values, steps=30000, model="model04", **config):
    """results/<name>.json and results/per_image/<name>.npy: a row whose per-image bounds are `values` (nats)."""
    (results / "per_image").mkdir(exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(values, dtype=np.float64))
    (results / "per_image" / f"{name}.npy").write_bytes(buffer.getvalue())
    mean = float(np.mean(values))
    record = {"model": model, "run_name": name, "dataset": "cifar10-jpeg", "likelihood": "logistic-mixture",
              "latent_layers": config.get("latent_layers", 6), "importance_samples": 1, "objective": "vae",
              "eval_samples": 5000, "n_test": len(values), "test_ll_nats": mean,
              "test_ll_stderr": float(np.std(values, ddof=1) / math.sqrt(len(values))),
              "test_bpd": -mean / (DIMS * LOG2), "steps": steps, "wall_time_s": 1.0, "device": "CPU (test)",
              "device_type": "cpu", "git_commit": "a" * 40, "quick": False, "config": _config(**config),
              "test_ll_per_image": f"per_image/{name}.npy",
              "test_ll_per_image_sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
    (results / f"{name}.json").write_text(json.dumps(record))


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    return folder


def test_a_subset_row_pairs_with_a_full_row_over_the_images_both_scored(results):
    rng = np.random.default_rng(0)
    hardness = rng.normal(-6000, 300, size=40)  # what the images share: most of each row's spread
    _publish(results, "full", hardness + rng.normal(0, 1, 40))
    _publish(results, "subset", hardness[:10] - 5 + rng.normal(0, 1, 10), latent_layers=1, top_down_layers=6)
    rows = compare.load_results(results, True)
    (p,) = paired.paired_comparisons(rows)
    va = np.load(results / "per_image" / f"{p['a']['run_name']}.npy")[:10]
    vb = np.load(results / "per_image" / f"{p['b']['run_name']}.npy")[:10]
    assert p["n_images"] == 10
    assert p["diff_nats"] == pytest.approx(float((va - vb).mean()))
    assert p["paired_stderr"] == pytest.approx(float((va - vb).std(ddof=1) / math.sqrt(10)))
    assert p["unpaired_stderr"] > 50 * p["paired_stderr"]  # the shared hardness cancels only in the paired SE
    assert paired.paired_cells(p)[-1] == "first 10, 5,000"


def test_ablation_reads_one_fix_per_pair_and_says_when_it_buys_nothing(results):
    rng = np.random.default_rng(1)
    hardness = rng.normal(-6000, 300, size=200)
    noise = lambda: rng.normal(0, 1, 200)  # noqa: E731 (per-image noise of each row)
    _publish(results, "l1_k1", hardness - 30 + noise(), latent_layers=1, top_down_layers=6, mixture_components=1,
             rgb_coupling=False)
    _publish(results, "l1_k10", hardness - 30 + noise(), latent_layers=1, top_down_layers=6)  # the same: no gain
    _publish(results, "l6_k10", hardness + noise())  # 30 nats better than l1_k10
    _publish(results, "l6_k10_wide", hardness + 10 + noise(), width=64)
    _publish(results, "l6_k10_fewer_steps", hardness + 50 + noise(), steps=1000, width=64)  # another budget: no pair
    _publish(results, "other_rung", hardness + noise(), model="model03")  # not model04: no pair
    rows = compare.load_results(results, True)
    pairs = paired.ablation_pairs(rows, "cifar10-jpeg")
    found = {(q["factor"], q["without"]["run_name"], q["with"]["run_name"]): q for q in pairs}
    assert set(found) == {("stochastic layers", "l1_k10", "l6_k10"), ("p(x|z)", "l1_k1", "l1_k10"),
                          ("width", "l6_k10", "l6_k10_wide")}
    layers = found[("stochastic layers", "l1_k10", "l6_k10")]
    assert layers["gain_bpd"] == pytest.approx(30 / (DIMS * LOG2), rel=0.02)  # 30 nats = 0.0141 bits/dim
    assert layers["others"] == "MoDL K=10 with RGB coupling, width 32"
    text = paired.ablation_block(rows, "cifar10-jpeg", results)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "an improvement" in lines["stochastic layers"] and "+0.014" in lines["stochastic layers"]
    assert "nothing measurable" in lines["p(x\\|z)"]  # (escaped for the markdown table)
    assert "[discretized logistic](per_image/../l1_k1.json)" not in text and "[discretized logistic](l1_k1.json)" in text
    assert "[L=1 of 6 top-down layers](l1_k10.json)" in text and "first 200, 5,000" in text


def test_ablation_marker_must_name_a_data_set(results, tmp_path, capsys):
    _publish(results, "row", [-6000.0, -6001.0])
    readme = tmp_path / "README.md"
    readme.write_text("<!-- ablation:no-such-set:start -->\n<!-- ablation:no-such-set:end -->\n")
    paths = ["--readme", str(readme), "--results-dir", str(results), "--assets-dir", str(tmp_path / "assets")]
    assert compare.main(["--update-readme", *paths]) == 2
    assert "not a data set of data.py" in capsys.readouterr().err
    readme.write_text("<!-- ablation:cifar10-jpeg:start -->\n<!-- ablation:cifar10-jpeg:end -->\n")
    assert compare.main(["--update-readme", *paths]) == 0
    assert "fills in as its rows are scored" in readme.read_text()


def test_ladder_gives_each_step_in_bits_per_dim_over_the_images_both_scored(results, tmp_path, capsys):
    """model02 -> model03 -> model04 on cifar10-jpeg: a full-test-set row against a first-N row pairs over the N,
    the change is the higher rung's bits/dim minus the lower's on those images, and the verdict needs 2 paired SE."""
    m02, m03, m04 = paired.LADDER_ROWS["cifar10-jpeg"]
    rng = np.random.default_rng(1)
    hardness = rng.normal(-6000, 300, size=20)
    _publish(results, m02, hardness + rng.normal(0, 1, 20), model="model02")
    _publish(results, m03, hardness + 50 + rng.normal(0, 1, 20), model="model03")  # 50 nats better per image
    readme = tmp_path / "README.md"
    readme.write_text("<!-- ladder:cifar10-jpeg:start -->\n<!-- ladder:cifar10-jpeg:end -->\n")
    paths = ["--readme", str(readme), "--results-dir", str(results), "--assets-dir", str(tmp_path / "assets")]
    assert compare.main(["--update-readme", *paths]) == 0
    text = readme.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| model0")]
    assert len(rows) == 1 and rows[0].startswith("| model02 -> model03 |")  # model04 not published: no second step
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    v02, v03 = (np.load(results / "per_image" / f"{n}.npy") for n in (m02, m03))
    assert float(cells[2]) == pytest.approx(-v02.mean() / (DIMS * LOG2), abs=1e-4)
    assert float(cells[5]) == pytest.approx(-(v03 - v02).mean() / (DIMS * LOG2), abs=1e-4)
    assert float(cells[6]) == pytest.approx((v03 - v02).std(ddof=1) / math.sqrt(20) / (DIMS * LOG2), abs=1e-4)
    assert cells[7] == "20, 5,000" and cells[8] == "lower (by more than 2 paired SE)"
    # model04 scored on the first 5 images only, no better than model03 there: a step over those 5, nothing measurable
    _publish(results, m04, v03[:5] + rng.normal(0, 1, 5))
    assert compare.main(["--update-readme", *paths]) == 0
    step = [line for line in readme.read_text().splitlines() if line.startswith("| model03 -> model04 |")]
    assert len(step) == 1 and "| first 5, 5,000 |" in step[0] and step[0].endswith("| no measurable difference |")
    readme.write_text("<!-- ladder:mnist:start -->\n<!-- ladder:mnist:end -->\n")
    assert compare.main(["--update-readme", *paths]) == 2
    assert "no ladder in paired.LADDER_ROWS" in capsys.readouterr().err
