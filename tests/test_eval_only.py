"""--eval-only on a --quick checkpoint reproduces the run's test log-likelihood exactly, and
--figures-only redraws its seeded figures bit for bit without touching any result.json."""
import json

import pytest

import model01
import training
from conftest import run_script

FIGURES = ("model01_imgs.png", "model01_recs.png", "model01_samples.png")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, data_dir):
    """A real --quick model01 run on MNIST, shrunk by explicit flags (they override --quick's values)."""
    out = tmp_path_factory.mktemp("quick") / "run"
    proc = run_script("model01.py", "--quick", "--max-steps", 60, "--n-test", 200, "--eval-samples", 20,
                      "--data-dir", data_dir, "--out-dir", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["quick"] and result["n_test"] == 200 and result["eval_samples"] == 20 and result["steps"] == 60
    return out, result


def test_eval_only_reproduces_the_result_exactly(quick_run, data_dir, tmp_path):
    out, result = quick_run
    proc = run_script("model01.py", "--eval-only", "--checkpoint", out / "best.pt", "--out-dir", tmp_path,
                      "--data-dir", data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "result.json").read_text())
    # n_test, eval_samples and the seed come from the checkpoint's own config
    assert (again["n_test"], again["eval_samples"], again["seed"]) == (200, 20, result["seed"])
    assert again["test_ll_nats"] == result["test_ll_nats"]  # bit for bit, not approximately
    assert again["test_ll_stderr"] == result["test_ll_stderr"]
    assert again["evaluated_checkpoint"] == str(out / "best.pt")


def test_figures_only_redraws_bit_identical_figures_and_writes_no_result(quick_run, data_dir, tmp_path):
    out, _ = quick_run
    result_bytes = (out / "result.json").read_bytes()
    proc = run_script("model01.py", "--eval-only", "--figures-only", "--checkpoint", out / "best.pt",
                      "--out-dir", tmp_path, "--data-dir", data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test L_" not in proc.stdout + proc.stderr  # no test-set pass
    assert not (tmp_path / "result.json").exists()
    for name in FIGURES:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    assert (out / "result.json").read_bytes() == result_bytes


def test_figures_only_without_eval_only_is_a_clear_error(capsys):
    code = training.main(model01.RUNG, model01.build_parser(), ["--figures-only"])
    assert code == 2
    assert "--figures-only needs --eval-only --checkpoint PATH" in capsys.readouterr().err
