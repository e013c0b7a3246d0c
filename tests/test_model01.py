"""model01.py end to end: the documented --quick command on real MNIST, its files, and clear errors."""
import json

import pytest
import torch
from PIL import Image

import data as data_lib
import config
import run_files
import runtime
from conftest import run_script
from model01 import IWAE, Config

FILES = ["config.json", "log.jsonl", "ckpt.pt", "best.pt", "result.json", "test_ll_nats.npy",
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
    stats = result["latent_layer_stats"]  # after 500 steps some units carry information, not all 50
    assert len(stats) == 1 and 0 < result["active_units_total"] == stats[0]["active_units"] < 50
    assert 0 < stats[0]["kl_nats"] < 100 and result["latent_stats_images"] == 1000
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
    ckpt = run_files.load_checkpoint(out / "ckpt.pt", "model01")
    saved_config = json.loads((out / "config.json").read_text())
    assert ckpt["config"] == {k: v for k, v in saved_config.items() if k not in ("model", "run_name")}
    assert ckpt["step"] == 500 and ckpt["optimizer"] is not None and ckpt["rng"]["torch"] is not None
    cfg = Config.from_dict(ckpt["config"])
    model = IWAE(cfg, data_lib.DATASETS["binarized-mnist"])
    model.load_state_dict(ckpt["model"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt["model"][name])
    with pytest.raises(runtime.UserError, match="model01"):
        run_files.load_checkpoint(out / "ckpt.pt", "model02")


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
    assert config.run_name(model01.RUNG, Config()) == "model01_binarized-mnist_iwae_k5_seed0"
    assert config.run_name(model01.RUNG, Config(batch_size=20)) == "model01_binarized-mnist_iwae_k5_b20_seed0"
    assert config.run_name(model01.RUNG, Config(batch_size=20, init="burda")) == \
        "model01_binarized-mnist_iwae_k5_b20_initburda_seed0"


def test_mean_image_is_the_mean_of_what_training_sees():
    """Split.mean_image is E[to_float(x)] under each pixel convention: dynamic binarization (intensity / 255 is
    the probability of a 1), fixed {0, 1} and 8-bit."""
    images = torch.tensor([[[[0, 255]]], [[[51, 255]]]], dtype=torch.uint8)  # [2, 1, 1, 2]
    dynamic = data_lib.Split(images, binary=True, dynamic_binarize=True)
    assert torch.allclose(dynamic.mean_image(), torch.tensor([[[0.1, 1.0]]]))
    draws = torch.stack([dynamic.to_float(images, torch.Generator().manual_seed(i)) for i in range(4000)])
    assert torch.allclose(draws.mean((0, 1)), dynamic.mean_image(), atol=0.02)
    fixed = data_lib.Split(torch.tensor([[[[0, 1]]], [[[1, 1]]]], dtype=torch.uint8), binary=True)
    assert torch.equal(fixed.mean_image(), torch.tensor([[[0.5, 1.0]]]))
    assert torch.allclose(data_lib.Split(images, binary=False).mean_image(), torch.tensor([[[0.1, 1.0]]]))


def test_burda_init_is_the_papers_glorot_and_output_bias():
    """--init burda: every weight U(+-sqrt(6 / (fan_in + fan_out))) (its std is that bound / sqrt(3)), every bias 0
    but p(x|z)'s, which is logit(mean training pixel) clipped to [0.001, 0.999]; pytorch keeps nn.Linear's."""
    import model01
    info = data_lib.DATASETS["binarized-mnist"]
    torch.manual_seed(0)
    model = IWAE(Config(init="burda"), info)
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    images[:2, 0, 0, :3] = torch.tensor([255, 51, 0], dtype=torch.uint8)  # means 0.5, 0.1, 0 (clipped to 0.001)
    images[:, 0, 1, 0] = 255  # mean 1 (clipped to 0.999)
    with torch.no_grad():
        model01.init_output_bias(model, data_lib.Split(images, binary=True, dynamic_binarize=True), Config(init="burda"))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7  # encoder 2, the mean and log-scale heads, decoder 3
    for layer in linears:
        bound = (6 / (layer.in_features + layer.out_features)) ** 0.5
        assert layer.weight.abs().max() <= bound and abs(layer.weight.std() / (bound / 3 ** 0.5) - 1) < 0.05
        if layer is not model.decoder[-1]:
            assert torch.count_nonzero(layer.bias) == 0
    logit = lambda p: torch.log(torch.tensor(p)) - torch.log1p(torch.tensor(-p))  # noqa: E731
    bias = model.decoder[-1].bias.view(28, 28)
    assert torch.allclose(bias[0, :3], torch.stack([logit(0.5), logit(0.1), logit(0.001)]), atol=1e-5)
    assert torch.allclose(bias[1, 0], logit(0.999), atol=1e-5) and torch.allclose(bias[2:], logit(0.001), atol=1e-5)

    torch.manual_seed(0)
    default = IWAE(Config(), info)
    with torch.no_grad():
        model01.init_output_bias(default, None, Config())  # nothing to do, not even a look at the data
    assert all(torch.count_nonzero(m.bias) == m.bias.numel() for m in default.modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(runtime.UserError, match="unknown init 'glorot'"):
        IWAE(Config(init="glorot"), info)


def test_a_run_with_burda_init_starts_from_it(data_dir, tmp_path):
    """The training path calls the rung's init_from_data on the fresh model: after one Adam step (each parameter
    moves by at most about lr = 1e-3) the output bias is still logit(mean training pixel)."""
    out = tmp_path / "burda"
    proc = run_script("model01.py", "--quick", "--init", "burda", "--max-steps", "1", "--n-test", "20",
                      "--eval-samples", "2", "--data-dir", data_dir, "--out-dir", out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"]["init"] == "burda" and ckpt["run_name"].endswith("_initburda_seed0_quick")
    train = data_lib.load_data("binarized-mnist", data_dir).train
    p = train.mean_image().flatten().clamp(0.001, 0.999)
    bias = ckpt["model"]["decoder.4.bias"]
    assert (bias - (torch.log(p) - torch.log1p(-p))).abs().max() < 2e-3


def test_latent_statistics_count_active_units_and_kl_in_closed_form():
    """With q's mean a known function of the pixels and log-scale 0: unit 0 = pixel 0 (variance 1/4 over the
    images: active), unit 1 = 0.1 * pixel 1 (variance 1/400 < 0.01: not), the rest 0; KL(q || N(0, I)) is then
    half the squared mean summed over units, averaged over the images."""
    import model01
    torch.manual_seed(0)
    model = IWAE(Config(), data_lib.DATASETS["binarized-mnist"])
    model.encoder = torch.nn.Flatten()
    model.posterior.mean = torch.nn.Linear(784, 50)
    model.posterior.log_scale = torch.nn.Linear(784, 50)
    for layer in (model.posterior.mean, model.posterior.log_scale):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    with torch.no_grad():
        model.posterior.mean.weight[0, 0], model.posterior.mean.weight[1, 1] = 1.0, 0.1
    images = torch.bernoulli(torch.full((2500, 1, 28, 28), 0.5)).to(torch.uint8)  # 3 passes of 1000, one partial
    split = data_lib.Split(images, binary=True)
    stats = model01.latent_statistics(model, split, Config())
    x = images.flatten(1).double()
    assert x[:, 0].var(unbiased=False) > 0.2 and (0.01 * x[:, 1]).var(unbiased=False) < 0.005
    kl = 0.5 * (x[:, 0] ** 2 + 0.01 * x[:, 1] ** 2).mean().item()
    assert stats["active_units_total"] == 1 == stats["latent_layer_stats"][0]["active_units"]
    assert abs(stats["latent_layer_stats"][0]["kl_nats"] - kl) < 1e-5 and stats["latent_stats_images"] == 2500
    assert model.training  # left as it was found
