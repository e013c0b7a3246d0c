"""compare.py keeps README in step with results/, and regenerate_figures.py redraws the published figures.

One real (tiny, not --quick) model01 run on MNIST, published into a copy of the repo (scripts, README,
results/, assets/, checkpoints/) in a temp dir, provides the result file, figures and weights-only
checkpoint the tests work on; the real repo is only read.
"""
import hashlib
import math
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import compare
import results_tables
from conftest import ROOT, run_script


def _compare(capsys, *argv) -> tuple[int, str]:
    code = compare.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def published(tmp_path_factory, data_dir):
    """A repo copy with one more published result (its own seed, so its own run name) than the repo."""
    repo = tmp_path_factory.mktemp("repo")
    for path in ROOT.glob("*.py"):
        shutil.copy(path, repo / path.name)
    shutil.copy(ROOT / "README.md", repo / "README.md")
    for folder in ("results", "assets", "checkpoints", "docs"):
        if (ROOT / folder).is_dir():
            shutil.copytree(ROOT / folder, repo / folder)
    proc = run_script(repo / "model01.py", "--seed", 4242, "--max-steps", 30, "--val-every", 30, "--val-samples", 5, "--n-test", 100,
                      "--eval-samples", 10, "--log-every", 10, "--data-dir", data_dir, "--out-dir", repo / "runs" / "a",
                      "--publish", "--device", "cpu", cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result_path = repo / "results" / "model01_binarized-mnist_iwae_k5_seed4242.json"
    return {"repo": repo, "result_path": result_path, "result": json.loads(result_path.read_text()),
            "data_dir": data_dir}


def _paths(published):
    repo = published["repo"]
    return ["--readme", repo / "README.md", "--results-dir", repo / "results", "--assets-dir", repo / "assets"]


def test_repo_readme_agrees_with_results():
    """What CI guards: the README's generated blocks say what results/ says (also with no results yet)."""
    proc = run_script("compare.py", "--check", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dataset_choices_are_data_py_datasets():
    import data
    assert compare.dataset_names() == list(data.DATASETS)


def test_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# README's test command:") + 1].strip()
    env = re.search(r'VAE_DATA_DIR="\$\{VAE_DATA_DIR:-([^}]+)\}"', "\n".join(ci)).group(1)
    assert f"VAE_DATA_DIR={env} {command}" in (ROOT / "README.md").read_text()


def test_update_then_check_then_hand_edit_fails_with_diff(published, capsys):
    repo, result = published["repo"], published["result"]
    code, out = _compare(capsys, "--check", *_paths(published))
    assert code == 1 and "--update-readme" in out  # the copied README predates the new result
    code, out = _compare(capsys, "--update-readme", *_paths(published))
    assert code == 0, out
    readme = (repo / "README.md").read_text()
    number = f"{result['test_ll_nats']:.2f} ± {result['test_ll_stderr']:.2f}"
    assert readme.count(number) == 2  # the model01 block and the comparison table
    assert "CPU (" in readme and "_No published results yet" not in readme
    assert f"](results/{published['result_path'].name})" in readme  # every number links to its file
    assert f"![samples](assets/{result['model']}_{result['dataset']}_samples.png)" in readme
    assert result["command"] in (repo / "docs" / "commands.md").read_text()  # the row's command, kept out of README
    code, out = _compare(capsys, "--update-readme", *_paths(published))
    assert code == 0 and "already up to date" in out
    code, out = _compare(capsys, "--check", *_paths(published))
    assert code == 0, out

    edited = f"{result['test_ll_nats'] + 1.0:.2f} ± {result['test_ll_stderr']:.2f}"  # someone "fixes" a number
    (repo / "README.md").write_text(readme.replace(number, edited, 1))
    try:
        proc = run_script(repo / "compare.py", "--check", *_paths(published), cwd=repo, timeout=120)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        diff = proc.stdout.splitlines()
        assert any(line.startswith("-") and edited in line for line in diff), proc.stdout
        assert any(line.startswith("+") and number in line for line in diff), proc.stdout
    finally:
        (repo / "README.md").write_text(readme)


def test_terminal_table_columns_and_dataset_filter(published, capsys):
    result = published["result"]
    results = published["repo"] / "results"
    code, out = _compare(capsys, "--results-dir", results, "--dataset", "binarized-mnist")
    assert code == 0
    header = out.splitlines()[0]
    number = f"{result['test_ll_nats']:.2f} ± {result['test_ll_stderr']:.2f}"
    (row,) = [line for line in out.splitlines() if number in line]
    for column in ("model", "dataset", "p(x|z)", "latent layers", "training objective", "eval samples S",
                   "test images", "test log-likelihood L_S (nats)", "bits/dim", "steps", "wall time", "device",
                   "commit"):
        assert column in header
    for cell in ("model01", "binarized-mnist", "bernoulli", "IWAE, k=5", " 10 ", " 100 ", " 30 ", "CPU ("):
        assert cell in row, (cell, row)
    code, out = _compare(capsys, "--results-dir", results, "--dataset", "svhn")
    assert code == 0 and "no published results" in out
    code, out = _compare(capsys, "--markdown", "--results-dir", results, "--dataset", "binarized-mnist")
    assert code == 0 and out.startswith("| model |") and "[model01](" in out


def test_quick_results_are_flagged_and_refused(published, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "quick.json").write_text(json.dumps({**published["result"], "quick": True}))
    code, out = _compare(capsys, "--results-dir", results)
    assert code == 0 and "[QUICK: not a published number]" in out
    readme = tmp_path / "README.md"
    shutil.copy(published["repo"] / "README.md", readme)
    for mode in ("--markdown", "--update-readme", "--check"):
        code, out = _compare(capsys, mode, "--results-dir", results, "--readme", readme)
        assert code == 2 and "--quick run" in out and "quick.json" in out, (mode, out)
    assert readme.read_bytes() == (published["repo"] / "README.md").read_bytes()  # refused: nothing written


def test_bad_inputs_are_clear_errors(published, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench_speed.json").write_text("not a result, and skipped")
    code, out = _compare(capsys, "--results-dir", results)
    assert code == 0 and "no published results" in out
    (results / "broken.json").write_text('{"model": "model01"')
    code, out = _compare(capsys, "--results-dir", results)
    assert code == 2 and "broken.json is not readable JSON" in out
    (results / "broken.json").write_text('{"model": "model01"}')
    code, out = _compare(capsys, "--results-dir", results)
    assert code == 2 and "broken.json lacks" in out
    (results / "broken.json").unlink()

    readme = tmp_path / "README.md"
    for text, message in [("# no markers\n", "has no generated block"),
                          ("<!-- results:start -->\n", "is never closed"),
                          ("<!-- results:model01:start -->\n<!-- results:end -->\n", "closes no open"),
                          ("<!-- results:model99:start -->\n<!-- results:model99:end -->\n", "no model99.py"),
                          ("<!-- paired:fashion-mnist:start -->\n<!-- paired:fashion-mnist:end -->\n",
                           "no published row on a data set of that name"),
                          ("<!-- figures:start -->\n<!-- figures:end -->\n", "needs a model")]:
        readme.write_text(text)
        code, out = _compare(capsys, "--check", "--readme", readme, "--results-dir", results)
        assert code == 2 and message in out, (text, out)
    readme.write_text("<!-- results:start -->\n" + results_tables.NO_RESULTS + "\n<!-- results:end -->\n"
                      "![a figure](assets/never_published.png)\n")
    code, out = _compare(capsys, "--check", "--readme", readme, "--results-dir", results)
    assert code == 1 and "assets/never_published.png" in out
    code, out = _compare(capsys, "--check", "--dataset", "mnist", "--readme", readme, "--results-dir", results)
    assert code == 2 and "--dataset" in out
    with pytest.raises(SystemExit) as exc:
        compare.main(["--check", "--update-readme"])
    assert exc.value.code == 2


def test_regenerated_figures_are_bit_identical(published, tmp_path):
    """regenerate_figures.py redraws assets/ from checkpoints/ exactly as --publish drew them; the
    published checkpoint also reproduces the published number."""
    repo, result = published["repo"], published["result"]
    assets = sorted((repo / "assets").glob("model01_binarized-mnist_*.png"))
    assert len(assets) == 3
    published_bytes = {p.name: p.read_bytes() for p in assets}
    result_bytes = published["result_path"].read_bytes()
    for p in assets:
        p.unlink()
    shutil.rmtree(repo / "runs")  # only checkpoints/ is left to draw from
    proc = run_script(repo / "regenerate_figures.py", "--run", result["run_name"], "--data-dir", published["data_dir"],
                      cwd=repo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {p.name: p.read_bytes() for p in assets} == published_bytes
    assert published["result_path"].read_bytes() == result_bytes  # --figures-only leaves results alone

    proc = run_script(repo / "model01.py", "--eval-only", "--checkpoint", repo / "checkpoints" / f"{result['run_name']}.pt",
                      "--out-dir", tmp_path / "eval", "--data-dir", published["data_dir"], cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "result.json").read_text())["test_ll_nats"] == result["test_ll_nats"]

    ckpt = repo / "checkpoints" / f"{result['run_name']}.pt"
    ckpt.rename(tmp_path / "moved.pt")
    try:
        proc = run_script(repo / "regenerate_figures.py", "--run", result["run_name"], "--dry-run", cwd=repo)
        assert proc.returncode == 1 and f"MISSING {result['run_name']}: no checkpoint" in proc.stdout, proc.stdout
    finally:
        (tmp_path / "moved.pt").rename(ckpt)


def test_bench_block_is_rendered_from_bench_json_and_a_hand_edit_fails_check(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    train = {"ours": {"images_per_s": 9000.4, "host_syncs_per_step": {"total": 0}},
             "naive": {"images_per_s": 3000.0, "host_syncs_per_step": {"total": 40}},
             "ours_cpu_bf16": {"images_per_s": 12000.0}, "speedup": 3.0001, "speedup_cpu_bf16": 4.0}
    evaluation = {"ours": {"samples_per_s": 50000.0}, "naive": {"samples_per_s": 10000.0}, "speedup": 5.0}
    report = {"command": "python bench.py --device cpu", "git_commit": "a" * 40, "device": "CPU (test)",
              "load_average_1min_at_start": 0.5, "load_average_1min_at_end": 0.7,
              "results": [{"model": "model01", "threads": 1, "batch_size": 100, "importance_samples": 5,
                           "train": train, "eval": evaluation}]}
    (results / "bench_cpu.json").write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text("# speed\n<!-- bench:start -->\nstale\n<!-- bench:end -->\n")
    paths = ["--readme", readme, "--results-dir", results, "--assets-dir", tmp_path / "assets"]
    code, out = _compare(capsys, "--update-readme", *paths)
    assert code == 0, out
    text = readme.read_text()
    assert "stale" not in text and "| [CPU (test)](results/bench_cpu.json) | model01 | 1 | 100 | 9000 / 3000 | **3.00x** |" in text
    assert "12000 (4.00x)" in text and "**5.00x**" in text and "0 / 40" in text and "aaaaaaa" in text
    assert _compare(capsys, "--check", *paths)[0] == 0
    readme.write_text(text.replace("**3.00x**", "**3.50x**"))
    code, out = _compare(capsys, "--check", *paths)
    assert code == 1 and "3.50x" in out
    (results / "bench_cpu.json").write_text("{}")
    code, out = _compare(capsys, "--check", *paths)
    assert code == 2 and "bench_cpu.json is not a report written by bench.py" in out


def test_eval_bench_block_shows_before_and_after_and_skips_training_only_reports(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    evaluation = {"ours": {"samples_per_s": 4000.0}, "naive": {"samples_per_s": 1000.0}, "speedup": 4.0,
                  "previous_cpu_defaults": {"samples_per_s": 800.0}, "speedup_vs_previous_cpu_defaults": 5.0,
                  "hours_for_test_l5000": 3.4722, "eval_samples": 5000, "eval_images": 2}
    report = {"command": "python bench.py --device cpu --phases eval", "git_commit": "b" * 40, "device": "CPU (test)",
              "results": [{"model": "model03", "threads": 1, "batch_size": 100, "importance_samples": 5,
                           "train": {}, "eval": evaluation}]}
    (results / "bench_cpu_eval.json").write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:start -->\nx\n<!-- bench:end -->\n<!-- bench-eval:start -->\ny\n<!-- bench-eval:end -->\n")
    paths = ["--readme", readme, "--results-dir", results, "--assets-dir", tmp_path / "assets"]
    code, out = _compare(capsys, "--update-readme", *paths)
    assert code == 0, out
    text = readme.read_text()
    assert "_No benchmark yet" in text  # an evaluation-only report has no training row
    assert "| [CPU (test)](results/bench_cpu_eval.json) | model03 | 1 | 800 -> 4000 | **5.00x** | 1000 | 4.00x | 3.5 h |" in text
    assert "S=5000 on 2 test images per repeat" in text
    assert _compare(capsys, "--check", *paths)[0] == 0
    readme.write_text(text.replace("**5.00x**", "**6.00x**"))
    assert _compare(capsys, "--check", *paths)[0] == 1


def _bench_readme(tmp_path, report: dict, name: str, kind: str):
    """results/<name> holding `report` and a README with one empty <!-- kind --> block -> (results, readme, paths)."""
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    (results / name).write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text(f"<!-- {kind}:start -->\ny\n<!-- {kind}:end -->\n")
    return results, readme, ["--readme", readme, "--results-dir", results, "--assets-dir", tmp_path / "assets"]


def test_code_bench_block_shows_the_script_at_a_commit_against_ours(tmp_path, capsys):
    evaluation = {"ours": {"samples_per_s": 1100.0}, "naive": {"samples_per_s": 200.0}, "speedup": 5.5,
                  "baseline": {"samples_per_s": 1000.0, "commit": "773431f", "same_per_image_values": True},
                  "speedup_vs_baseline": 1.1, "hours_for_test_l5000": 12.626, "eval_samples": 5000, "eval_images": 2}
    report = {"command": "python bench.py --phases eval --baseline-commit 773431f", "git_commit": "c" * 40,
              "device": "CPU (test)", "results": [{"model": "model04", "threads": 1, "batch_size": 100,
                                                   "importance_samples": 5, "config_overrides": {"width": 32},
                                                   "train": {}, "eval": evaluation}]}
    results, readme, paths = _bench_readme(tmp_path, report, "bench_cpu_eval_model04.json", "bench-code")
    assert _compare(capsys, "--update-readme", *paths)[0] == 0
    text = readme.read_text()
    assert ("| [CPU (test)](results/bench_cpu_eval_model04.json) | model04 | 1 | `width=32` | 1000 (773431f) -> 1100 "
            "| **1.10x** | the same, bit for bit | 12.6 h |") in text, text
    evaluation["baseline"]["same_per_image_values"] = False
    (results / "bench_cpu_eval_model04.json").write_text(json.dumps(report))
    assert _compare(capsys, "--check", *paths)[0] == 1  # the table no longer says what the report says


def test_chunk_bench_block_shows_each_pass_size_and_the_fastest(tmp_path, capsys):
    evaluation = {"ours": {"samples_per_s": 300.0, "chunk_latents": 32}, "naive": {"samples_per_s": 100.0},
                  "chunk_64": {"samples_per_s": 360.0, "chunk_latents": 64},
                  "chunk_128": {"samples_per_s": 250.0, "chunk_latents": 128}, "chunk_latents": 32, "speedup": 3.0,
                  "speedup_chunk_64": 1.2, "speedup_chunk_128": 250 / 300, "hours_for_test_l5000": 46.296,
                  "eval_samples": 2000, "eval_images": 1}
    report = {"command": "python bench.py --phases eval --eval-chunks 64 128", "git_commit": "c" * 40,
              "device": "CPU (test)", "results": [{"model": "model04", "dataset": "cifar10-jpeg", "threads": 1,
                                                   "batch_size": 100, "importance_samples": 5,
                                                   "config_overrides": {"width": 32}, "train": {},
                                                   "eval": evaluation}]}
    results, readme, paths = _bench_readme(tmp_path, report, "bench_cpu_eval_model04_cifar.json", "bench-chunks")
    assert _compare(capsys, "--update-readme", *paths)[0] == 0
    text = readme.read_text()
    assert ("| [CPU (test)](results/bench_cpu_eval_model04_cifar.json) | model04 | cifar10-jpeg | 1 | `width=32` | "
            "32 (default): 300, 64: 360, 128: 250 | **64** (1.20x the default) | 46.3 h |") in text, text
    evaluation["chunk_64"]["samples_per_s"] = 280.0  # now the default is the fastest
    (results / "bench_cpu_eval_model04_cifar.json").write_text(json.dumps(report))
    assert _compare(capsys, "--check", *paths)[0] == 1
    assert _compare(capsys, "--update-readme", *paths)[0] == 0
    assert "| **32** (1.00x the default) |" in readme.read_text()


def test_a_rescored_row_lists_the_number_it_replaced_after_its_command():
    row = {"run_name": "m_run", "command": "python m.py --eval-only --eval-samples 5000",
           "previous_results": [{"eval_samples": 100, "n_test": 10000, "test_ll_nats": -1950.2, "command": "python m.py"}]}
    assert results_tables._earlier_commands(row) == "; before it, L_100 = -1950.20 nats on 10,000 images from `python m.py`"
    row["previous_results"].append({"eval_samples": 5000, "n_test": 10000, "test_ll_nats": -1937.6, "command": "x"})
    assert results_tables._earlier_commands(row).endswith("`python m.py`; before it, L_5000 = -1937.60 nats on 10,000 images")
    assert results_tables._earlier_commands({"run_name": "x", "command": "y"}) == ""


def _publish_twin(results, result, name, values):
    """A second published row on the same test images with the given per-image values (nats)."""
    buffer = io.BytesIO()
    np.save(buffer, values)
    (results / "per_image" / f"{name}.npy").write_bytes(buffer.getvalue())
    twin = {**result, "run_name": name, "test_ll_nats": float(values.mean()),
            "test_ll_stderr": float(values.std(ddof=1) / np.sqrt(values.size)),
            "test_ll_per_image": f"per_image/{name}.npy",
            "test_ll_per_image_sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
    (results / f"{name}.json").write_text(json.dumps(twin))


def test_rows_on_the_same_images_are_compared_image_by_image(published, tmp_path, capsys):
    result = published["result"]
    # the published run's per-image values: every test image's L_S, in test-set order, averaging to the row
    assert result["test_ll_per_image"] == "per_image/model01_binarized-mnist_iwae_k5_seed4242.npy"
    values = np.load(published["repo"] / "results" / result["test_ll_per_image"])
    assert values.shape == (100,) and values.dtype == np.float64
    assert values.mean() == pytest.approx(result["test_ll_nats"], rel=1e-12)
    assert values.std(ddof=1) / 10 == pytest.approx(result["test_ll_stderr"], rel=1e-9)

    results = tmp_path / "results"  # this row alone (the repo's own rows may hold pairs of their own)
    (results / "per_image").mkdir(parents=True)
    shutil.copy(published["result_path"], results)
    shutil.copy(published["repo"] / "results" / result["test_ll_per_image"], results / "per_image")
    readme = tmp_path / "README.md"
    readme.write_text("# r\n\n<!-- paired:model01:start -->\n<!-- paired:model01:end -->\n")
    paths = ["--readme", readme, "--results-dir", results, "--assets-dir", published["repo"] / "assets"]
    assert _compare(capsys, "--update-readme", *paths)[0] == 0
    assert "_No two model01 rows on the same test images have per-image log-likelihoods yet" in readme.read_text()

    # every image exactly half a nat lower, alternately +-0.2 nats around that: L(a) - L(b) = 0.5 nats, and the
    # differences' sample std is 0.2 * sqrt(n / (n - 1)), so the paired SE is 0.2 / sqrt(n - 1) = 0.0201 nats
    # while the unpaired one is sqrt(2) times the row's own standard error
    shift = 0.5 + 0.2 * np.where(np.arange(100) % 2 == 0, 1.0, -1.0)
    _publish_twin(results, result, "model01_binarized-mnist_iwae_k5_seed4243", values - shift)
    (pair,) = compare.paired_comparisons(compare.load_results(results, True), "model01")
    assert pair["a"]["run_name"].endswith("seed4242") and pair["b"]["run_name"].endswith("seed4243")
    assert pair["diff_nats"] == pytest.approx(0.5, abs=1e-12)
    assert pair["paired_stderr"] == pytest.approx(0.2 / np.sqrt(99), rel=1e-9)
    assert pair["a_higher_fraction"] == 1.0
    twin_stderr = (values - shift).std(ddof=1) / 10
    assert pair["unpaired_stderr"] == pytest.approx(np.hypot(result["test_ll_stderr"], twin_stderr), rel=1e-9)
    # keyed by a data set instead of a rung: every rung's rows on it (here the same pair), none on another
    assert compare.paired_comparisons(compare.load_results(results, True), "binarized-mnist") == [pair]
    assert compare.paired_comparisons(compare.load_results(results, True), "fashion-mnist") == []

    assert _compare(capsys, "--update-readme", *paths)[0] == 0
    text = readme.read_text()
    (row,) = [line for line in text.splitlines() if "seed4243" in line]
    assert "| +0.50 | 0.020 |" in row and "| 100.0% | 100, 10 |" in row
    assert "(results/model01_binarized-mnist_iwae_k5_seed4242.json)" in row
    assert _compare(capsys, "--check", *paths)[0] == 0
    code, out = _compare(capsys, "--paired", "--results-dir", results)
    assert code == 0 and "L(a) - L(b) (nats): +0.50  paired SE: 0.020" in out
    readme.write_text("# r\n\n<!-- paired:binarized-mnist:start -->\n<!-- paired:binarized-mnist:end -->\n")
    assert _compare(capsys, "--update-readme", *paths)[0] == 0 and "| +0.50 | 0.020 |" in readme.read_text()

    # a per-image file that is not the one the row was published with, or none at all, is refused by name
    npy = results / "per_image" / "model01_binarized-mnist_iwae_k5_seed4243.npy"
    npy.write_bytes(npy.read_bytes()[:-8] + np.float64(0.0).tobytes())
    for mode in ("--check", "--update-readme", "--paired"):
        code, out = _compare(capsys, mode, *(paths if mode != "--paired" else paths[2:4]))
        assert code == 2 and "sha256 differs" in out and npy.name in out, (mode, out)
    npy.unlink()
    code, out = _compare(capsys, "--check", *paths)
    assert code == 2 and "do not exist" in out and npy.name in out


def test_a_number_typed_into_readme_prose_fails_check(tmp_path, capsys):
    """--check covers every number README shows: a generated block writes it, or the check fails with its line.
    Names and settings (model01, L_5000, k=5, 28x28, 8-bit), code, headings and the literature section pass."""
    results = tmp_path / "results"
    results.mkdir()
    readme = tmp_path / "README.md"
    clean = ("# r\n\n## Rung 1 — model01\n\nThe `model01.py` run at k=5 scores L_5000 on 28×28 8-bit images of a\n"
             "batch-20 run (Burda et al. 2015), with `--epochs 3280`:\n\n```bash\npython model01.py --epochs 10\n```\n\n"
             "1. a list item\n\n<!-- results:start -->\n<!-- results:end -->\n\n"
             "## Reference numbers from the literature (not measured here)\n\n| a | -85.54 |\n")
    readme.write_text(clean)
    paths = ["--readme", readme, "--results-dir", results, "--assets-dir", tmp_path / "assets"]
    assert _compare(capsys, "--update-readme", *paths)[0] == 0
    code, out = _compare(capsys, "--check", *paths)
    assert code == 0 and "numbers in prose checked" in out, out
    text = readme.read_text()
    readme.write_text(text.replace("with `--epochs 3280`:", "with `--epochs 3280`, reaching -85.33 nats:"))
    code, out = _compare(capsys, "--check", *paths)
    assert code == 1 and "typed by hand" in out and "line 6: '85.33'" in out, out
    assert compare.typed_numbers("## Comparison\n\nabout 0.35 nats, 12 times\n") == [
        (3, "0.35", "about 0.35 nats, 12 times"), (3, "12", "about 0.35 nats, 12 times")]


def test_a_sentence_block_states_a_number_from_results(published, tmp_path, capsys):
    """<!-- sentence:NAME --> blocks are written by compare.SENTENCES[NAME] and checked like every block."""
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(published["result_path"], results)
    readme = tmp_path / "README.md"
    readme.write_text("# r\n\n<!-- sentence:model01-paper:start -->\n<!-- sentence:model01-paper:end -->\n")
    paths = ["--readme", readme, "--results-dir", results, "--assets-dir", tmp_path / "assets"]
    assert _compare(capsys, "--update-readme", *paths)[0] == 0
    result = published["result"]
    assert f"reaches {result['test_ll_nats']:.2f} ± {result['test_ll_stderr']:.2f} nats" in readme.read_text()
    assert _compare(capsys, "--check", *paths)[0] == 0
    readme.write_text("<!-- sentence:nonsense:start -->\n<!-- sentence:nonsense:end -->\n")
    code, out = _compare(capsys, "--check", *paths)
    assert code == 2 and "names no sentence" in out


def test_a_gpu_row_is_redrawn_on_the_cpu_when_no_gpu_is_visible(published, tmp_path):
    """regenerate_figures.py never skips a row made on a GPU: without one it draws it on the CPU and says so."""
    import regenerate_figures

    gpu_row = {"run_name": "r", "device_type": "cuda"}
    assert regenerate_figures.draw_device(gpu_row, "result", lambda: True) == ("cuda", None)
    device, why = regenerate_figures.draw_device(gpu_row, "result", lambda: False)
    assert device == "cpu" and why.startswith("r: made on CUDA, redrawn on CPU")
    assert regenerate_figures.draw_device({"run_name": "c", "device_type": "cpu"}, "result", lambda: False) == ("cpu", None)

    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the end-to-end CPU fallback needs a machine without one")
    repo, result = published["repo"], published["result"]
    results = tmp_path / "results"
    results.mkdir()
    (results / published["result_path"].name).write_text(json.dumps({**result, "device_type": "cuda"}))
    out_dir = tmp_path / "redrawn"
    proc = run_script(repo / "regenerate_figures.py", "--results-dir", results, "--out-dir", out_dir,
                      "--data-dir", published["data_dir"], cwd=repo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{result['run_name']}: made on CUDA, redrawn on CPU" in proc.stdout
    assert "redrew the figures of 1 of 1 results" in proc.stdout
    assert (out_dir / result["run_name"] / "model01_samples.png").is_file()


def test_curves_are_drawn_from_a_log_into_a_fixed_size_png(tmp_path):
    """--curves: validation bound against epochs and hours, one PNG per data set, the same bytes every time; a run
    without a log is named; the gap between two segments is not counted as training time."""
    import regenerate_figures
    from PIL import Image

    results, logs, assets = tmp_path / "results", tmp_path / "runs", tmp_path / "assets"
    results.mkdir()
    for name in ("model01_binarized-mnist_iwae_k5_seed7", "model04_binarized-mnist_vae_k1_L6_seed7"):
        (results / f"{name}.json").write_text(json.dumps({"run_name": name, "model": name[:7], "quick": False,
                                                          "dataset": "binarized-mnist", "steps": 400, "epochs": 4.0}))
    records = [{"type": "config", "time": 0.0, "step": 0}]
    records += [{"type": "val", "time": 360.0 * i, "step": 50 * i, "val_bound_nats": -100 + i} for i in range(1, 5)]
    records += [{"type": "segment_end", "time": 1500.0, "step": 200},
                {"type": "resume", "time": 90000.0, "step": 200}]  # a day between the two segments
    records += [{"type": "val", "time": 90000.0 + 360 * i, "step": 200 + 50 * i, "val_bound_nats": -96 + i}
                for i in range(1, 5)]
    (logs / "model01_binarized-mnist_iwae_k5_seed7").mkdir(parents=True)
    (logs / "model01_binarized-mnist_iwae_k5_seed7" / "log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
    points = regenerate_figures.validation_points(logs / "model01_binarized-mnist_iwae_k5_seed7" / "log.jsonl", 100.0)
    assert points[0] == (0.5, 0.1, -99) and points[-1][0] == 4.0 and points[-1][1] == pytest.approx(1500 / 3600 + 0.4)

    argv = ["--curves", "--results-dir", results, "--log-dirs", logs, "--assets-dir", assets]
    proc = run_script(ROOT / "regenerate_figures.py", *argv)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "model04_binarized-mnist_vae_k1_L6_seed7: no log in the tree" in proc.stdout
    png = assets / "curves_binarized-mnist.png"
    assert Image.open(png).size == (1100, 420)
    first = png.read_bytes()
    assert run_script(ROOT / "regenerate_figures.py", *argv).returncode == 0
    assert png.read_bytes() == first
    assert not (assets / "layers_binarized-mnist.png").exists()  # no model04 row with per-layer statistics


def test_layer_statistics_figure_shows_every_model04_layer(tmp_path):
    """--curves also draws each model04 row's per-layer KL and share of active units, one PNG per data set; rows of
    other rungs (model01 records its one layer too) stay out of it."""
    import regenerate_figures
    from PIL import Image

    stats = [{"layer": i + 1, "resolution": r, "units": u, "kl_nats": kl, "active_units": a}
             for i, (r, u, kl, a) in enumerate([("4x4", 256, 4.9, 5), ("7x7", 784, 0.01, 0), ("14x14", 3136, 13.0, 2395)])]
    rows = [{"run_name": "model04_binarized-mnist_vae_k1_L3_seed7", "model": "model04", "dataset": "binarized-mnist",
             "latent_layer_stats": stats},
            {"run_name": "model01_binarized-mnist_iwae_k5_seed7", "model": "model01", "dataset": "binarized-mnist",
             "latent_layer_stats": [{"layer": 1, "units": 50, "kl_nats": 25.0, "active_units": 20}]},
            {"run_name": "model01_mnist_iwae_k5_seed7", "model": "model01", "dataset": "mnist",
             "latent_layer_stats": [{"layer": 1, "units": 50, "kl_nats": 25.0, "active_units": 20}]}]
    written = regenerate_figures.draw_layer_statistics(rows, tmp_path)
    assert written == [tmp_path / "layers_binarized-mnist.png"]
    first = written[0].read_bytes()
    assert Image.open(written[0]).size == (1100, 360)
    assert regenerate_figures.draw_layer_statistics(rows, tmp_path) == written and written[0].read_bytes() == first


def _folder_row(results_dir: Path, name: str, sha: str, bpd: float) -> dict:
    """A result on an image folder (the fields a published result.json has, numbers made up for the table)."""
    row = {"model": "model03", "run_name": name, "dataset": "cifar10-jpeg", "likelihood": "discretized-logistic",
           "latent_layers": 1, "importance_samples": 5, "objective": "iwae", "eval_samples": 5000, "n_test": 10000,
           "test_ll_nats": -bpd * 3072 * math.log(2), "test_ll_stderr": 1.0, "test_bpd": bpd, "steps": 10,
           "wall_time_s": 1.0, "device": "CPU", "device_type": "cpu", "git_commit": "abc", "quick": False,
           "dataset_sha256": sha, "dataset_folder": "/data/CIFAR10-JPEG"}
    results_dir.mkdir(exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(row))
    return row


def test_jpeg_copy_bits_per_dim_carry_their_caveat_and_folders_never_share_a_name(tmp_path, capsys):
    results = tmp_path / "results"
    _folder_row(results, "a", "1" * 64, 3.5)
    code, out = _compare(capsys, "--markdown", "--results-dir", results)
    assert code == 0 and "3.500 (JPEG copy, not comparable with the literature)" in out
    assert "never compare with CIFAR-10 numbers in the literature" in out
    _folder_row(results, "b", "2" * 64, 3.4)  # same name, another folder's content
    code, out = _compare(capsys, "--markdown", "--results-dir", results)
    assert code == 2 and "different content" in out


def test_layers_block_shows_each_layer_of_each_row(tmp_path):
    row = _folder_row(tmp_path / "results", "m04", "3" * 64, 3.0)
    row.update(model="model04", _path=tmp_path / "results" / "m04.json", latent_layer_stats=[
        {"layer": 1, "resolution": "4x4", "units": 256, "kl_nats": 0.004, "active_units": 0},
        {"layer": 2, "resolution": "8x8", "units": 1024, "kl_nats": 12.345, "active_units": 700}])
    block = compare.layers_block([row], "model04", tmp_path)
    lines = block.splitlines()
    assert len(lines) == 4 and "| 1 | 4x4 | 256 | 0.00 | 0 |" in lines[2] and "[m04](results/m04.json)" in lines[2]
    assert lines[3] == "|  | 2 | 8x8 | 1,024 | 12.35 | 700 |"
    assert "No published model03 row" in compare.layers_block([row], "model03", tmp_path)


def test_a_figure_row_shows_the_extra_figures_a_rung_has(tmp_path):
    row = _folder_row(tmp_path / "results", "m04", "4" * 64, 3.0)
    row.update(model="model04", _path=tmp_path / "results" / "m04.json", date="2026-01-01T00:00:00+00:00")
    assets = tmp_path / "assets"
    assets.mkdir()
    for kind in ("imgs", "recs", "samples"):
        (assets / f"model04_cifar10-jpeg_{kind}.png").write_bytes(b"png")
    block = compare.figures_block([row], "model04", assets, tmp_path)
    assert "what each layer encodes" not in block and "not in assets" not in block
    (assets / "model04_cifar10-jpeg_layers.png").write_bytes(b"png")
    block = compare.figures_block([row], "model04", assets, tmp_path)
    assert block.splitlines()[0].endswith("| what each layer encodes |")
    assert "![what each layer encodes](assets/model04_cifar10-jpeg_layers.png)" in block
