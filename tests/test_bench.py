"""bench.py: a tiny real run writes a well-formed report; the training step has no host synchronisation.

Speed itself is only measured by bench.py (no timing assertions here). What is checked: the report's
structure and internal consistency, that the naive reference computes the same model as ours, and
that training.train_step never reads a device value on the host (counted by measure.HostSyncCounter,
which works on CPU too), while the counter does catch such reads.
"""
import dataclasses
import importlib
import json
import os
import shutil

import pytest
import torch

import bench
import data as data_lib
import measure
import training
from conftest import run_script


def small_model01(seed=0):
    import model01

    cfg = model01.Config(hidden=32, latent_dim=8, batch_size=16, importance_samples=3)
    torch.manual_seed(seed)
    return model01.IWAE(cfg, data_lib.DATASETS["binarized-mnist"]), cfg


def dynamic_split(n=32) -> data_lib.Split:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)
    return data_lib.Split(images, binary=True, dynamic_binarize=True)


@pytest.fixture
def no_validation():
    """training.main switches torch.distributions' argument checks off; restore the default afterwards."""
    before = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    yield
    torch.distributions.Distribution.set_default_validate_args(before)


def test_counter_catches_host_reads():
    t = torch.ones(3)
    counter = measure.HostSyncCounter()
    with counter:
        t.sum().item()
        bool((t > 0).all())
        t[t > 0]  # boolean indexing: a data-dependent shape
        t[torch.tensor([0, 2])] = 0.0  # integer indexing: no read
        (t * 2).exp()  # no read
    assert counter.counts == {"_local_scalar_dense": 2, "index[bool mask]": 1}


def test_train_step_reads_nothing_on_the_host(no_validation):
    model, cfg = small_model01()
    params = [p for p in model.parameters()]
    optimizer = training.make_optimizer(params, cfg)
    batcher = data_lib.Batcher(dynamic_split(), cfg.batch_size, seed=0)
    meters = training.StepMeters(torch.device("cpu"))
    ema_model = small_model01()[0].requires_grad_(False)
    before = [p.detach().clone() for p in params]

    def steps(start, n):
        for step in range(start, start + n):
            training.train_step(model, optimizer, params, batcher.next(), cfg, step, 100, meters, amp=False,
                                ema=(ema_model, model), poison=step == 3)

    steps(0, 2)  # optimizer state exists from here on
    syncs = measure.count_host_syncs(lambda: steps(2, 3))  # crosses an epoch boundary (2 batches per epoch)
    assert syncs["total"] == 0, syncs
    assert meters.skipped.item() == 1 and meters.taken.item() == 4  # the poisoned step was skipped on the device
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, params))


def test_distribution_validation_would_sync():
    """Why training.main turns argument validation off: with it, every log_prob reads the device."""
    model, cfg = small_model01()
    x = dynamic_split(8).to_float(dynamic_split(8).images)
    before = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(True)
    try:
        syncs = measure.count_host_syncs(lambda: model(x, 2))
    finally:
        torch.distributions.Distribution.set_default_validate_args(before)
    assert syncs["total"] > 0


def test_naive_forward_computes_the_same_model(no_validation):
    """With one sample both draw the same noise, so the naive per-sample loop must match model01 exactly."""
    model, _ = small_model01()
    x = dynamic_split(8).to_float(dynamic_split(8).images)
    torch.manual_seed(3)
    ours = model(x, 1)
    torch.manual_seed(3)
    naive = bench.naive_forward_model01(model, x, 1)
    for key in ("log_px_z", "log_pz", "log_qz"):
        assert naive[key].shape == ours[key].shape == (1, 8)
        torch.testing.assert_close(naive[key], ours[key])


SMALL = {"hidden": 16, "width": 8, "features": 32, "latent_layers": 3, "encoder_blocks": 1}


@pytest.mark.parametrize("name", bench.available_models())
def test_every_registry_entry_has_a_faithful_naive_forward(name, no_validation):
    """Each rung's naive forward equals its real forward for one sample (same noise), returns [k, B]
    for k samples, and leaves the model as it was (the encoder is used, then put back)."""
    spec = bench.REGISTRY[name]
    rung = importlib.import_module(spec.script).RUNG
    info = data_lib.DATASETS[spec.dataset]
    defaults = dataclasses.asdict(rung.config_class())
    small = {key: value for key, value in SMALL.items() if key in defaults}  # the same code paths, fewer flops
    cfg = rung.config_class.from_dict({**defaults, **spec.overrides, **small, "dataset": spec.dataset})
    torch.manual_seed(0)
    model = rung.build_model(cfg, info)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 2 if info.binary else 256, (2, *info.shape), dtype=torch.uint8, generator=generator)
    x = data_lib.Split(images, binary=info.binary).to_float(images)
    torch.manual_seed(3)
    ours = model(x, 1)
    torch.manual_seed(3)
    naive = spec.naive_forward(model, x, 1)
    for key in ("log_px_z", "log_pz", "log_qz"):
        torch.testing.assert_close(naive[key], ours[key], rtol=1e-5, atol=1e-3)
    three = spec.naive_forward(model, x, 3)
    assert all(three[key].shape == (3, 2) for key in ("log_px_z", "log_pz", "log_qz"))
    torch.manual_seed(3)
    again = model(x, 1)  # the encoder is back
    torch.testing.assert_close(again["log_px_z"], ours["log_px_z"])


def test_device_slug(monkeypatch):
    for name, slug in [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
                       ("Tesla V100-SXM2-16GB", "v100"), ("NVIDIA GeForce RTX 4090", "4090")]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert bench.device_slug(torch.device("cuda", 0)) == slug
    assert bench.device_slug(torch.device("cpu")) == "cpu"


def test_bad_settings_exit_2(capsys):
    assert bench.main(["--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "tpu"])
    assert exit_info.value.code == 2


def test_tiny_real_run_writes_a_consistent_report(tmp_path, data_dir):
    out = tmp_path / "bench.json"
    flags = ["--device", "cpu", "--threads", "1", "--batch-size", "20", "--steps", "2", "--repeats", "2",
             "--warmup-steps", "1", "--eval-samples", "30", "--eval-images", "3", "--eval-repeats", "1",
             "--data-dir", data_dir, "--out", out]
    proc = run_script("bench.py", *flags, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("command", "git_commit", "date", "device", "torch_version", "settings", "memory_measure"):
        assert report[key] not in (None, ""), key
    assert report["device_type"] == "cpu"
    assert report["command"].startswith("python bench.py --device cpu")
    settings = report["settings"]
    assert (settings["batch_size"], settings["steps"], settings["eval_samples"]) == (20, 2, 30)
    assert settings["threads"] == [1] and settings["models"] == ["model01"]  # model01 is the CPU default

    (result,) = report["results"]
    assert result["model"] == "model01" and result["threads"] == 1
    assert result["batch_size"] == 20 and result["importance_samples"] == 5 and result["parameters"] > 0
    train = result["train"]
    for variant in ("ours", "naive"):
        v = train[variant]
        assert v["images_per_s"] > 0 and len(v["images_per_s_repeats"]) == 2 and v["peak_memory_bytes"] > 0
        assert v["all_steps_finite"]
    assert train["speedup"] == pytest.approx(train["ours"]["images_per_s"] / train["naive"]["images_per_s"])
    assert train["ours"]["host_syncs_per_step"]["total"] == 0
    assert train["naive"]["host_syncs_per_step"]["total"] > 0  # .item() for the skip, argument validation
    evaluation = result["eval"]
    assert (evaluation["eval_samples"], evaluation["eval_images"]) == (30, 3)
    assert evaluation["speedup"] == pytest.approx(evaluation["ours"]["samples_per_s"]
                                                  / evaluation["naive"]["samples_per_s"])
    # both evaluations estimate L_30 of the same weights on the same 3 images, with independent noise
    # (exact agreement of the two forward passes is test_naive_forward_computes_the_same_model)
    assert abs(evaluation["ours"]["ll_nats"] - evaluation["naive"]["ll_nats"]) < 15.0
    assert -800 < evaluation["ours"]["ll_nats"] < -100
    assert "model01, 1 threads: training" in proc.stdout and "x the naive step" in proc.stdout


def test_eval_phase_alone_times_the_previous_cpu_defaults_too(tmp_path, data_dir):
    out = tmp_path / "bench.json"
    flags = ["--device", "cpu", "--threads", "1", "--phases", "eval", "--models", "model01", "model03",
             "--eval-samples", "40", "--eval-images", "2", "--eval-repeats", "1", "--data-dir", data_dir, "--out", out]
    proc = run_script("bench.py", *flags, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["model"] for r in report["results"]] == ["model01", "model03"]
    for result in report["results"]:
        assert result["train"] == {}  # --phases eval: no training measured
        ev = result["eval"]
        assert set(ev) >= {"ours", "naive", "previous_cpu_defaults"}
        assert ev["previous_cpu_defaults"]["chunk_latents"] == bench.PREVIOUS_CPU_EVAL_CHUNK == 1 << 14
        module = importlib.import_module(result["script"][:-3])
        assert ev["ours"]["chunk_latents"] == ev["chunk_latents"] == module.RUNG.cpu_eval_chunk
        assert ev["speedup_vs_previous_cpu_defaults"] == pytest.approx(
            ev["ours"]["samples_per_s"] / ev["previous_cpu_defaults"]["samples_per_s"])
        assert ev["hours_for_test_l5000"] == pytest.approx(5e7 / ev["ours"]["samples_per_s"] / 3600)
        # the same weights and images: the three estimates of L_40 differ only by Monte Carlo noise
        lls = [ev[v]["ll_nats"] for v in ("ours", "naive", "previous_cpu_defaults")]
        assert max(lls) - min(lls) < 0.02 * abs(lls[0])
    assert "the previous CPU defaults" in proc.stdout and "training" not in proc.stdout.split("\n\n")[-1]


def test_baseline_commit_times_the_script_at_that_commit_on_the_same_weights(tmp_path, data_dir):
    """--baseline-commit HEAD: the script as committed beside this tree's shared modules. With --set the rung is
    narrowed (unknown keys fail with exit 2); the same weights and passes give the same per-image values whenever the
    script's evaluation pass is unchanged since HEAD, and bench says which."""
    out = tmp_path / "bench.json"
    flags = ["--device", "cpu", "--threads", "1", "--phases", "eval", "--models", "model04", "--set", "width=8",
             "latent_channels=2", "--eval-samples", "20", "--eval-images", "1", "--eval-repeats", "1",
             "--baseline-commit", "HEAD", "--data-dir", data_dir, "--out", out]
    proc = run_script("bench.py", *flags, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads(out.read_text())["results"][0]["eval"]
    assert ev["baseline"]["commit"] == "HEAD" and ev["baseline"]["same_per_image_values"] is True
    assert ev["baseline"]["ll_nats"] == ev["ours"]["ll_nats"]
    assert ev["speedup_vs_baseline"] == pytest.approx(ev["ours"]["samples_per_s"] / ev["baseline"]["samples_per_s"])
    assert json.loads(out.read_text())["settings"]["set"] == ["width=8", "latent_channels=2"]
    for bad in (["--set", "no_such_field=1"], ["--set", "width"], ["--baseline-commit", "no-such-commit"]):
        bad_out = tmp_path / "bad.json"
        proc = run_script("bench.py", *flags[:-2], "--out", bad_out, *bad, env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2 and "error:" in proc.stderr and not bad_out.exists(), (bad, proc.stderr[-500:])


def test_dataset_and_eval_chunks_time_model04_on_colour_images_at_other_pass_sizes(tmp_path, data_dir):
    """--dataset puts every rung on another data set (here real CIFAR10-JPEG files through the folder route), and
    --eval-chunks adds our evaluation at other pass sizes as variants, each against ours at the rung's CPU default
    (model04's for the colour mixture: 32 latents per pass)."""
    source = data_dir / "CIFAR10-JPEG"
    if not (source / "train").is_dir():
        pytest.skip(f"needs {source} (CIFAR-10 as JPEG in ImageFolder layout; CI has it in ../shared/data)")
    root = tmp_path / "colour"
    for split, n in (("train", 20), ("test", 2)):
        (root / split / "any").mkdir(parents=True)
        for name in sorted(os.listdir(source / split / "cat"))[:n]:
            shutil.copy(source / split / "cat" / name, root / split / "any" / name)
    out = tmp_path / "bench.json"
    flags = ["--device", "cpu", "--threads", "1", "--phases", "eval", "--models", "model04", "--dataset",
             f"folder:{root}", "--set", "width=8", "latent_channels=2", "--eval-samples", "20", "--eval-images", "1",
             "--eval-repeats", "1", "--data-dir", data_dir, "--out", out]
    proc = run_script("bench.py", *flags, "--eval-chunks", "8", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["results"][0]
    assert result["dataset"] == f"folder:{root}"
    ev = result["eval"]
    assert ev["ours"]["chunk_latents"] == ev["chunk_latents"] == 32
    assert ev["chunk_8"]["chunk_latents"] == 8 and "previous_cpu_defaults" not in ev
    assert ev["speedup_chunk_8"] == pytest.approx(ev["chunk_8"]["samples_per_s"] / ev["ours"]["samples_per_s"])
    # the same weights, image and S: the two estimates of L_20 differ only by their latents' noise (bits/dim ~8)
    assert abs(ev["chunk_8"]["ll_nats"] - ev["ours"]["ll_nats"]) < 0.05 * abs(ev["ours"]["ll_nats"])
    assert "as fast with 8 latents per pass" in proc.stdout
    proc = run_script("bench.py", *flags, "--eval-chunks", "0", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "--eval-chunks" in proc.stderr
