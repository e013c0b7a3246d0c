"""model02 (Gaussian p(x|z), tanh-bounded log-variance; reported with the discretized Gaussian pmf)
and model03 (discretized logistic p(x|z), floored log-scale): closed forms of both likelihoods, the
variance bound and its removal, the train/eval switch of model02, one training step and a tiny
--quick run of each rung on synthetic CIFAR-10 files and on real Fashion-MNIST."""
import json
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import data
import model02
import model03
import evaluation
import runtime
from conftest import run_script

RUNGS = {"model02": model02, "model03": model03}
FASHION = data.DATASETS["fashion-mnist"]
CIFAR = data.DATASETS["cifar10"]
LEVEL_STD_FLOOR = math.exp(-0.5)  # both rungs: variance >= e^-1 levels^2, i.e. std >= 0.61 levels


def small_config(module, **overrides):
    return module.Config(width=4, features=16, latent_dim=6, **overrides)


def grid_images(n, shape, seed=0):
    """Random 8-bit images as the data pipeline gives them: k/255, float32 [n, C, H, W]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g).float() / 255.0


# ----------------------------------------------------------------------------- synthetic CIFAR-10 files


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """cifar-10-batches-py pickles in torchvision's format (5 x 250 train, 200 test) holding smooth
    random colour images (8x8 noise upsampled), so the VAE has some structure to learn."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def images(n):
        coarse = rng.integers(0, 256, size=(n, 3, 8, 8))
        return np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3).astype(np.uint8).reshape(n, 3072)  # R, G, B planes

    for name, n in [(f"data_batch_{i}", 250) for i in range(1, 6)] + [("test_batch", 200)]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images(n), "labels": [0] * n}, f)
    return root


# ----------------------------------------------------------------------------- closed forms


def discretized_log_mass_reference(x, loc, scale, cdf):
    """log P(bin of x) by the textbook CDF difference in float64, edge bins open-ended. Bins above
    the location are reflected (cdf symmetric: F(b) - F(a) = F(-a) - F(-b)) so both terms are small
    and nothing cancels; accurate while no edge is more than ~35 scales from the location."""
    k = torch.round(x * 255)
    upper = ((k + 0.5) / 255 - loc) / scale
    lower = ((k - 0.5) / 255 - loc) / scale
    interior = torch.where(lower > 0, cdf(-lower) - cdf(-upper), cdf(upper) - cdf(lower))
    mass = torch.where(k == 0, cdf(upper), torch.where(k == 255, cdf(-lower), interior))
    return torch.log(mass)


def normal_cdf(t):
    """Phi(t) via erfc, accurate far into the lower tail (torch.special.ndtr computes 1 - ... and
    returns 0 below about -8.3 in float64)."""
    return 0.5 * torch.special.erfc(-t / math.sqrt(2))


def near_predictions(x, generator, levels=3.0):
    """Locations a trained decoder might give: x plus N(0, `levels` 8-bit levels), not clipped."""
    return x + torch.randn(x.shape, generator=generator, dtype=x.dtype) * levels / 255


def test_model02_likelihood_is_density_in_training_and_discretized_gaussian_in_eval():
    model = model02.build_model(small_config(model02), FASHION).double()
    g = torch.Generator().manual_seed(1)
    x = grid_images(2, (1, 28, 28), seed=2).double()
    x[0, 0, 0, :5] = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0])  # include both open-ended edge bins
    loc = near_predictions(x, g)
    raw_log_var = torch.randn(2, 1, 28, 28, generator=g, dtype=torch.float64) * 2  # from the floor to wide
    params = torch.cat([loc, raw_log_var], dim=1)  # [2, 2C, H, W]: locations, then raw log-variances
    # the documented map: log-var tanh-squashed into [min, max], both given in levels and converted to pixels
    lo, hi = -1.0 - 2 * math.log(255), 2 * math.log(255) - 2 * math.log(255)
    log_var = lo + (hi - lo) * (torch.tanh(raw_log_var) + 1) / 2
    scale = torch.exp(0.5 * log_var)

    model.train()
    density = model.likelihood(params).log_prob(x)
    expected = torch.distributions.Normal(loc, scale).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(density, expected, rtol=1e-10, atol=1e-8)

    model.eval()
    pmf = model.likelihood(params).log_prob(x)
    expected = discretized_log_mass_reference(x, loc, scale, normal_cdf).sum(dim=(1, 2, 3))
    torch.testing.assert_close(pmf, expected, rtol=1e-7, atol=1e-6)
    assert (pmf < 0).all()


def test_model03_likelihood_is_discretized_logistic_with_floored_scale():
    model = model03.build_model(small_config(model03), FASHION).double()
    g = torch.Generator().manual_seed(3)
    x = grid_images(2, (1, 28, 28), seed=4).double()
    x[0, 0, 0, :5] = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0])
    loc = near_predictions(x, g)
    raw_log_scale = torch.randn(2, 1, 28, 28, generator=g, dtype=torch.float64) * 3 - 5  # some below the floor
    floor = -0.5 - math.log(math.pi / math.sqrt(3)) - math.log(255)
    assert (raw_log_scale < floor).any() and (raw_log_scale > floor).any()
    scale = torch.exp(raw_log_scale.clamp_min(floor))
    for training_mode in (True, False):  # the same pmf in training and evaluation
        model.train(training_mode)
        got = model.likelihood(torch.cat([loc, raw_log_scale], dim=1)).log_prob(x)
        expected = discretized_log_mass_reference(x, loc, scale, torch.sigmoid).sum(dim=(1, 2, 3))
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-6)


def test_model02_forward_switches_from_density_per_level_to_pmf():
    """Same z (same seed): training log_px_z = Gaussian log-density - D ln 255, eval = the pmf."""
    torch.manual_seed(0)
    model = model02.build_model(small_config(model02), FASHION)
    x = grid_images(3, (1, 28, 28))

    def reference(discretize):
        torch.manual_seed(5)
        q = model02.diagonal_gaussian(*model.posterior(model.encoder(x)))
        z = q.rsample((4,))  # [4, 3, L]
        loc, raw = model.decoder(z.reshape(12, -1)).reshape(4, 3, 2, 28, 28).unbind(2)  # [k*B, 2, H, W] -> 2 x [k, B, H, W]
        log_var = model.min_log_var + (model.max_log_var - model.min_log_var) * (torch.tanh(raw) + 1) / 2
        scale = torch.exp(0.5 * log_var).double()
        xs = x[:, 0].double()
        if discretize:
            return discretized_log_mass_reference(xs, loc.double(), scale, normal_cdf).sum(dim=(-2, -1))
        return (torch.distributions.Normal(loc.double(), scale).log_prob(xs).sum(dim=(-2, -1))
                - 784 * math.log(255))

    for training_mode, discretize in ((True, False), (False, True)):
        model.train(training_mode)
        torch.manual_seed(5)
        out = model(x, 4)
        assert set(out) == {"log_px_z", "log_pz", "log_qz"} and all(v.shape == (4, 3) for v in out.values())
        with torch.no_grad():
            torch.testing.assert_close(out["log_px_z"].double(), reference(discretize), rtol=1e-4, atol=1e-2)


# ----------------------------------------------------------------------------- the bound and --no-variance-bound


@pytest.mark.parametrize("name", ["model02", "model03"])
def test_no_variance_bound_removes_the_scale_floor(name):
    module = RUNGS[name]
    bounded = module.build_model(small_config(module), CIFAR).eval()
    unbounded = module.build_model(small_config(module, variance_bound=False), CIFAR).eval()
    loc = torch.full((1, 3, 32, 32), 0.5)
    raw = torch.full((1, 3, 32, 32), -40.0)  # the decoder pushing the scale as low as it can
    params = torch.cat([loc, raw], dim=1)
    for model in (bounded, unbounded):
        for mode in (True, False):
            model.train(mode)
            base = model.likelihood(params).base_dist
            # the std of the distribution in 8-bit levels (logistic: std = scale * pi / sqrt 3)
            std_levels = base.scale * 255 * (math.pi / math.sqrt(3) if name == "model03" else 1.0)
            if model is bounded:
                torch.testing.assert_close(std_levels, torch.full_like(std_levels, LEVEL_STD_FLOOR), rtol=1e-4, atol=0)
            else:
                assert std_levels.max() < 1e-6, "without the bound the scale follows the raw output down"
    # model02's ceiling: sigma <= 255 levels (the whole range) when bounded, no ceiling without
    if name == "model02":
        params = torch.cat([loc, torch.full((1, 3, 32, 32), 40.0)], dim=1)
        torch.testing.assert_close(bounded.likelihood(params).base_dist.scale, torch.ones(1, 3, 32, 32))
        assert unbounded.likelihood(params).base_dist.scale.min() > 1e8


def test_unbounded_model02_density_can_claim_more_than_a_pmf_allows():
    """The failure in one number: with the variance unbounded, the training log_px_z (density per
    level) exceeds 0 on a perfectly predicted image; the bound keeps it below 0, like any pmf."""
    x = grid_images(1, (1, 28, 28))
    params = torch.cat([x, torch.full_like(x, -30.0)], dim=1)  # loc = x, raw log-var very negative
    for bound, sign in ((True, -1), (False, 1)):
        model = model02.build_model(small_config(model02, variance_bound=bound), FASHION).train()
        log_density_per_level = model.likelihood(params).log_prob(x) - 784 * math.log(255)
        assert torch.sign(log_density_per_level).item() == sign
        model.eval()
        assert model.likelihood(params).log_prob(x).item() <= 0.0  # the pmf stays honest either way


# ----------------------------------------------------------------------------- architecture and one step


def test_conv_blocks_shapes_and_stride_one_output_layer():
    for info in (FASHION, CIFAR):
        c, h, w = info.shape
        model = model02.build_model(small_config(model02), info)
        assert model.encoder(torch.rand(5, c, h, w)).shape == (5, 16)
        assert model.decoder(torch.randn(5, 6)).shape == (5, 2 * c, h, w)
        last = model.decoder.net[-1]
        assert isinstance(last, nn.Conv2d) and last.stride == (1, 1)
    with pytest.raises(ValueError, match="divisible by 4"):
        model02.ConvEncoder((1, 30, 30))


@pytest.mark.parametrize("name", ["model02", "model03"])
@pytest.mark.parametrize("info", [FASHION, CIFAR], ids=lambda i: i.name)
def test_one_training_step(name, info):
    """Encoder once on B images, decoder once on k*B latents; one Adam step lowers nothing to NaN."""
    module = RUNGS[name]
    torch.manual_seed(0)
    model = module.build_model(small_config(module), info).train()
    calls = []
    model.encoder.register_forward_hook(lambda m, args, out: calls.append(("encoder", args[0].shape[0])))
    model.decoder.register_forward_hook(lambda m, args, out: calls.append(("decoder", args[0].shape[0])))
    x = grid_images(6, info.shape)
    out = model(x, 3)
    assert calls == [("encoder", 6), ("decoder", 18)]
    assert all(v.shape == (3, 6) and torch.isfinite(v).all() for v in out.values())
    loss = -evaluation.bound_per_image(evaluation.log_weights(out), "iwae").mean()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ["model02", "model03"])
def test_figures_show_pmf_means_and_real_samples(name):
    module = RUNGS[name]
    torch.manual_seed(0)
    model = module.build_model(small_config(module), FASHION).eval()
    samples = model.sample(8)
    recs = model.reconstruct(grid_images(8, (1, 28, 28)))
    assert samples.shape == recs.shape == (8, 1, 28, 28)
    on_grid = lambda t: ((t * 255 - torch.round(t * 255)).abs() < 1e-4).float().mean().item()
    assert on_grid(samples) == 1.0  # draws from the 8-bit pmf
    assert on_grid(recs) < 0.5  # means of the pmf are not grid values
    assert 0 <= recs.min() and recs.max() <= 1


def test_binary_data_sets_are_rejected():
    with pytest.raises(SystemExit) as excinfo:
        model02.build_parser().parse_args(["--dataset", "binarized-mnist"])
    assert excinfo.value.code == 2
    with pytest.raises(runtime.UserError, match="8-bit images"):
        model03.build_model(model03.Config(), data.DATASETS["binarized-mnist"])


# ----------------------------------------------------------------------------- --quick end to end

TINY = ["--quick", "--max-steps", "30", "--val-every", "30", "--val-samples", "2", "--n-test", "100",
        "--eval-samples", "10", "--width", "4", "--features", "32", "--batch-size", "16"]


def _check_run(out_dir, rung, dataset, unbounded, likelihood_prefix, shape):
    result = json.loads((out_dir / "result.json").read_text())
    assert result["model"] == rung and result["dataset"] == dataset and result["n_test"] == 100
    assert result["likelihood"].startswith(likelihood_prefix)
    assert ("unbounded" in result["likelihood"]) == unbounded
    assert result["run_name"] == f"{rung}_{dataset}_iwae_k5{'_unbounded' if unbounded else ''}_seed0_quick"
    # a pmf's log-likelihood is <= 0; bits/dim follows from it
    assert result["test_ll_nats"] < 0 and result["test_bpd"] > 0
    assert math.isclose(result["test_bpd"], -result["test_ll_nats"] / (math.prod(shape) * math.log(2)), rel_tol=1e-9)
    prefix = f"{rung}_unbounded" if unbounded else rung
    for kind in ("imgs", "recs", "samples"):
        assert (out_dir / f"{prefix}_{kind}.png").is_file()


@pytest.mark.parametrize("rung,unbounded", [("model02", False), ("model03", True)])
def test_quick_run_on_synthetic_cifar10(rung, unbounded, cifar_dir, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--dataset", "cifar10", "--data-dir", cifar_dir, "--out-dir", out]
    proc = run_script(f"{rung}.py", *args, *(["--no-variance-bound"] if unbounded else []),
                      env={"VAE_DATA_VERIFY": "0", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_run(out, rung, "cifar10", unbounded, "discretized-gaussian" if rung == "model02" else "discretized-logistic",
               (3, 32, 32))


@pytest.mark.parametrize("rung,unbounded", [("model02", True), ("model03", False)])
def test_quick_run_on_fashion_mnist(rung, unbounded, data_dir, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--dataset", "fashion-mnist", "--data-dir", data_dir, "--out-dir", out]
    proc = run_script(f"{rung}.py", *args, *(["--no-variance-bound"] if unbounded else []),
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_run(out, rung, "fashion-mnist", unbounded,
               "discretized-gaussian" if rung == "model02" else "discretized-logistic", (1, 28, 28))
