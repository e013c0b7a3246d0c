"""model04: the hierarchical VAE's importance sampling through every layer, its bounds, and end-to-end runs.

Models here are tiny (width 8) and, where the maths needs a posterior that differs from the prior,
their posterior heads are re-initialised at random (model04 starts with q = p, where every check of
log p(z) - log q(z|x) would pass trivially).
"""
import json
import math
import pickle

import numpy as np
import pytest
import torch

import data as data_lib
import model04
import evaluation
import runtime
import training
from conftest import run_script
from distributions import log_mean_exp


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation (and, on a busy
    machine, spin-waiting that made these tests 20x slower). Restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> model04.Config:
    values = dict(width=8, latent_channels=2, latent_layers=4, downsamplings=2, encoder_blocks=1,
                  mixture_components=3)
    return model04.Config(**{**values, **overrides})


SMALL = (1, 12, 12)  # binary images for the maths tests: 12 -> 6 -> 3, cheap on a CPU


def tiny_model(dataset="binarized-mnist", seed=0, posterior_noise=0.3, shape=None, **overrides):
    """A random model04 whose posterior differs from its prior (random posterior heads); `shape`
    (C, H, W) replaces the data set's image shape."""
    torch.manual_seed(seed)
    info = data_lib.DATASETS[dataset]
    if shape is not None:
        info = data_lib.DatasetInfo(info.name, shape, info.binary)
    model = model04.HierarchicalVAE(tiny_config(dataset=dataset, **overrides), info)
    with torch.no_grad():
        for layer in model.layers[:len(model.latent_resolution)]:  # the stochastic ones
            head = layer.posterior_out[-1]
            head.weight.normal_(0.0, posterior_noise)
            head.bias.normal_(0.0, posterior_noise)
    return model.eval()


def binary_images(n, seed=0, side=28):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, side, side, generator=g) < 0.3).float()


def eight_bit_images(n, channels=3, side=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, side, side), generator=g).float() / 255


def log_w(out):
    return evaluation.log_weights(out).double()  # [k, B]


# ----------------------------------------------------------------------------- shapes and sample layout


def test_layer_plan_spreads_layers_coarsest_first():
    assert model04.layer_resolutions(6, 3) == [3, 3, 2, 2, 1, 1]
    assert model04.layer_resolutions(5, 2) == [2, 2, 2, 1, 1]
    model = tiny_model(latent_layers=5, downsamplings=3)
    assert model.resolutions == [(28, 28), (14, 14), (7, 7), (4, 4)]


@pytest.mark.parametrize("dataset", ["binarized-mnist", "cifar10"])
def test_every_layer_is_sampled_k_times(dataset):
    """With k > 1 every stochastic layer holds k*B sample-major rows; outputs are [k, B] / [L, B]."""
    k, batch = 3, 2
    model = tiny_model(dataset)
    c, h, w = data_lib.DATASETS[dataset].shape
    x = binary_images(batch) if dataset == "binarized-mnist" else eight_bit_images(batch)
    torch.manual_seed(1)
    features = model.encode(x)
    assert [tuple(f.shape) for f in features] == [(batch, 8, h // 2, w // 2), (batch, 8, h // 4, w // 4)]
    final, per_layer = model.top_down(k, batch, features)
    assert len(per_layer) == 4
    for (prior, posterior, z), d in zip(per_layer, model.layer_resolution):
        side = model.resolutions[d]
        assert tuple(z.shape) == (k * batch, 2, *side)
        assert tuple(prior.batch_shape) == tuple(posterior.batch_shape) == (k * batch,)
        assert tuple(posterior.event_shape) == (2, *side)
    assert tuple(final.shape) == (k * batch, 8, h // 2, w // 2)
    out = model(x, k)
    for key in ("log_px_z", "log_pz", "log_qz"):
        assert tuple(out[key].shape) == (k, batch) and torch.isfinite(out[key]).all()
    assert tuple(out["kl_per_layer"].shape) == (4, batch)


def test_sample_major_rows_belong_to_their_image():
    """Row i*B + b of every layer must be sample i of image b. With posteriors and priors nearly point
    masses (log-scales at their floor) all k samples of an image agree, so the final top-down state
    of each row must match its image run alone; the state depends on the image only through the
    sampled z_l, so a layer that mixed rows across images would show here."""
    model = tiny_model("binarized-mnist", shape=SMALL)
    with torch.no_grad():
        for layer in model.layers:
            layer.posterior_out[-1].bias[2:].fill_(-1e3)  # log-scale correction soft-clamped to -5
            layer.prior_net[-1].bias[2:4].fill_(-1e3)  # and the prior's log-scale to -5: q's scale e^-10
            layer.z_to_state.weight.mul_(10.0)  # make the state depend visibly on z_l
    x = binary_images(3, seed=5, side=12)
    k = 4
    with torch.no_grad():
        together, _ = model.top_down(k, 3, model.encode(x))  # [k*3, w, 6, 6]
        alone = torch.cat([model.top_down(1, 1, model.encode(x[b:b + 1]))[0] for b in range(3)])  # [3, ...]
        log_px_z = model(x, k)["log_px_z"]  # [k, 3]
        log_px_z_alone = torch.stack([model(x[b:b + 1], 1)["log_px_z"][0, 0] for b in range(3)])
    torch.testing.assert_close(together.reshape(k, 3, *together.shape[1:]), alone.expand(k, *alone.shape),
                               atol=1e-2, rtol=0)  # the samples' spread (scale e^-10, amplified) is ~1e-3
    assert (alone[0] - alone[1]).abs().max() > 0.1 and (alone[1] - alone[2]).abs().max() > 0.1
    torch.testing.assert_close(log_px_z, log_px_z_alone.expand(k, 3), atol=1e-2, rtol=0)


@pytest.mark.parametrize("dataset,shape", [("binarized-mnist", SMALL), ("cifar10", (3, 12, 12))])
def test_evaluation_pass_computes_what_the_training_graph_computes(dataset, shape):
    """Without autograd (evaluation) the top-down layers share one silu(h) between the prior and posterior heads and
    the output head applies its SiLU before the nearest upsampling; with autograd each keeps its own, so gradients
    round as before. Both must give the same log-weights bit for bit from the same random state."""
    model = tiny_model(dataset, shape=shape)
    x = binary_images(3, side=12) if dataset == "binarized-mnist" else eight_bit_images(3, side=12)
    torch.manual_seed(7)
    with torch.no_grad():
        fast = model(x, 5, analytic_kl=False)
    torch.manual_seed(7)
    with torch.enable_grad():
        graph = model(x, 5, analytic_kl=False)
    assert graph["log_px_z"].requires_grad and not fast["log_px_z"].requires_grad
    for key in ("log_px_z", "log_pz", "log_qz"):
        assert torch.equal(fast[key], graph[key].detach()), key


# ----------------------------------------------------------------------------- bounds


def test_importance_weighted_bound_beats_the_elbo():
    """Over independent draws: E[L_1] (the ELBO) < E[L_10] < E[L_100], each gap many standard errors wide."""
    model = tiny_model("binarized-mnist", seed=2, shape=SMALL)
    x = binary_images(8, seed=3, side=12)
    torch.manual_seed(4)
    with torch.no_grad():
        draws = torch.cat([log_w(model(x, 250)) for _ in range(4)])  # [1000, 8], independent samples
    bounds = {}
    for k in (1, 10, 100):
        per_group = log_mean_exp(draws.reshape(-1, k, 8), dim=1)  # [1000/k, 8]: L_k per image and group
        bounds[k] = (per_group.mean().item(), per_group.mean(1).std().item() / math.sqrt(per_group.shape[0]))
    (elbo, se1), (l10, se10), (l100, se100) = bounds[1], bounds[10], bounds[100]
    assert l10 - elbo > 4 * math.hypot(se1, se10), bounds
    assert l100 - l10 > 4 * math.hypot(se10, se100), bounds


def test_analytic_kl_elbo_agrees_with_sampled_elbo():
    """Same draws, two estimators of the ELBO: per layer, E[log q - log p | layers above] = KL, so the
    sampled and analytic terms agree in expectation (and log p(x|z) is the same number)."""
    model = tiny_model("binarized-mnist", seed=6, shape=SMALL)
    x = binary_images(4, seed=7, side=12)
    k = 1000
    with torch.no_grad():
        torch.manual_seed(8)
        sampled = model(x, k, analytic_kl=False)
        torch.manual_seed(8)
        analytic = model(x, k, analytic_kl=True)
    torch.testing.assert_close(sampled["log_px_z"], analytic["log_px_z"])
    torch.testing.assert_close(analytic["log_qz"], torch.zeros_like(analytic["log_qz"]))
    elbo_sampled, elbo_analytic = log_w(sampled), log_w(analytic)  # [k, B]
    difference = (elbo_sampled - elbo_analytic).flatten()
    stderr = difference.std() / math.sqrt(difference.numel())
    assert abs(difference.mean()) < 4 * stderr, (difference.mean().item(), stderr.item())
    assert elbo_analytic.std(0).mean() < elbo_sampled.std(0).mean()  # the point of the analytic KL
    kl_analytic = analytic["kl_per_layer"].sum(1)  # [L]: summed over images
    kl_sampled = sampled["kl_per_layer"].sum(1)
    assert (kl_analytic > 0.5).all()  # the random posteriors are far enough from the priors to matter
    torch.testing.assert_close(kl_sampled, kl_analytic, rtol=0.1, atol=0.5)


def test_training_mode_uses_the_analytic_kl_only_for_elbo_objectives():
    x = binary_images(2, side=12)
    for overrides, expect_analytic in [({}, True), (dict(objective="iwae", importance_samples=5), False),
                                       (dict(objective="vae", importance_samples=5), True),
                                       (dict(analytic_kl=False), False)]:
        model = tiny_model(shape=SMALL, **overrides).train()
        out = model(x, 2)
        assert bool((out["log_qz"] == 0).all()) == expect_analytic, overrides


def test_mixture_likelihood_is_a_pmf_on_rgb_images():
    """The 8-bit path: log p(x|z) of a mixture of discretized logistics is a log-probability (<= 0)."""
    model = tiny_model("cifar10", seed=9)
    assert model.likelihood_name == "logistic-mixture"
    x = eight_bit_images(2, seed=10)
    with torch.no_grad():
        out = model(x, 3)
        samples = model.sample(4)
    assert (out["log_px_z"] <= 0).all() and torch.isfinite(out["log_px_z"]).all()
    assert tuple(samples.shape) == (4, 3, 32, 32) and samples.min() >= 0 and samples.max() <= 1
    # real draws on the 8-bit grid (k/255), not the mixture's means; binary images show the Bernoulli means
    assert torch.equal(samples * 255, (samples * 255).round())
    torch.manual_seed(0)
    h, _ = model.top_down(1, 4, None)
    means = model.pixel_distribution(h, 1).mean[0]
    torch.manual_seed(0)
    assert not torch.equal(model.sample(4), means.clamp(0, 1))
    binary = tiny_model("binarized-mnist", seed=9, shape=SMALL)
    torch.manual_seed(1)
    probabilities = binary.sample(4)
    assert not torch.equal(probabilities, probabilities.round())  # means in (0, 1), not 0/1 draws


def test_latent_statistics_count_active_units():
    model = tiny_model("binarized-mnist", seed=11, shape=SMALL)
    split = data_lib.Split(binary_images(30, seed=12, side=12).to(torch.uint8), binary=True)
    stats = model04.latent_statistics(model, split, tiny_config())
    layers = stats["latent_layer_stats"]
    assert [s["resolution"] for s in layers] == ["3x3", "3x3", "6x6", "6x6"]
    assert [s["units"] for s in layers] == [18, 18, 72, 72]
    assert all(s["kl_nats"] > 0 and 0 <= s["active_units"] <= s["units"] for s in layers)
    assert stats["active_units_total"] == sum(s["active_units"] for s in layers)
    # a posterior equal to the prior carries nothing: no KL and no active units
    collapsed = tiny_model("binarized-mnist", seed=11, posterior_noise=0.0, shape=SMALL)
    for s in model04.latent_statistics(collapsed, split, tiny_config())["latent_layer_stats"]:
        assert s["kl_nats"] == 0 and s["active_units"] == 0, s


# ----------------------------------------------------------------------------- command line


def test_bad_likelihood_for_the_data_set_is_a_clear_error(capsys):
    validate = torch.distributions.Distribution._validate_args
    try:
        status = training.main(model04.RUNG, model04.build_parser(), ["--dataset", "cifar10", "--likelihood", "bernoulli"])
    finally:
        torch.distributions.Distribution.set_default_validate_args(validate)
    assert status == 2
    assert "8-bit pixels" in capsys.readouterr().err
    with pytest.raises(runtime.UserError, match="free-bits"):
        model04.Config(objective="iwae", importance_samples=5, free_bits=0.5)
    with pytest.raises(runtime.UserError, match="every latent resolution"):
        model04.Config(latent_layers=2, downsamplings=3)


SHRINK = ["--width", "8", "--latent-channels", "2", "--latent-layers", "3", "--downsamplings", "2",
          "--encoder-blocks", "1", "--val-samples", "2", "--eval-samples", "10", "--device", "cpu"]


def _check_run(out_dir, likelihood, layers, kinds):
    result = json.loads((out_dir / "result.json").read_text())
    assert result["model"] == "model04" and result["likelihood"] == likelihood
    assert result["latent_layers"] == layers and len(result["latent_layer_stats"]) == layers
    assert math.isfinite(result["test_ll_nats"]) and result["test_ll_nats"] < 0
    for kind in kinds:
        assert (out_dir / f"model04_{kind}.png").is_file(), kind
    losses = [r["loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())
              if r["type"] == "train"]
    return result, losses


def test_quick_run_on_binarized_mnist(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_script("model04.py", "--quick", "--data-dir", data_dir, "--out-dir", out, *SHRINK,
                      "--max-steps", "60", "--batch-size", "16", "--log-every", "20", "--n-test", "50",
                      "--warmup-steps", "0", env={"OMP_NUM_THREADS": "1"}, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result, losses = _check_run(out, "bernoulli", 3, ["imgs", "recs", "samples", "samples-t0.7"])
    assert result["n_test"] == 50 and result["eval_samples"] == 10 and result["quick"]
    assert losses[-1] < losses[0] - 50, losses  # from ~545 nats (random) down


def _write_synthetic_cifar(root, n_per_batch=260, n_test=40):
    """cifar-10-batches-py in the python-pickle format of the original (random smooth-ish images)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def images(n):
        coarse = rng.integers(0, 256, (n, 3, 8, 8))
        return np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3).astype(np.uint8).reshape(n, 3072)

    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images(n), "labels": list(rng.integers(0, 10, n))}, f)


def test_mixture_path_end_to_end_on_synthetic_cifar(tmp_path):
    _write_synthetic_cifar(tmp_path / "data")
    out = tmp_path / "run"
    proc = run_script("model04.py", "--quick", "--dataset", "cifar10", "--data-dir", tmp_path / "data",
                      "--out-dir", out, *SHRINK, "--max-steps", "20", "--batch-size", "8", "--n-test", "12",
                      "--mixture-components", "2", "--free-bits", "0.1",
                      env={"OMP_NUM_THREADS": "1", "VAE_DATA_VERIFY": "0"}, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result, _ = _check_run(out, "logistic-mixture", 3, ["imgs", "recs", "samples", "samples-t0.7"])
    assert 0 < result["test_bpd"] < 12
    from PIL import Image
    assert Image.open(out / "model04_samples.png").mode == "RGB"


def test_layer_figure_varies_only_with_the_resampled_layer():
    """layer_samples: row l resamples layer l alone (the layers above share one draw, the ones below sit at their
    prior means). A layer whose sample cannot reach the state (z_to_state zeroed) gives a row of identical images;
    the other rows vary along their columns."""
    torch.manual_seed(0)
    cfg = tiny_config(latent_layers=4, downsamplings=2)
    model = model04.HierarchicalVAE(cfg, data_lib.DatasetInfo("small", SMALL, binary=True)).eval()
    for layer in model.layers:  # make every prior broad so that resampling shows
        torch.nn.init.normal_(layer.z_to_state.weight, std=0.5)
    with torch.no_grad():
        model.layers[2].z_to_state.weight.zero_()
    grid = model.layer_samples(columns=5).reshape(4, 5, -1)  # [layer, column, pixels]
    spread = (grid - grid[:, :1]).abs().amax(dim=(1, 2))
    assert spread[2] < 1e-6 and all(spread[i] > 1e-3 for i in (0, 1, 3)), spread  # (rounding of batched convs)
    assert grid.shape == (4, 5, 144) and grid.min() >= 0 and grid.max() <= 1


def test_run_name_names_the_mixture_ablations():
    assert model04.run_suffix(model04.Config(dataset="cifar10-jpeg")) == "_L6"
    assert model04.run_suffix(model04.Config(dataset="cifar10-jpeg", mixture_components=1,
                                             rgb_coupling=False)) == "_L6_K1_nocoupling"
    assert model04.run_suffix(model04.Config(mixture_components=1)) == "_L6"  # Bernoulli: no mixture to name
    assert model04.run_suffix(model04.Config(width=32, latent_layers=1, top_down_layers=6)) == "_L1of6_w32"


def test_fewer_stochastic_layers_keep_the_network():
    """--latent-layers 1 --top-down-layers 4: the same top-down path at the same resolutions, with only the top
    layer stochastic: one (prior, posterior, z), one row of the layer figure, one layer of statistics, and the
    importance-weighted bound still bounds the ELBO from above."""
    model = tiny_model("binarized-mnist", seed=5, shape=SMALL, latent_layers=1, top_down_layers=4)
    full = tiny_model("binarized-mnist", seed=5, shape=SMALL)
    assert len(model.layers) == len(full.layers) == 4 and model.layer_resolution == full.layer_resolution
    assert model.latent_resolution == [2] and isinstance(model.layers[1], model04.DeterministicLayer)
    x = binary_images(6, seed=6, side=12)
    with torch.no_grad():
        out = model(x, k=50, analytic_kl=False)
        assert out["kl_per_layer"].shape == (1, 6)
        iwae, elbo = evaluation.bound_per_image(log_w(out), "iwae"), evaluation.bound_per_image(log_w(out), "vae")
    assert torch.all(iwae >= elbo - 1e-9)
    assert model.layer_samples(columns=3).shape == (3, 1, 12, 12)
    split = data_lib.Split(x.to(torch.uint8), binary=True)
    stats = model04.latent_statistics(model, split, tiny_config(latent_layers=1, top_down_layers=4))
    assert [s["resolution"] for s in stats["latent_layer_stats"]] == ["3x3"]
    assert model04.run_suffix(model04.Config(latent_layers=1, top_down_layers=6)) == "_L1of6"
    with pytest.raises(runtime.UserError, match="top-down-layers"):
        model04.Config(latent_layers=6, top_down_layers=3)


def test_skip_threshold_default_depends_on_the_data():
    """Gradient norms under the mixture on 8-bit RGB reach 1e6 in healthy training (a 1e6 threshold froze a
    cifar10-jpeg run at step 500): the default skips only blow-ups, 1e6 on binary data and 1e9 on 8-bit data,
    and an explicit --skip-threshold wins."""
    assert model04.Config(dataset="binarized-mnist").skip_threshold == 1e6
    assert model04.Config(dataset="cifar10-jpeg").skip_threshold == 1e9
    assert model04.Config(dataset="fashion-mnist").skip_threshold == 1e9
    assert model04.Config(dataset="cifar10-jpeg", skip_threshold=5e6).skip_threshold == 5e6
    args = model04.build_parser().parse_args(["--dataset", "cifar10-jpeg"])
    assert model04.Config.from_dict(vars(args)).skip_threshold == 1e9


def test_cpu_evaluation_pass_size_depends_on_the_likelihood():
    """On a CPU, --eval-chunk 0 gives 128 latents per pass for the Bernoulli p(x|z), 64 for one logistic per channel
    and 32 for the mixture (whose parameters per pass then stay in the caches); CUDA keeps its own size, and an
    explicit --eval-chunk wins."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    chunk = lambda cfg, device=cpu: evaluation.eval_chunk_size(model04.RUNG, cfg, device)
    assert chunk(model04.Config(dataset="binarized-mnist")) == 128
    assert chunk(model04.Config(dataset="cifar10-jpeg")) == chunk(model04.Config(dataset="fashion-mnist")) == 32
    assert chunk(model04.Config(dataset="cifar10-jpeg", mixture_components=1, rgb_coupling=False)) == 64
    assert chunk(model04.Config(dataset="cifar10-jpeg", rgb_coupling=False)) == 32
    assert chunk(model04.Config(dataset="cifar10-jpeg"), cuda) == model04.RUNG.cuda_eval_chunk
    assert chunk(model04.Config(dataset="cifar10-jpeg", eval_chunk=128)) == 128
