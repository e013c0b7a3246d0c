"""--eval-only on a --quick checkpoint reproduces the run's test log-likelihood exactly, and
--figures-only redraws its seeded figures bit for bit without touching any result.json."""
import json

import pytest

import model01
import publishing
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


def test_publishing_a_rescore_keeps_the_training_facts_and_the_number_it_replaces(tmp_path):
    """An S=5000 re-score of an older weights-only checkpoint replaces its S=100 row: the training facts the
    checkpoint lacks come from the row it replaces (and are named), and that row's numbers stay in previous_results."""
    published = tmp_path / "published.json"
    old = {"run_name": "m_run", "eval_samples": 100, "n_test": 10, "test_ll_nats": -90.5, "test_ll_stderr": 1.0,
           "test_bpd": None, "device": "CPU A", "command": "python m.py --eval-samples 100", "git_commit": "a" * 40,
           "date": "2026-11-21", "stopped_by_time_limit": True, "n_val": 1000, "val_samples": 20, "world_size": 1}
    published.write_text(json.dumps(old))
    rescore = {"run_name": "m_run", "evaluated_checkpoint": "checkpoints/m_run.pt", "eval_samples": 5000, "n_test": 10,
               "test_ll_nats": -89.9, "test_ll_stderr": 1.0, "test_bpd": None, "stopped_by_time_limit": None,
               "val_samples": 20, "git_commit": "b" * 40}
    result = tmp_path / "result.json"
    result.write_text(json.dumps(rescore))
    publishing.publish_result(result, published)
    got = json.loads(published.read_text())
    assert (got["eval_samples"], got["test_ll_nats"], got["git_commit"]) == (5000, -89.9, "b" * 40)
    assert got["stopped_by_time_limit"] is True and got["n_val"] == 1000 and got["world_size"] == 1
    assert got["training_summary_from_previous_result"] == ["n_val", "stopped_by_time_limit", "world_size"]
    assert got["previous_results"] == [{k: old[k] for k in ("eval_samples", "n_test", "test_ll_nats", "test_ll_stderr",
                                                              "test_bpd", "device", "command", "git_commit", "date")}]
    assert json.loads(result.read_text()) == rescore  # the run's own result.json is left as it was
    # another run's row, or a training run's result, is copied as it is
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**old, "run_name": "another"}))
    publishing.publish_result(result, other)
    assert json.loads(other.read_text()) == rescore


def test_rescoring_the_runs_best_checkpoint_keeps_the_runs_total_steps(tmp_path):
    """A published checkpoint is the run's best (validation-selected) one: a re-score sees the step of those weights
    (1500) and the training time up to them, but the row must keep how long the run trained (2500 steps)."""
    published = tmp_path / "published.json"
    old = {"run_name": "m_run", "eval_samples": 100, "n_test": 10, "test_ll_nats": -90.5, "steps": 2500,
           "epochs": 4.24, "train_time_s": 1162.9, "best_step": 1500}
    published.write_text(json.dumps(old))
    rescore = {"run_name": "m_run", "evaluated_checkpoint": "checkpoints/m_run.pt", "eval_samples": 5000,
               "n_test": 10, "test_ll_nats": -89.9, "steps": 1500, "epochs": 2.54, "train_time_s": 698.0,
               "best_step": 1500}
    result = tmp_path / "result.json"
    result.write_text(json.dumps(rescore))
    publishing.publish_result(result, published)
    got = json.loads(published.read_text())
    assert (got["steps"], got["epochs"], got["train_time_s"], got["best_step"]) == (2500, 4.24, 1162.9, 1500)
    assert got["training_summary_from_previous_result"] == ["steps", "epochs", "train_time_s"]
    # the checkpoint of the last step (best_step == steps): nothing to carry
    published.write_text(json.dumps({**old, "steps": 1500}))
    publishing.publish_result(result, published)
    got = json.loads(published.read_text())
    assert got["steps"] == 1500 and "training_summary_from_previous_result" not in got
