"""model01.py end to end: the documented --quick command on real MNIST, its files, and clear errors."""
import json

import pytest
import torch
from PIL import Image

import data as data_lib
import training
from conftest import run_script
from model01 import IWAE, Config

FILES = ["config.json", "log.jsonl", "ckpt.pt", "best.pt", "result.json",
         "model01_imgs.png", "model01_recs.png", "model01_samples.png"]
RESULT_KEYS = ["model", "dataset", "likelihood", "importance_samples", "objective", "eval_samples", "n_test",
               "test_ll_nats", "test_ll_stderr", "test_bpd", "steps", "epochs", "wall_time_s", "device",
               "command", "git_commit", "seed", "date"]


@pytest.fixture(scope="module")
def quick_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "run"
    proc = run_script("model01.py", "--quick", "--data-dir", data_dir, "--out-dir", out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_quick_run_writes_every_file_and_a_complete_result(quick_run):
    out, proc = quick_run
    for name in FILES:
        assert (out / name).is_file(), name
    result = json.loads((out / "result.json").read_text())
    missing = [k for k in RESULT_KEYS if k not in result]
    assert not missing, missing
    assert result["model"] == "model01" and result["dataset"] == "binarized-mnist"
    assert (result["importance_samples"], result["objective"], result["eval_samples"]) == (5, "iwae", 100)
    assert result["n_test"] == 1000 and result["steps"] == 500 and result["quick"] is True
    assert result["test_bpd"] is None  # binary data: nats only
    # 500 steps of a real model: far better than uniform pixels (784 ln 2 = 543 nats), far from converged
    assert -260 < result["test_ll_nats"] < -120 and 0 < result["test_ll_stderr"] < 5
    assert result["best_val_bound_nats"] < 0 and "--quick" in result["command"]
    assert "test L_100 on 1000 images" in proc.stdout
    for kind in ("imgs", "recs", "samples"):
        image = Image.open(out / f"model01_{kind}.png")
        assert image.size == (8 * 30 + 2, 8 * 30 + 2)  # 8x8 grid of 28x28 with 2-pixel padding


def test_log_is_jsonl_with_types_and_the_loss_goes_down(quick_run):
    out, _ = quick_run
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    types = {r["type"] for r in records}
    assert {"config", "train", "val", "done", "test"} <= types
    train = [r for r in records if r["type"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 20
    assert all(r["skipped_total"] == 0 for r in train)


def test_checkpoint_round_trip_rebuilds_the_same_model(quick_run, data_dir):
    out, _ = quick_run
    ckpt = training.load_checkpoint(out / "ckpt.pt", "model01")
    saved_config = json.loads((out / "config.json").read_text())
    assert ckpt["config"] == {k: v for k, v in saved_config.items() if k not in ("model", "run_name")}
    assert ckpt["step"] == 500 and ckpt["optimizer"] is not None and ckpt["rng"]["torch"] is not None
    cfg = Config.from_dict(ckpt["config"])
    model = IWAE(cfg, data_lib.DATASETS["binarized-mnist"])
    model.load_state_dict(ckpt["model"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt["model"][name])
    with pytest.raises(training.UserError, match="model01"):
        training.load_checkpoint(out / "ckpt.pt", "model02")


def test_rerun_with_another_config_in_the_same_out_dir_is_refused(quick_run, data_dir):
    out, _ = quick_run
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = run_script("model01.py", "--quick", "--resume", "--latent-dim", "20", "--data-dir", data_dir,
                      "--out-dir", out)
    assert proc.returncode == 2
    assert "different config" in proc.stderr and "latent_dim" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_unknown_flag_values_and_missing_data_are_clear_errors(tmp_path):
    proc = run_script("model01.py", "--objective", "elbo", "--out-dir", tmp_path / "a")
    assert proc.returncode == 2 and "invalid choice: 'elbo'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("model01.py", "--importance-samples", "0", "--out-dir", tmp_path / "b")
    assert proc.returncode == 2 and "--importance-samples must be >= 1" in proc.stderr
    proc = run_script("model01.py", "--quick", "--data-dir", tmp_path / "nothing", "--out-dir", tmp_path / "c",
                      env={"VAE_DATA_DOWNLOAD": "0"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train-images-idx3-ubyte.gz" in proc.stderr and str(tmp_path / "nothing") in proc.stderr


def test_quick_run_trains_in_float32_on_cpu(quick_run):
    result = json.loads((quick_run[0] / "result.json").read_text())
    assert (result["train_precision"], result["eval_precision"]) == ("float32", "float32")


def test_cpu_bf16_trains_under_autocast_and_evaluates_in_float32(data_dir, tmp_path):
    out = tmp_path / "bf16"
    proc = run_script("model01.py", "--quick", "--cpu-bf16", "--device", "cpu", "--max-steps", "150",
                      "--n-test", "100", "--data-dir", data_dir, "--out-dir", out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert (result["train_precision"], result["eval_precision"]) == ("bf16 autocast", "float32")
    assert result["config"]["cpu_bf16"] is True and result["n_skipped"] == 0
    train = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in train if r["type"] == "train"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 20
    assert -300 < result["test_ll_nats"] < -120


def test_checkpoint_without_a_later_config_key_resumes_with_its_default(quick_run, data_dir, tmp_path):
    """A checkpoint written before cpu_bf16 existed lacks the key; resuming it must not call that a mismatch."""
    src, _ = quick_run
    out = tmp_path / "old"
    out.mkdir()
    ckpt = torch.load(src / "ckpt.pt", map_location="cpu", weights_only=False)
    del ckpt["config"]["cpu_bf16"]
    torch.save(ckpt, out / "ckpt.pt")
    proc = run_script("model01.py", "--quick", "--resume", "--max-steps", "510", "--n-test", "50",
                      "--data-dir", data_dir, "--out-dir", out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 510
    # and without a precision history it is taken to have trained in its config's precision throughout
    assert result["train_precision"] == "float32" and result["train_precision_history"] == [[0, "float32"]]


def test_resume_may_switch_cpu_bf16_and_records_the_steps_of_each_precision(quick_run, data_dir, tmp_path):
    """A campaign moves between CPUs with and without native bf16: --cpu-bf16 may change on resume (it alone
    among the arithmetic settings), and the checkpoint and result say which steps ran in which precision."""
    src, _ = quick_run
    out = tmp_path / "switch"
    out.mkdir()
    for name in ("ckpt.pt", "best.pt", "config.json", "log.jsonl"):
        (out / name).write_bytes((src / name).read_bytes())
    proc = run_script("model01.py", "--quick", "--resume", "--cpu-bf16", "--max-steps", "520", "--n-test", "50",
                      "--device", "cpu", "--data-dir", data_dir, "--out-dir", out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training precision changes at step 500: float32 -> bf16 autocast" in proc.stdout
    history = [[0, "float32"], [500, "bf16 autocast"]]
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 520 and result["train_precision"] == "mixed"
    assert result["train_precision_history"] == history and result["config"]["cpu_bf16"] is True
    assert torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)["precision_history"] == history
    resume = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "resume"]
    assert resume[-1]["train_precision"] == "bf16 autocast"


def test_run_name_carries_a_batch_other_than_the_default():
    """A schedule in epochs gives 5x the updates at the paper's batch of 20: that run is another experiment and must
    not publish over the batch-100 row, whose name stays as published."""
    import model01
    assert training.run_name(model01.RUNG, Config()) == "model01_binarized-mnist_iwae_k5_seed0"
    assert training.run_name(model01.RUNG, Config(batch_size=20)) == "model01_binarized-mnist_iwae_k5_b20_seed0"
