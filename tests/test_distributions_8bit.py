"""Exact tests of the 8-bit likelihoods: discretized.py (model02, model03) and mixture.py (model04).

References are computed independently: bin masses from scipy.stats CDF/survival differences in
float64, the RGB mixture's joint from a NumPy re-implementation of the PixelCNN++ formulation, and
normalisation by summing each pmf over its whole support (all 256 values, or all 256^3 colours).
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import Independent

import discretized as D
import mixture as M
from distributions import bits_per_dim, log_mean_exp


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these are small element-wise tensors, and on a CPU shared with training
    runs two threads spin against each other (10x slower measured); restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


LEVELS = 256
K_GRID = np.arange(LEVELS)
# extreme and ordinary parameters: locations inside and far outside [0, 1], log-scales from below
# the default floor (-7) to very wide
EXTREME_LOCS = [-3.0, -0.2, 0.0, 0.3, 127.3 / 255, 0.5, 1.0, 1.3, 4.0]
EXTREME_LOG_SCALES = [-9.0, -7.0, -5.5, -3.0, -1.0, 0.0, 3.0, 8.0]


def grid(dtype=torch.float32) -> torch.Tensor:
    """The 256 values k/255 as `dtype` (computed in float64, then rounded once)."""
    return (torch.arange(LEVELS, dtype=torch.float64) / 255).to(dtype)


def extreme_params(dtype=torch.float32):
    locs, log_scales = zip(*[(m, s) for m in EXTREME_LOCS for s in EXTREME_LOG_SCALES])
    return torch.tensor(locs, dtype=dtype), torch.tensor(log_scales, dtype=dtype)


def reference_masses(family, loc: float, scale: float) -> np.ndarray:
    """The 256 bin masses of `family` (scipy.stats.logistic or norm) with open-ended edge bins.

    Bins wholly above the location use survival differences, the others CDF differences, so the
    reference itself does not cancel in the upper tail."""
    lower, upper = (K_GRID - 0.5) / 255, (K_GRID + 0.5) / 255
    mass = np.where(lower >= loc,
                    family.sf(lower, loc, scale) - family.sf(upper, loc, scale),
                    family.cdf(upper, loc, scale) - family.cdf(lower, loc, scale))
    mass[0] = family.cdf(upper[0], loc, scale)
    mass[-1] = family.sf(lower[-1], loc, scale)
    return mass


def total_variation(counts: np.ndarray, pmf: np.ndarray) -> float:
    return 0.5 * float(np.abs(counts / counts.sum() - pmf).sum())


def grey_mixture(logits, loc, log_scale, **kwargs):
    """1-channel mixture with one pixel per batch element: args [L, K] -> batch [L], event [1, 1, 1]."""
    return M.MixtureOfDiscretizedLogistics(logits[..., None, None], loc[..., None, None, None],
                                           log_scale[..., None, None, None], **kwargs)


def one_pixel_rgb_mixture(logits, loc, log_scale, raw_coupling, **kwargs):
    """RGB mixture with one pixel per batch element: logits [L, K], the others [L, K, 3] ->
    batch [L], event [3, 1, 1]."""
    return M.MixtureOfDiscretizedLogistics(logits[..., None, None], loc[..., None, None],
                                           log_scale[..., None, None], raw_coupling[..., None, None], **kwargs)


def reference_rgb_mixture_pmf(rgb: np.ndarray, logits, loc, log_scale, raw_coupling) -> np.ndarray:
    """p(r, g, b) of one pixel for an array of triples rgb [N, 3] (values k/255), float64 NumPy:
    sum_k pi_k p_k(r) p_k(g | r) p_k(b | r, g), each factor a discretized logistic whose location
    is shifted by tanh(coefficient) * (value of the earlier channel)."""
    logits, loc, log_scale, coupling = (np.asarray(a, dtype=np.float64) for a in (logits, loc, log_scale, raw_coupling))
    coupling = np.tanh(coupling)
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    total = np.zeros(len(rgb))
    for k in range(len(weights)):
        locs = [loc[k, 0] + 0 * r, loc[k, 1] + coupling[k, 0] * r, loc[k, 2] + coupling[k, 1] * r + coupling[k, 2] * g]
        joint = weights[k]
        for value, centre, s in zip((r, g, b), locs, np.exp(log_scale[k])):
            bin_index = np.round(value * 255)
            upper = np.where(bin_index == 255, 1.0, stats.logistic.cdf((bin_index + 0.5) / 255, centre, s))
            lower = np.where(bin_index == 0, 0.0, stats.logistic.cdf((bin_index - 0.5) / 255, centre, s))
            joint = joint * (upper - lower)
        total += joint
    return total


# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("make", [
    lambda m, s: D.DiscretizedGaussian(m, s),
    lambda m, s: D.DiscretizedLogistic(m, s),  # floored at -7
    lambda m, s: D.DiscretizedLogistic(m, s, min_log_scale=None),
    lambda m, s: grey_mixture(torch.stack([torch.zeros_like(m), torch.full_like(m, -1.0)], -1),
                              torch.stack([m, 1 - m], -1), torch.stack([s, s.flip(0)], -1), min_log_scale=None),
], ids=["discretized_gaussian", "discretized_logistic", "discretized_logistic_no_floor", "grey_mixture"])
def test_one_channel_pmfs_sum_to_one_over_256_values(make):
    loc, log_scale = extreme_params()
    torch.manual_seed(0)  # plus random parameters
    loc = torch.cat([loc, torch.randn(50) * 2])
    log_scale = torch.cat([log_scale, torch.rand(50) * 14 - 10])
    dist = make(loc, log_scale)
    values = grid().reshape((LEVELS,) + (1,) * len(dist.batch_shape) + dist.event_shape)
    log_mass = dist.log_prob(values)  # [256, L]
    assert log_mass.shape == (LEVELS, len(loc))
    assert torch.isfinite(log_mass).all()
    total = log_mass.double().exp().sum(0)
    assert (total - 1).abs().max() < 1e-5, total


def test_rgb_mixture_sums_to_one_over_all_256_cubed_colours():
    """Four pixels, two components each, strong coupling, extreme and random parameters: the sum
    of p(r, g, b) over all 16.7M triples, evaluated through log_prob one red value at a time (the
    65536 (g, b) pairs of a chunk keep the temporaries cache-sized)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.cat([torch.tensor([[0.3, -0.4], [2.0, -1.0]]), torch.randn(2, 2, generator=g) * 2])
    loc = torch.cat([torch.tensor([[[0.2, 0.6, 0.4], [0.8, 0.1, 0.5]],
                                   [[-3.0, 4.0, 0.5], [1.0, 0.0, 1.3]]]),
                     torch.rand(2, 2, 3, generator=g) * 1.4 - 0.2])
    log_scale = torch.cat([torch.tensor([[[-3.0, -4.0, -2.5], [-2.0, -5.5, -3.5]],
                                         [[-7.0, 1.0, -7.0], [3.0, -6.9, -4.0]]]),
                           torch.rand(2, 2, 3, generator=g) * -6.9])  # down to the -7 floor
    raw_coupling = torch.cat([torch.tensor([[[3.0, -1.0, 0.7], [-2.0, 0.5, -3.0]],
                                            [[-1.5, 2.0, 1.0], [0.3, -0.8, 5.0]]]),
                              torch.randn(2, 2, 3, generator=g) * 3])
    dist = one_pixel_rgb_mixture(logits, loc, log_scale, raw_coupling, validate_args=False)
    values = grid()
    chunk = torch.empty(LEVELS, LEVELS, 3)  # [g, b, channel] for one red value
    chunk[..., 1] = values[:, None]
    chunk[..., 2] = values[None, :]
    total = torch.zeros(4, dtype=torch.float64)
    for red in values:
        chunk[..., 0] = red
        log_mass = dist.log_prob(chunk.reshape(-1, 1, 3, 1, 1))  # [65536 (g, b), 4 pixels]
        total += log_mass.exp().sum(0, dtype=torch.float64)
    assert (total - 1).abs().max() < 1e-5, total


# ----------------------------------------------------------------------------- exact masses


@pytest.mark.parametrize("cls, family", [(D.DiscretizedLogistic, stats.logistic), (D.DiscretizedGaussian, stats.norm)],
                         ids=["logistic", "gaussian"])
def test_float64_masses_match_scipy_cdf_differences(cls, family):
    loc, log_scale = extreme_params(torch.float64)
    dist = cls(loc, log_scale, min_log_scale=None)
    log_mass = dist.log_prob(grid(torch.float64)[:, None]).numpy()  # [256, L]
    for i, (m, s) in enumerate(zip(loc.tolist(), log_scale.tolist())):
        reference = reference_masses(family, m, math.exp(s))
        np.testing.assert_allclose(np.exp(log_mass[:, i]), reference, rtol=0, atol=1e-6)
        # and relatively, wherever the reference itself is accurate
        resolved = reference > 1e-8
        np.testing.assert_allclose(log_mass[resolved, i], np.log(reference[resolved]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls, family", [(D.DiscretizedLogistic, stats.logistic), (D.DiscretizedGaussian, stats.norm)],
                         ids=["logistic", "gaussian"])
def test_float32_masses_close_to_float64(cls, family):
    """float32 is as good as its rounding of the bin edges relative to loc allows: a mass error of at
    most (max density 0.4) * (2 edges) * 6e-8 * max(1, |loc|) / scale -- not just 'finite'."""
    loc, log_scale = extreme_params(torch.float32)
    log_mass32 = cls(loc, log_scale, min_log_scale=None).log_prob(grid()[:, None]).double()
    log_mass64 = cls(loc.double(), log_scale.double(), min_log_scale=None).log_prob(grid(torch.float64)[:, None])
    mass_error = (log_mass32.exp() - log_mass64.exp()).abs().max(0).values  # per parameter setting
    edge_rounding = 6e-8 * loc.double().abs().clamp_min(1.0)  # pixel units
    bound = 0.8 * edge_rounding / log_scale.double().exp() + 3e-7
    assert (mass_error <= bound).all(), (mass_error / bound).max()
    assert mass_error.max() < 1e-3
    # and in the log, for wide enough scales and resolvable masses
    wide = (log_scale >= -3)[None, :] & (log_mass64 > math.log(1e-6))
    assert (log_mass32 - log_mass64)[wide].abs().max() < 3e-4


def test_narrow_and_wide_gaussian_bins_use_consistent_branches():
    """Scales around the density*width switch (standardised bin width ~0.19 in float32): masses of
    each bin must vary smoothly with the scale, no jump at the switch."""
    log_scales = torch.linspace(math.log(1 / (255 * 0.4)), math.log(1 / (255 * 0.05)), 400, dtype=torch.float64)
    for loc in (0.5, 0.123, 3.0):
        dist64 = D.DiscretizedGaussian(torch.full_like(log_scales, loc), log_scales)
        dist32 = D.DiscretizedGaussian(torch.full_like(log_scales, loc).float(), log_scales.float())
        lm64 = dist64.log_prob(grid(torch.float64)[:, None])
        lm32 = dist32.log_prob(grid()[:, None]).double()
        resolved = lm64 > math.log(1e-6)
        assert (lm32 - lm64)[resolved].abs().max() < 1e-4


def test_rgb_mixture_log_prob_matches_numpy_reference():
    """The joint over a pixel's channels, including the coupling G<-R, B<-R, B<-G via tanh, on random
    triples and on the corners of the colour cube, in float64."""
    rng = np.random.default_rng(3)
    num_pixels, K = 5, 4
    logits = rng.normal(size=(num_pixels, K))
    loc = rng.normal(0.5, 0.8, size=(num_pixels, K, 3))
    log_scale = rng.uniform(-7, 1, size=(num_pixels, K, 3))
    raw_coupling = rng.normal(0, 2, size=(num_pixels, K, 3))
    dist = one_pixel_rgb_mixture(*(torch.tensor(a) for a in (logits, loc, log_scale, raw_coupling)))
    corners = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)])
    levels = np.concatenate([rng.integers(0, 256, size=(200, 3)), corners])
    rgb = levels / 255.0
    log_prob = dist.log_prob(torch.tensor(rgb)[:, None, :, None, None]).numpy()  # [N, pixels]
    for p in range(num_pixels):
        reference = reference_rgb_mixture_pmf(rgb, logits[p], loc[p], log_scale[p], raw_coupling[p])
        resolved = reference > 1e-12
        np.testing.assert_allclose(np.exp(log_prob[:, p]), reference, rtol=0, atol=1e-9)
        np.testing.assert_allclose(log_prob[resolved, p], np.log(reference[resolved]), rtol=0, atol=1e-6)


def test_image_log_prob_is_sum_over_pixels_of_pixel_joint():
    torch.manual_seed(1)
    K, C, H, W = 3, 3, 2, 3
    raw = torch.randn(2, M.num_mixture_params(C, K), H, W, dtype=torch.float64)
    dist = M.mixture_from_decoder_output(raw, C, K)
    x = torch.randint(0, 256, (2, C, H, W)).double() / 255
    per_pixel = []
    for i in range(H):
        for j in range(W):
            pixel = M.MixtureOfDiscretizedLogistics(dist.logits[..., i:i + 1, j:j + 1], dist.loc[..., i:i + 1, j:j + 1],
                                                    dist.log_scale[..., i:i + 1, j:j + 1],
                                                    dist.raw_coupling[..., i:i + 1, j:j + 1])
            per_pixel.append(pixel.log_prob(x[..., i:i + 1, j:j + 1]))
    torch.testing.assert_close(dist.log_prob(x), torch.stack(per_pixel).sum(0), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- sampling


SAMPLING_LOCS = torch.tensor([0.5 + 0.3 / 255, 100.45 / 255, -0.05, 1.02, 0.3, 0.7])
SAMPLING_LOG_SCALES = torch.tensor([-7.0, -6.0, -3.0, -4.0, -2.5, -1.0])


@pytest.mark.parametrize("make, family", [
    (lambda m, s: D.DiscretizedGaussian(m, s), stats.norm),
    (lambda m, s: D.DiscretizedLogistic(m, s), stats.logistic),
], ids=["gaussian", "logistic"])
def test_one_channel_sample_histograms_match_pmf(make, family):
    torch.manual_seed(2)
    n = 40_000
    dist = make(SAMPLING_LOCS, SAMPLING_LOG_SCALES)
    samples = dist.sample((n,))  # [n, L]
    assert samples.shape == (n, len(SAMPLING_LOCS))
    assert torch.equal(samples, torch.round(samples * 255) / 255), "samples must lie exactly on the k/255 grid"
    for i, (m, s) in enumerate(zip(SAMPLING_LOCS.tolist(), SAMPLING_LOG_SCALES.tolist())):
        counts = np.bincount(np.round(samples[:, i].numpy() * 255).astype(int), minlength=LEVELS)
        # the pmf from scipy and from log_prob, which must agree, and the histogram with both
        pmf = reference_masses(family, m, math.exp(s))
        np.testing.assert_allclose(dist.log_prob(grid()[:, None])[:, i].exp().numpy(), pmf, atol=1e-5)
        assert total_variation(counts, pmf) < 0.03, (i, total_variation(counts, pmf))


def test_grey_mixture_sample_histogram_matches_pmf():
    torch.manual_seed(3)
    logits = torch.tensor([[0.0, 1.0, -1.0]])
    loc = torch.tensor([[0.1, 0.55 + 0.4 / 255, 1.1]])
    log_scale = torch.tensor([[-3.0, -7.0, -2.0]])
    dist = grey_mixture(logits, loc, log_scale)
    samples = dist.sample((50_000,))  # [n, 1, 1, 1, 1]
    assert samples.shape == (50_000, 1, 1, 1, 1)
    counts = np.bincount(np.round(samples.flatten().numpy() * 255).astype(int), minlength=LEVELS)
    weights = torch.softmax(logits[0], 0).numpy()
    pmf = sum(w * reference_masses(stats.logistic, m, math.exp(s))
              for w, m, s in zip(weights, loc[0].tolist(), log_scale[0].tolist()))
    assert total_variation(counts, pmf) < 0.02


def test_rgb_mixture_samples_red_marginal_and_joint():
    """Red's marginal against scipy; the full (R, G, B) joint of a pixel whose G and B follow R
    closely (tight scales, strong coupling) against log_prob: a sampler ignoring the coupling, or
    drawing G from another component than R, is far off in total variation."""
    torch.manual_seed(4)
    logits = torch.tensor([[0.5, -0.5]])
    loc = torch.tensor([[[0.3, 0.1, 0.2], [0.7, 0.05, -0.3]]])
    log_scale = torch.tensor([[[-5.0, -6.5, -6.0], [-4.5, -6.0, -7.0]]])
    raw_coupling = torch.tensor([[[2.0, -0.5, 1.5], [-1.0, 0.8, 3.0]]])
    dist = one_pixel_rgb_mixture(logits, loc, log_scale, raw_coupling)
    n = 100_000
    samples = dist.sample((n,))[:, 0, :, 0, 0]  # [n, 3]
    assert torch.equal(samples, torch.round(samples * 255) / 255)
    levels = np.round(samples.numpy() * 255).astype(int)

    weights = torch.softmax(logits[0], 0).numpy()
    red_pmf = sum(w * reference_masses(stats.logistic, m, math.exp(s))
                  for w, m, s in zip(weights, loc[0, :, 0].tolist(), log_scale[0, :, 0].tolist()))
    assert total_variation(np.bincount(levels[:, 0], minlength=LEVELS), red_pmf) < 0.02

    triples, counts = np.unique(levels, axis=0, return_counts=True)
    pmf_on_observed = dist.log_prob(torch.tensor(triples / 255.0, dtype=torch.float32)[:, None, :, None, None])
    pmf_on_observed = pmf_on_observed[:, 0].double().exp().numpy()
    unobserved_mass = 1 - pmf_on_observed.sum()
    tv = 0.5 * (np.abs(counts / n - pmf_on_observed).sum() + unobserved_mass)
    # ~1200 triples carry the mass; multinomial noise alone gives TV ~0.026 at this n (simulated)
    assert 0 <= unobserved_mass < 0.01
    assert tv < 0.04, tv
    # the structure is there: G moves with R inside the first component (coefficient tanh(2) = 0.96)
    first = levels[:, 0] < 128
    assert np.corrcoef(levels[first, 0], levels[first, 1])[0, 1] > 0.9


# ----------------------------------------------------------------------------- numerical safety


def all_classes_at(loc, log_scale, min_log_scale):
    """(name, distribution, parameters to differentiate) for each class at the given parameters
    (loc/log_scale [L]); mixtures get two components and, for RGB, a coupling."""
    loc = loc.detach().clone().requires_grad_()
    log_scale = log_scale.detach().clone().requires_grad_()
    logits = torch.zeros(len(loc), 2, requires_grad=True)
    raw_coupling = torch.full((len(loc), 2, 3), 0.7, requires_grad=True)
    two = lambda t: torch.stack([t, t.flip(0)], 1)  # [L] -> [L, 2]
    return [
        ("gaussian", D.DiscretizedGaussian(loc, log_scale, min_log_scale=min_log_scale), [loc, log_scale]),
        ("logistic", D.DiscretizedLogistic(loc, log_scale, min_log_scale=min_log_scale), [loc, log_scale]),
        ("grey_mixture", grey_mixture(logits, two(loc), two(log_scale), min_log_scale=min_log_scale),
         [loc, log_scale, logits]),
        ("rgb_mixture", one_pixel_rgb_mixture(logits, two(loc)[..., None].expand(-1, -1, 3),
                                              two(log_scale)[..., None].expand(-1, -1, 3), raw_coupling,
                                              min_log_scale=min_log_scale), [loc, log_scale, logits, raw_coupling]),
    ]


@pytest.mark.parametrize("min_log_scale", [-7.0, None], ids=["floored", "no_floor"])
def test_log_prob_and_gradients_finite_at_extremes(min_log_scale):
    """x = 0, 1 and interior values; scales at and far below the floor and very large; locations
    far outside [0, 1]."""
    locs, log_scales = zip(*[(m, s) for m in (-3.0, 0.0, 0.5, 1.0, 4.0) for s in (-50.0, -7.0, -6.99, 0.0, 25.0)])
    locs, log_scales = torch.tensor(locs), torch.tensor(log_scales)
    for value in (0.0, 1 / 255, 0.5 + 0.5 / 255, 1.0):
        for name, dist, params in all_classes_at(locs, log_scales, min_log_scale):
            x = torch.full((1,) + dist.batch_shape + dist.event_shape, round(value * 255) / 255)
            log_prob = dist.log_prob(x)
            assert torch.isfinite(log_prob).all(), (name, value, log_prob)
            assert (log_prob <= 1e-6).all(), (name, value)  # a pmf: log-mass <= 0
            grads = torch.autograd.grad(log_prob.sum(), params, allow_unused=True)
            for g in grads:
                assert g is None or torch.isfinite(g).all(), (name, value)


def test_logistic_gradient_matches_finite_difference():
    """The hand-written log-sigmoid / log1mexp forms have the right derivatives (float64)."""
    loc = torch.tensor([0.2, 0.5, 0.9, -0.3, 1.4], dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor([-4.0, -6.0, -2.0, 0.5, -1.0], dtype=torch.float64, requires_grad=True)
    for cls in (D.DiscretizedLogistic, D.DiscretizedGaussian):
        x = torch.tensor([0.0, 128 / 255, 1.0, 3 / 255, 254 / 255], dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda m, s: cls(m, s, min_log_scale=None).log_prob(x), (loc, log_scale))


def test_bf16_autocast_gives_the_float32_result():
    """Parameters that come out of a bf16 layer and bf16 pixel values: log_prob is float32 and equals
    the float32 computation on the same (bf16-representable) numbers; gradients are finite."""
    torch.manual_seed(5)
    K, C, H, W = 3, 3, 4, 4
    layer = torch.nn.Linear(8, M.num_mixture_params(C, K) * H * W)
    features = torch.randn(2, 8)
    x32 = torch.randint(0, 256, (2, C, H, W)).float() / 255
    x16 = x32.to(torch.bfloat16)
    assert not torch.equal(x16.float(), x32)  # bf16 cannot hold k/255: the grid snap must recover it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = layer(features).reshape(2, -1, H, W)
        assert raw.dtype == torch.bfloat16
        loc, raw_log_var = raw[:, :C], raw[:, C:2 * C]
        dists = {
            "mixture": M.mixture_from_decoder_output(raw, C, K),
            "logistic": D.discretized_logistic_likelihood(loc, raw_log_var),
            "gaussian": D.discretized_gaussian_likelihood(loc, raw_log_var),
            "continuous": D.gaussian_likelihood(loc, raw_log_var),
        }
        log_probs = {name: d.log_prob(x16 if name != "continuous" else x32) for name, d in dists.items()}
    raw32, loc32, raw_log_var32 = raw.float(), loc.float(), raw_log_var.float()
    references = {
        "mixture": M.mixture_from_decoder_output(raw32, C, K).log_prob(x32),
        "logistic": D.discretized_logistic_likelihood(loc32, raw_log_var32).log_prob(x32),
        "gaussian": D.discretized_gaussian_likelihood(loc32, raw_log_var32).log_prob(x32),
        "continuous": D.gaussian_likelihood(loc32, raw_log_var32).log_prob(x32),
    }
    for name, log_prob in log_probs.items():
        assert log_prob.dtype == torch.float32, name
        torch.testing.assert_close(log_prob, references[name], rtol=1e-6, atol=1e-5, msg=name)
        layer.zero_grad()
        log_prob.sum().backward(retain_graph=True)
        assert torch.isfinite(layer.weight.grad).all(), name


def test_bf16_result_differs_from_naive_bf16_maths():
    """The point of computing in float32: a narrow logistic scored naively in bf16 loses the likelihood."""
    loc = torch.tensor([200.3 / 255])
    log_scale = torch.tensor([-6.5])
    exact = D.DiscretizedLogistic(loc.to(torch.bfloat16), log_scale.to(torch.bfloat16)).log_prob(
        torch.tensor([200 / 255]).to(torch.bfloat16))
    naive_loc, naive_scale = loc.to(torch.bfloat16), log_scale.to(torch.bfloat16).exp()
    x = torch.tensor([200 / 255]).to(torch.bfloat16)
    naive = torch.log(torch.sigmoid((x + 1 / 510 - naive_loc) / naive_scale) - torch.sigmoid((x - 1 / 510 - naive_loc) / naive_scale))
    exact_scale = math.exp(float(log_scale.to(torch.bfloat16)))  # float32/64 exp of the bf16 log-scale
    reference = math.log(reference_masses(stats.logistic, float(loc.to(torch.bfloat16)), exact_scale)[200])
    assert abs(exact.item() - reference) < 1e-4
    assert abs(naive.float().item() - reference) > 1e-2  # shows the test above would catch bf16 maths


# ----------------------------------------------------------------------------- validation


def every_discrete_distribution(validate_args):
    loc, log_scale = torch.full((2, 3, 2, 2), 0.4), torch.full((2, 3, 2, 2), -3.0)
    return {
        "gaussian": D.DiscretizedGaussian(loc, log_scale, validate_args=validate_args),
        "logistic": D.DiscretizedLogistic(loc, log_scale, validate_args=validate_args),
        "logistic_factory": D.discretized_logistic_likelihood(loc, log_scale, validate_args=validate_args),
        "gaussian_factory": D.discretized_gaussian_likelihood(loc, log_scale, validate_args=validate_args),
        "bounded_gaussian_discretized": D.BoundedVarianceNormal(loc, log_scale, validate_args=validate_args).discretized(),
        "rgb_mixture": M.mixture_from_decoder_output(torch.zeros(2, M.num_mixture_params(3, 2), 2, 2), 3, 2,
                                                     validate_args=validate_args),
    }


@pytest.mark.parametrize("bad_value, message", [
    (-1 / 255, "out of range"), (1 + 1 / 255, "out of range"), (2.0, "out of range"), (-3.0, "out of range"),
    (0.5, "off the 8-bit grid"), (100.4 / 255, "off the 8-bit grid"), (float("nan"), "NaN"),
], ids=["below_0", "above_1", "two", "minus_three", "half", "fractional_level", "nan"])
def test_invalid_values_raise_value_error_naming_the_problem(bad_value, message):
    good = torch.randint(0, 256, (2, 3, 2, 2)).float() / 255
    bad = good.clone()
    bad[1, 2, 0, 1] = bad_value
    for name, dist in every_discrete_distribution(validate_args=True).items():
        dist.log_prob(good)  # on-grid values pass
        with pytest.raises(ValueError, match=message):
            dist.log_prob(bad)
    for name, dist in every_discrete_distribution(validate_args=False).items():
        if not math.isnan(bad_value):
            assert torch.isfinite(dist.log_prob(bad)).all(), name  # unchecked: snapped to the nearest bin


def test_integer_levels_get_a_hint_and_half_precision_grids_pass():
    dist = D.DiscretizedLogistic(torch.zeros(4), torch.zeros(4), validate_args=True)
    with pytest.raises(ValueError, match="divide by 255"):
        dist.log_prob(torch.tensor([0.0, 3.0, 255.0, 17.0]))
    with pytest.raises(ValueError, match="floating-point"):
        dist.log_prob(torch.tensor([0, 3, 255, 17], dtype=torch.uint8))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        on_grid = grid(dtype)
        wide = D.DiscretizedLogistic(torch.zeros(LEVELS), torch.zeros(LEVELS), validate_args=True)
        torch.testing.assert_close(wide.log_prob(on_grid), wide.log_prob(grid()))
    assert D.eight_bit_grid.check(grid()).all()
    assert not D.eight_bit_grid.check(grid() + 0.3 / 255).any()


def test_parameter_validation():
    with pytest.raises(ValueError):
        D.DiscretizedLogistic(torch.tensor([float("nan")]), torch.zeros(1), validate_args=True)
    with pytest.raises(ValueError, match="P=30"):
        M.mixture_from_decoder_output(torch.zeros(1, 29, 2, 2), 3, 3)
    with pytest.raises(ValueError, match="raw_coupling"):
        M.MixtureOfDiscretizedLogistics(torch.zeros(2, 1, 1), torch.zeros(2, 3, 1, 1), torch.zeros(2, 3, 1, 1))


# ----------------------------------------------------------------------------- bits/dim, log_mean_exp


def test_bits_per_dim_of_uniform_pmf_is_8():
    num_dims = 3 * 32 * 32
    log_likelihood = num_dims * math.log(1 / 256)  # every sub-pixel uniform over 256 values
    assert bits_per_dim(log_likelihood, num_dims) == 8.0
    assert torch.equal(bits_per_dim(torch.tensor([log_likelihood], dtype=torch.float64), num_dims),
                       torch.tensor([8.0], dtype=torch.float64))
    # a per-sub-pixel log-pmf of -log 256 summed over an image batch, as training sums it
    log_pmf = torch.full((5, 3, 8, 8), -math.log(256.0), dtype=torch.float64)
    torch.testing.assert_close(bits_per_dim(log_pmf.sum((1, 2, 3)), 3 * 8 * 8),
                               torch.full((5,), 8.0, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bits_per_dim(-math.log(2) * 5 * 7, 7) == pytest.approx(5.0, abs=1e-12)


def test_log_mean_exp_matches_naive_float64_and_is_stable():
    torch.manual_seed(6)
    log_w = torch.randn(7, 50, dtype=torch.float64) * 3
    naive = torch.log(torch.exp(log_w).mean(0))
    torch.testing.assert_close(log_mean_exp(log_w), naive, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_mean_exp(log_w.T, dim=1), naive, rtol=0, atol=1e-12)
    shifted = log_w - 1e4  # importance weights of a real model: exp underflows to 0
    assert torch.isinf(torch.log(torch.exp(shifted).mean(0))).all()  # the naive form fails here
    stable = log_mean_exp(shifted)
    assert torch.isfinite(stable).all()
    torch.testing.assert_close(stable, naive - 1e4, rtol=0, atol=1e-9)
    # float32 too, and a single sample is the identity
    torch.testing.assert_close(log_mean_exp(shifted.float()), (naive - 1e4).float(), rtol=0, atol=2e-3)
    torch.testing.assert_close(log_mean_exp(shifted[:1]), shifted[0], rtol=0, atol=0)


# ----------------------------------------------------------------------------- bounded Gaussian


def test_tanh_bounded_variance_never_below_the_bound():
    raw = torch.tensor([-1e4, -100.0, -3.0, -1.0, 0.0, 1.0, 3.0, 100.0, 1e4])
    loc = torch.zeros_like(raw)
    bounded = D.BoundedVarianceNormal(loc, raw)
    assert (bounded.variance >= math.exp(-1.0) * (1 - 1e-6)).all()
    assert (bounded.log_var >= -1.0).all() and (bounded.log_var <= 1.0).all()
    # the default map is exactly log_var = tanh(raw)
    torch.testing.assert_close(bounded.log_var, torch.tanh(raw), rtol=0, atol=1e-6)
    # custom bounds: log_var = lo + (hi - lo) * (tanh(raw) + 1) / 2
    custom = D.BoundedVarianceNormal(loc, raw, min_log_var=-9.0, max_log_var=2.0)
    torch.testing.assert_close(custom.log_var, -9.0 + 11.0 * (torch.tanh(raw) + 1) / 2)
    assert (custom.log_var >= -9.0).all() and (custom.log_var <= 2.0).all()
    # the density is bounded: at most the peak of N(0, e^-1)
    peak = bounded.log_prob(loc)
    assert (peak <= -0.5 * math.log(2 * math.pi * math.exp(-1.0)) + 1e-6).all()
    # unbounded: log_var = raw, and the variance does collapse
    unbounded = D.BoundedVarianceNormal(loc, raw, bounded=False)
    torch.testing.assert_close(unbounded.log_var, raw)
    assert unbounded.variance[0] < math.exp(-1.0)
    assert unbounded.variance[0] == 0  # exp(-1e4) underflows: what --no-variance-bound allows
    assert unbounded.log_prob(torch.tensor(0.0))[1] > 40  # raw -100: density e^49 at the mean


def test_bounded_gaussian_log_prob_and_discretization():
    torch.manual_seed(7)
    loc, raw = torch.rand(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64) * 2
    x = torch.randint(0, 256, (20,)).double() / 255
    dist = D.BoundedVarianceNormal(loc, raw)
    expected = stats.norm.logpdf(x.numpy(), loc.numpy(), np.exp(0.5 * dist.log_var.numpy()))
    np.testing.assert_allclose(dist.log_prob(x).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(dist.entropy().numpy(), stats.norm.entropy(loc.numpy(), dist.scale.numpy()), rtol=1e-12)
    discrete = dist.discretized()
    assert isinstance(discrete, D.DiscretizedGaussian)
    torch.testing.assert_close(discrete.log_scale, 0.5 * dist.log_var)
    # gaussian_likelihood: an Independent over the image, as model02 uses it
    image = D.gaussian_likelihood(torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    assert isinstance(image, Independent) and image.batch_shape == (2,) and image.event_shape == (3, 4, 4)
    expanded = dist.expand((3, 20))
    torch.testing.assert_close(expanded.log_prob(x), dist.log_prob(x).expand(3, 20))


# ----------------------------------------------------------------------------- mean, shapes, layout


@pytest.mark.parametrize("cls", [D.DiscretizedLogistic, D.DiscretizedGaussian])
def test_mean_and_variance_are_the_pmf_moments(cls):
    loc, log_scale = extreme_params(torch.float64)
    dist = cls(loc, log_scale, min_log_scale=None)
    pmf = dist.log_prob(dist.enumerate_support()).exp()  # [256, L]
    values = grid(torch.float64)[:, None]
    mean = (values * pmf).sum(0)
    torch.testing.assert_close(dist.mean, mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(dist.variance, ((values - mean) ** 2 * pmf).sum(0), rtol=0, atol=1e-10)
    assert ((dist.mean >= 0) & (dist.mean <= 1)).all()


def test_mixture_mean_exact_for_grey_and_uncoupled_rgb():
    torch.manual_seed(8)
    logits, loc, log_scale = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), \
        torch.rand(4, 3, dtype=torch.float64) * -5
    grey = grey_mixture(logits, loc, log_scale)
    pmf = grey.log_prob(grid(torch.float64).reshape(LEVELS, 1, 1, 1, 1)).exp()  # [256, 4]
    torch.testing.assert_close(grey.mean.reshape(4), (grid(torch.float64)[:, None] * pmf).sum(0), rtol=0, atol=1e-10)
    # RGB with zero coupling: each channel's mean is its own mixture-of-pmfs mean
    loc3, log_scale3 = torch.rand(4, 3, 3, dtype=torch.float64), torch.rand(4, 3, 3, dtype=torch.float64) * -5
    rgb = one_pixel_rgb_mixture(logits, loc3, log_scale3, torch.zeros(4, 3, 3, dtype=torch.float64))
    for c in range(3):
        channel = grey_mixture(logits, loc3[..., c], log_scale3[..., c])
        torch.testing.assert_close(rgb.mean[:, c], channel.mean[:, 0], rtol=0, atol=1e-12)
    # with coupling, red is still exact
    coupled = one_pixel_rgb_mixture(logits, loc3, log_scale3, torch.randn(4, 3, 3, dtype=torch.float64))
    torch.testing.assert_close(coupled.mean[:, 0], rgb.mean[:, 0], rtol=0, atol=1e-12)


def test_mixture_layout_and_parameter_count():
    assert M.num_mixture_params(3, 10) == 100 and M.num_mixture_params(3, 1) == 10
    assert M.num_mixture_params(1, 10) == 30 and M.num_mixture_params(1, 4) == 12
    K, C, H, W = 2, 3, 2, 3
    P = M.num_mixture_params(C, K)
    raw = torch.arange(5 * P * H * W, dtype=torch.float64).reshape(5, P, H, W) / 1000
    dist = M.mixture_from_decoder_output(raw, C, K, min_log_scale=None)
    assert dist.batch_shape == (5,) and dist.event_shape == (C, H, W)
    torch.testing.assert_close(dist.logits, raw[:, :K])
    for k in range(K):
        for c in range(C):
            torch.testing.assert_close(dist.loc[:, k, c], raw[:, K + k * C + c])
            torch.testing.assert_close(dist.log_scale[:, k, c], raw[:, K + K * C + k * C + c])
        for i in range(3):
            torch.testing.assert_close(dist.coupling[:, k, i], torch.tanh(raw[:, K + 2 * K * C + k * 3 + i]))
    floored = M.mixture_from_decoder_output(raw - 10, C, K)
    assert floored.log_scale.min() == -7.0


def test_shapes_sample_expand_and_independent():
    torch.manual_seed(9)
    K, C, H, W = 4, 3, 5, 6
    dist = M.mixture_from_decoder_output(torch.randn(7, 2, M.num_mixture_params(C, K), H, W), C, K)
    assert dist.batch_shape == (7, 2) and dist.event_shape == (C, H, W)
    x = dist.sample((3,))
    assert x.shape == (3, 7, 2, C, H, W) and x.dtype == torch.float32
    assert dist.log_prob(x).shape == (3, 7, 2)
    assert dist.mean.shape == (7, 2, C, H, W)
    expanded = M.mixture_from_decoder_output(torch.randn(1, M.num_mixture_params(C, K), H, W), C, K).expand((4,))
    assert expanded.batch_shape == (4,) and expanded.sample().shape == (4, C, H, W)
    grey = M.mixture_from_decoder_output(torch.randn(2, M.num_mixture_params(1, K), H, W), 1, K)
    assert grey.sample().shape == (2, 1, H, W) and grey.log_prob(grey.sample()).shape == (2,)

    image = D.discretized_logistic_likelihood(torch.rand(2, C, H, W), torch.full((2, C, H, W), -4.0))
    assert isinstance(image, Independent) and image.batch_shape == (2,) and image.event_shape == (C, H, W)
    sample = image.sample()
    assert sample.shape == (2, C, H, W) and torch.equal(sample, torch.round(sample * 255) / 255)
    torch.testing.assert_close(image.log_prob(sample), image.base_dist.log_prob(sample).sum((-3, -2, -1)))
    assert image.mean.shape == (2, C, H, W)
    element = D.DiscretizedGaussian(torch.zeros(3), torch.zeros(3)).expand((2, 3))
    assert element.batch_shape == (2, 3) and element.sample((4,)).shape == (4, 2, 3)
    assert element.enumerate_support().shape == (LEVELS, 2, 3)
    assert element.enumerate_support(expand=False).shape == (LEVELS, 1, 1)


def test_uncoupled_mixture_is_the_coupled_one_at_zero_coupling_and_a_product_over_channels():
    """--no-rgb-coupling: P = K (1 + 2C) outputs; the pmf equals the coupled layout with raw coupling 0, and
    for K = 1 it factorises into one discretized logistic per channel (closed form: a product of marginals)."""
    torch.manual_seed(0)
    C, K, H, W = 3, 4, 2, 3
    assert M.num_mixture_params(C, K, rgb_coupling=False) == K * 7 and M.num_mixture_params(1, K, False) == K * 3
    raw = torch.randn(2, M.num_mixture_params(C, K, rgb_coupling=False), H, W, dtype=torch.float64)
    x = torch.randint(0, 256, (2, C, H, W)).double() / 255
    uncoupled = M.mixture_from_decoder_output(raw, C, K, rgb_coupling=False)
    coupled = M.mixture_from_decoder_output(torch.cat([raw, torch.zeros(2, 3 * K, H, W, dtype=torch.float64)], 1), C, K)
    assert torch.equal(uncoupled.log_prob(x), coupled.log_prob(x))
    with pytest.raises(ValueError, match="1 \\+ 2C\\)"):
        M.mixture_from_decoder_output(raw[:, :-1], C, K, rgb_coupling=False)
    single = M.mixture_from_decoder_output(raw[:, :7], C, 1, min_log_scale=None, rgb_coupling=False)
    loc, log_scale = raw[:, 1:4], raw[:, 4:7]
    per_channel = D.discretized_logistic_likelihood(loc, log_scale, min_log_scale=None).log_prob(x)
    torch.testing.assert_close(single.log_prob(x), per_channel, rtol=0, atol=1e-9)


def test_the_moved_likelihoods_still_import_from_distributions():
    """A model script of an earlier commit imports the 8-bit likelihoods from distributions.py (bench.py
    --baseline-commit runs it beside this tree): the same objects as discretized.py's and mixture.py's."""
    import distributions

    for module, names in ((D, ("BoundedVarianceNormal", "DiscretizedGaussian", "DiscretizedLogistic",
                               "gaussian_likelihood", "discretized_gaussian_likelihood",
                               "discretized_logistic_likelihood")),
                          (M, ("MixtureOfDiscretizedLogistics", "mixture_from_decoder_output", "num_mixture_params"))):
        for name in names:
            assert getattr(distributions, name) is getattr(module, name), name
