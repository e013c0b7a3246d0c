"""Likelihoods, posteriors and priors as `torch.distributions` objects.

Pixel convention (used everywhere in this repo):
    images are float tensors in [0, 1]. Binary data holds {0., 1.}; 8-bit data holds k/255 for
    k = 0..255, so bin k of a discretized likelihood is centred on k/255 and has width 1/255.

Every likelihood is returned wrapped in `Independent` so that `log_prob(x)` sums over the
pixels of one image and returns one number per image (batch shape = leading dims, event shape =
the image shape). All likelihood maths runs in float32, also under bf16 autocast.

Likelihoods for 8-bit images (issue 3). A density on 8-bit data is not a probability, so the
discretized classes put mass on the 256 bins [k/255 - 1/510, k/255 + 1/510]; the first bin also
takes all mass below 1/510 and the last all mass above 1 - 1/510, so each pmf sums to exactly 1.
    BoundedVarianceNormal        continuous Gaussian, log-variance squashed by tanh into
                                 [min_log_var, max_log_var] (model02's training likelihood);
                                 `bounded=False` gives log-variance = raw. `.discretized()` gives ->
    DiscretizedGaussian          the Gaussian's mass per 8-bit bin (model02's reported test LL).
    DiscretizedLogistic          logistic mass per 8-bit bin, log-scale floored (model03).
    MixtureOfDiscretizedLogistics  K-component PixelCNN++-style mixture; for RGB the G and B
                                 locations depend linearly on the values of R (and G); event shape
                                 [C, H, W] (model04). Built from a decoder's raw output by
                                 `mixture_from_decoder_output`; `num_mixture_params` gives the
                                 number of output channels it needs.
Factories `gaussian_likelihood`, `discretized_gaussian_likelihood`, `discretized_logistic_likelihood`
wrap the element-wise classes in `Independent`, like `bernoulli_likelihood`. Discrete classes
validate `log_prob` values (in [0, 1] and on the k/255 grid) and raise a ValueError naming the
problem; `sample()` returns values exactly on the grid.
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Distribution, Independent, Normal, constraints, kl_divergence
from torch.distributions.utils import broadcast_all

# ----------------------------------------------------------------------------- helpers


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log (1/k sum_i exp(log_w_i)) along `dim`, stable: the importance-weighted bound's core."""
    k = log_w.shape[dim]
    return torch.logsumexp(log_w, dim=dim) - math.log(k)


def bits_per_dim(nats: torch.Tensor | float, num_dims: int) -> torch.Tensor | float:
    """Negative log-likelihood in nats per image -> bits per dimension (sub-pixel).

    `nats` is a log-likelihood (<= 0 for a pmf); bits/dim is positive: -nats / (D ln 2).
    """
    return -nats / (num_dims * math.log(2.0))


# ----------------------------------------------------------------------------- latents


def diagonal_gaussian(mean: torch.Tensor, log_scale: torch.Tensor, event_dims: int = 1) -> Independent:
    """q(z|x) or p(z_l|z_>l): a Gaussian with diagonal covariance, scale = exp(log_scale)."""
    return Independent(Normal(mean.float(), log_scale.float().exp()), event_dims)


def standard_normal(shape, device=None, event_dims: int = 1) -> Independent:
    """p(z) = N(0, I) over the trailing `event_dims` dims of `shape`."""
    zeros = torch.zeros(shape, device=device)
    return Independent(Normal(zeros, torch.ones_like(zeros)), event_dims)


def kl_independent_normals(q: Independent, p: Independent) -> torch.Tensor:
    """KL(q || p) for two `Independent(Normal)` distributions, analytically.

    torch.distributions only registers this KL when both have the same `reinterpreted_batch_ndims`.
    Here the element-wise KL of the base Normals is formed with broadcasting, then the right-most
    max(r_q, r_p) dims of that shared (broadcast) shape are summed: the KL between the two viewed
    as distributions over the larger event. E.g. q with batch [B], event [D] against a prior with
    batch [], event [D] gives shape [B]; against a prior with event [B, D] it gives one number.
    """
    if not (isinstance(q, Independent) and isinstance(p, Independent)
            and isinstance(q.base_dist, Normal) and isinstance(p.base_dist, Normal)):
        raise TypeError("kl_independent_normals expects two Independent(Normal) distributions")
    elementwise = kl_divergence(q.base_dist, p.base_dist)  # broadcast shape
    event_ndims = max(q.reinterpreted_batch_ndims, p.reinterpreted_batch_ndims)
    if event_ndims == 0:
        return elementwise
    return elementwise.sum(dim=tuple(range(-event_ndims, 0)))


# ----------------------------------------------------------------------------- likelihoods


class _BinaryBernoulliLogProb(torch.autograd.Function):
    """log Bernoulli(x; logits=l) for x in {0, 1}: log sigmoid(t) with t = (2x - 1) l, and its gradient.

    Why not torch's log_prob (binary_cross_entropy_with_logits -> log_sigmoid)? On the CPU it took a
    quarter of a profiled model01 training step (its log1p measured ~10x slower than log on the same
    tensor); sigmoid and log are fast. log(sigmoid(t)) is accurate to float rounding in absolute terms (the summed
    log-likelihood is what matters): sigmoid has a small relative error for every t, and for
    t <= -80 (where sigmoid(t) < 2e-35 nears float32's underflow) log sigmoid(t) = t - log(1 + e^t)
    equals t to far below rounding. Backward: d/dl = (2x - 1) (1 - sigmoid(t)), one fused expression.
    """

    @staticmethod
    def forward(ctx, logits, value):
        # value may be smaller than logits ([B, ...] against [k, B, ...]): sign is formed once per image
        sign = 2.0 * value - 1.0  # +1 where x = 1, -1 where x = 0
        t = logits * sign
        p = torch.sigmoid(t)  # the probability of the observed value
        ctx.save_for_backward(sign, p)
        return torch.where(t > -80.0, torch.log(p), t)

    @staticmethod
    def backward(ctx, grad):
        sign, p = ctx.saved_tensors
        return grad * sign * (1.0 - p), None


class FastBernoulli(Bernoulli):
    """torch.distributions.Bernoulli(logits=...) whose log_prob is faster on the CPU and as accurate
    (see _BinaryBernoulliLogProb). Values must be 0 or 1, as Bernoulli's support says (checked when
    argument validation is on); soft targets need torch's Bernoulli."""

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        # torch's broadcast_all would expand value to the logits' [k, B, ...] shape; only the logits need it
        # (the autograd Function returns their gradient at the broadcast shape), value broadcasts inside
        shape = torch.broadcast_shapes(self.logits.shape, value.shape)
        dtype = torch.promote_types(self.logits.dtype, value.dtype)  # a common float dtype, as torch's
        return _BinaryBernoulliLogProb.apply(self.logits.expand(shape).to(dtype), value.to(dtype))


def bernoulli_likelihood(logits: torch.Tensor, event_dims: int = 3) -> Independent:
    """p(x|z) for binary images: independent Bernoulli per pixel, parameterised by logits.

    Logits are cast to float32 so that log_prob is exact under autocast. `mean` = sigmoid(logits)
    is what reconstruction and sample figures show.
    """
    return Independent(FastBernoulli(logits=logits.float()), event_dims)


# ----------------------------------------------------------------------------- 8-bit likelihoods
#
# Shared conventions for everything below:
#   * bin k (k = 0..255) is centred on k/255 with half-width 1/510; bins 0 and 255 are open-ended.
#   * `log_prob` snaps its value to the nearest bin index round(255 x) before doing any maths, so
#     bf16/fp16 values (which cannot hold k/255 exactly, but land within half a bin of it) score
#     exactly like their float32 counterparts.
#   * parameters are cast to float32 (float64 is kept, for exact tests), and the maths runs with
#     autocast disabled, so a bf16 decoder output loses nothing beyond its own rounding.

NUM_LEVELS = 256  # values per sub-pixel of 8-bit data
_MAX_LEVEL = NUM_LEVELS - 1  # 255: the grid is k / 255
_HALF_BIN = 0.5 / _MAX_LEVEL  # 1/510: half the bin width, in pixel units
# Purely numerical guard on log-scales inside the maths (not a modelling floor): at exp(-30) ~ 1e-13
# the scale is far below float32's spacing of values near 1 (6e-8), so every pmf is already a point
# mass there, and exp(+-30) keeps standardised edges and their squares finite in float32.
_LOG_SCALE_GUARD = 30.0


def _full_precision_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half types and ints are promoted)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _autocast_off(device: torch.device):
    """Context manager that disables autocast on `device` (a no-op for devices without autocast)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _grid_tolerance_in_bins(dtype: torch.dtype) -> float:
    """How far (in units of one bin, 1/255) a value may sit from k/255 and still count as on-grid.

    float32/64 data made as k/255 is within 1e-5 bins of the grid; 1e-3 leaves room for a little
    arithmetic. Half types cannot represent k/255: their worst rounding error on [0, 1] is a quarter
    of their eps (the spacing on [0.5, 1) is eps/2), i.e. 0.062 bins for fp16 and 0.498 bins for bf16
    -- still under half a bin, so rounding to the nearest bin recovers k exactly.
    """
    if dtype in (torch.float16, torch.bfloat16):
        return max(1e-3, _MAX_LEVEL * torch.finfo(dtype).eps / 4 * 1.001)
    return 1e-3


def _bin_index(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Nearest bin index round(255 x), clamped to 0..255, as a float tensor of `dtype`."""
    return torch.round(value.to(dtype) * _MAX_LEVEL).clamp_(0, _MAX_LEVEL)


class _EightBitGrid(constraints.Constraint):
    """Support of the 8-bit likelihoods: values k/255, k = 0..255 (see `_grid_tolerance_in_bins`)."""

    is_discrete = True
    event_dim = 0

    def check(self, value: torch.Tensor) -> torch.Tensor:
        tolerance = _grid_tolerance_in_bins(value.dtype)
        in_levels = value.to(_full_precision_dtype(value)) * _MAX_LEVEL
        in_range = (in_levels >= -tolerance) & (in_levels <= _MAX_LEVEL + tolerance)
        on_grid = (in_levels - torch.round(in_levels)).abs() <= tolerance
        return in_range & on_grid

    def __repr__(self) -> str:
        return "EightBitGrid(k/255 for k=0..255)"


eight_bit_grid = _EightBitGrid()


class _EightBitValueChecks:
    """Mixin: `log_prob` value validation with error messages that say what is wrong."""

    def _validate_sample(self, value: torch.Tensor) -> None:
        name = f"{type(self).__name__}.log_prob"
        if isinstance(value, torch.Tensor):
            if not value.is_floating_point():
                raise ValueError(
                    f"{name}: value must be a floating-point tensor of pixels k/255 in [0, 1], got dtype "
                    f"{value.dtype}" + (" (uint8 images: use x.float() / 255)" if value.dtype == torch.uint8 else "")
                )
            checked = value.detach().to(_full_precision_dtype(value))
            if torch.isnan(checked).any():
                raise ValueError(f"{name}: value contains NaN")
            tolerance = _grid_tolerance_in_bins(value.dtype)
            in_levels = checked * _MAX_LEVEL
            out_of_range = (in_levels < -tolerance) | (in_levels > _MAX_LEVEL + tolerance)
            if out_of_range.any():
                raise ValueError(
                    f"{name}: value out of range: 8-bit pixel values must lie in [0, 1] (k/255), found "
                    f"min {checked.min().item():.6g}, max {checked.max().item():.6g} "
                    f"({int(out_of_range.sum())} of {value.numel()} values outside)"
                    + (" -- looks like integer levels 0..255: divide by 255"
                       if bool((checked == torch.round(checked)).all()) and checked.max() > 1 else "")
                )
            off_grid = (in_levels - torch.round(in_levels)).abs() > tolerance
            if off_grid.any():
                example = checked[off_grid][0].item()
                raise ValueError(
                    f"{name}: value off the 8-bit grid: expected k/255 for integer k (tolerance "
                    f"{tolerance:.3g} of a bin); {int(off_grid.sum())} of {value.numel()} values are off, "
                    f"e.g. {example:.6g} = {example * _MAX_LEVEL:.4f}/255"
                )
        super()._validate_sample(value)  # type, shape and support checks of torch.distributions


def _log_sigmoid(u: torch.Tensor) -> torch.Tensor:
    """log sigmoid(u), to absolute accuracy ~eps: log(sigmoid(u)) while sigmoid(u) is a normal float,
    and u itself below -80 (where log sigmoid(u) = u - log(1 + e^u) differs from u by < e^-80).

    Hand-written because F.logsigmoid / softplus / log1p / expm1 run as scalar loops on CPU, 10-30x
    slower than sigmoid / exp / log here (the whole log-mass is ~1.5x faster for it). The clamp keeps
    the unused branch's gradient finite.
    """
    return torch.where(u < -80, u, torch.log(torch.sigmoid(u.clamp_min(-80))))


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-d)) for d > 0, via 1 - e^-d = 2 tanh(d/2) / (1 + tanh(d/2)): relatively accurate
    for small d (unlike log(1 - exp(-d))), exactly 0 for large d, and no scalar-loop expm1 (a Taylor
    branch for small d measured slower than the one tanh)."""
    half_tanh = torch.tanh(0.5 * d)
    return torch.log(2 * half_tanh / (1 + half_tanh))


# Stand-in for the infinite outer edges of bins 0 and 255, in pixel units. Finite so that
# 0 * edge stays 0 in backward passes; large enough that |edge - loc| / scale > 9e6 for any scale
# within the guard (<= e^30), so its sigmoid is exactly 0 or 1, and < 3e38 / e^30 so it stays finite.
_OUTER_EDGE = 1e20


def _bin_edges(bin_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper edges (k -+ 1/2)/255 of bin k in pixel units, +-_OUTER_EDGE for the open
    ends of bins 0 and 255. Same shape as bin_index (the value's, not the parameters': cheap)."""
    lower = torch.where(bin_index == 0, torch.full_like(bin_index, -_OUTER_EDGE), (bin_index - 0.5) / _MAX_LEVEL)
    upper = torch.where(bin_index == _MAX_LEVEL, torch.full_like(bin_index, _OUTER_EDGE), (bin_index + 0.5) / _MAX_LEVEL)
    return lower, upper


def _standardised_bin_edges(bin_index: torch.Tensor, loc: torch.Tensor,
                            log_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised lower and upper edges ((k -+ 1/2)/255 - loc) / scale of bin k; the open outer
    edges of bins 0 and 255 come out at about -+1e20 / scale, effectively -+infinity.

    Each edge is computed by the same float expression whether it is bin k's upper or bin k+1's
    lower edge, so neighbouring masses share it bit for bit and the pmf telescopes to 1 (to ~1e-7 in
    float32). A single edge relative to loc is good to ~eps/2 * max(1, |loc|) pixel units, so in
    float32 a bin's mass is good to about (max density) * 6e-8 * max(1, |loc|) / scale: ~1e-5 at the
    default floor scale exp(-7) when an edge sits right at loc, far less for wider scales.
    """
    inv_scale = torch.exp(-log_scale.clamp(-_LOG_SCALE_GUARD, _LOG_SCALE_GUARD))
    lower_edge, upper_edge = _bin_edges(bin_index)
    return (lower_edge - loc) * inv_scale, (upper_edge - loc) * inv_scale


def _discretized_logistic_log_mass(bin_index: torch.Tensor, loc: torch.Tensor,
                                   log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin k) under a logistic(loc, exp(log_scale)) discretized onto the 8-bit bins.

    With a, b the standardised upper and lower bin edges and F = sigmoid the logistic CDF,
        log(F(a) - F(b)) = log F(a) + log(1 - F(b)) + log(1 - exp(-(a - b))),
    an exact identity (F(a) - F(b) = F(a)(1 - F(b))(1 - e^{b-a}) for the logistic): a product of
    three factors, each computed in log space, so the difference never cancels and never
    underflows to log 0 -- every term is finite for finite parameters. That is why, unlike
    PixelCNN++'s log(sigmoid(a) - sigmoid(b)), no mid-bin density fallback is needed here.
    The open edge bins need no branch either: with b = -"infinity" (bin 0) the formula is
    log F(a) = -softplus(-a), and with a = +"infinity" (bin 255) it is log(1 - F(b)) = -softplus(b).
    a - b is taken from the rounded edges (not the exact 1/(255 scale)) so the pmf telescopes to 1
    in float32 too. Shapes broadcast; returns the broadcast shape.
    """
    tiny = torch.finfo(torch.promote_types(loc.dtype, log_scale.dtype)).tiny
    lower, upper = _standardised_bin_edges(bin_index, loc, log_scale)
    return _log_sigmoid(upper) + _log_sigmoid(-lower) + _log1mexp((upper - lower).clamp_min(tiny))


def _narrow_bin_threshold(dtype: torch.dtype) -> float:
    """Standardised bin width (times max(|mid|, 1)) below which the Gaussian mass is taken from the
    mid-bin density. That approximation (with its w^2 correction) has relative error ~ (w m)^4/1920,
    the tail subtraction ~ eps/(w m); they balance at (1920 eps)^(1/5): 0.19 for float32, 3.4e-3 for
    float64, where both are ~6e-7 and ~7e-14 respectively."""
    return (1920 * torch.finfo(dtype).eps) ** (1.0 / 5.0)


def _discretized_gaussian_log_mass(bin_index: torch.Tensor, loc: torch.Tensor,
                                   log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin k) under a Normal(loc, exp(log_scale)) discretized onto the 8-bit bins.

    With a, b the standardised upper and lower edges (the open ends of bins 0 and 255 at
    -+"infinity", see `_bin_edges`), Phi the normal CDF, Q = 1 - Phi, m = (a + b)/2 and
    w = a - b (= 1/(255 scale) for interior bins), the mass Phi(a) - Phi(b) is computed as
        narrow bin (w * max(|m|, 1) below `_narrow_bin_threshold`): log(phi(m) w (1 + (m^2 - 1) w^2/24)),
                    the mid-bin density times the width with its second-order (Taylor) correction,
                    used where the tail difference below would cancel
        bin straddling the location (b < 0 < a): log((erf(a/sqrt2) + erf(-b/sqrt2)) / 2), a sum of
                    two non-negative terms, so no cancellation
        tail bin (both edges on one side; reflect so they are t_near < t_far, in units of sqrt2):
                    Q(t_near) - Q(t_far) = exp(-t_near^2)/2 * (erfcx(t_near) - erfcx(t_far) exp(-(t_far^2 - t_near^2)))
                    with erfcx(t) = exp(t^2) erfc(t) and t_far^2 - t_near^2 = (t_far - t_near)(t_far + t_near),
                    which keeps the exp(-t^2) factor in log space (no underflow far in the tail).
    The edge bins fall out of the same forms: bin 0 is log Phi(a) (t_far = "infinity" in the tail
    form, erf(infinity) = 1 in the straddling one), bin 255 likewise log Q(b). (torch's log_ndtr is
    not used: its backward pass returns NaN for arguments around -1e12 in float32.)
    Branches that do not apply at an element are fed harmless inputs so that `torch.where` never
    routes a NaN/inf gradient. Shapes broadcast; returns the broadcast shape.
    """
    dtype = torch.promote_types(loc.dtype, log_scale.dtype)
    tiny = torch.finfo(dtype).tiny
    lower, upper = _standardised_bin_edges(bin_index, loc, log_scale)  # b, a
    # m and w from the rounded edges so every branch integrates over the same interval
    middle = 0.5 * (upper + lower)
    width = (upper - lower).clamp_min(tiny)
    sqrt2 = math.sqrt(2.0)

    narrow = width * middle.abs().clamp_min(1.0) < _narrow_bin_threshold(dtype)
    middle_n = torch.where(narrow, middle, torch.zeros_like(middle))
    width_n = torch.where(narrow, width, torch.full_like(width, 1e-3))
    log_density_times_width = (-0.5 * middle_n.square() - 0.5 * math.log(2 * math.pi) + torch.log(width_n)
                               + torch.log1p((middle_n.square() - 1) * width_n.square() / 24))

    straddles = (lower < 0) & (upper > 0)
    upper_s = torch.where(straddles, upper, torch.ones_like(upper))
    lower_s = torch.where(straddles, lower, -torch.ones_like(lower))
    log_straddle = torch.log(
        (0.5 * (torch.erf(upper_s / sqrt2) + torch.erf(-lower_s / sqrt2))).clamp_min(tiny))

    # tail: reflect the bin onto the positive side; near/far = distances of its edges from loc
    above = lower >= 0
    near = torch.where(above, lower, -upper)
    far = torch.where(above, upper, -lower)
    # (>= 0 by construction for tail bins; no clamp_min(0): its gradient at exactly 0 is 0)
    near = torch.where(straddles, torch.ones_like(near), near)
    far = torch.where(straddles, torch.full_like(far, 2.0), far)
    t_near, t_far = near / sqrt2, far / sqrt2
    bracket = (torch.special.erfcx(t_near)
               - torch.special.erfcx(t_far) * torch.exp(-(t_far - t_near) * (t_far + t_near)))
    log_tail = math.log(0.5) - t_near.square() + torch.log(bracket.clamp_min(tiny))

    return torch.where(narrow, log_density_times_width, torch.where(straddles, log_straddle, log_tail))


def _discretized_moments(loc: torch.Tensor, log_scale: torch.Tensor, survival) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and second moment of a discretized pmf on the 8-bit grid.

    For X on {k/255}: E[X] = sum_j P(X >= j/255) / 255 and E[X^2] = sum_j (2j - 1) P(X >= j/255) / 255^2,
    j = 1..255, and P(X >= j/255) is the continuous survival function at the edge (j - 1/2)/255.
    `survival(standardised_edge)` gives it. Loops over the 255 edges so memory stays at the
    parameters' size (this is for figures and tests, not the training loop).
    """
    log_scale = log_scale.clamp(-_LOG_SCALE_GUARD, _LOG_SCALE_GUARD)
    inv_scale = torch.exp(-log_scale)
    mean = torch.zeros_like(loc + inv_scale)
    second_moment = torch.zeros_like(mean)
    for j in range(1, NUM_LEVELS):
        tail_mass = survival(((j - 0.5) / _MAX_LEVEL - loc) * inv_scale)
        mean = mean + tail_mass
        second_moment = second_moment + (2 * j - 1) * tail_mass
    return mean / _MAX_LEVEL, second_moment / _MAX_LEVEL ** 2


def _logistic_survival(standardised: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(-standardised)


def _normal_survival(standardised: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(-standardised)


def _snap_to_grid(continuous: torch.Tensor) -> torch.Tensor:
    """Map a continuous draw to its bin's value k/255 (edge bins open-ended): an exact draw from the
    discretized distribution, since bin k collects exactly the draws that round to k."""
    return torch.round(continuous * _MAX_LEVEL).clamp_(0, _MAX_LEVEL) / _MAX_LEVEL


class BoundedVarianceNormal(Normal):
    """Continuous Gaussian p(x|z) whose log-variance is squashed into [min_log_var, max_log_var].

    Map from the decoder's raw output to the log-variance (bounded=True, the default):
        log_var = min_log_var + (max_log_var - min_log_var) * (tanh(raw_log_var) + 1) / 2
    With the defaults (-1, 1) this is simply log_var = tanh(raw_log_var): variance in [e^-1, e],
    so the density is bounded above and cannot be driven to infinity by shrinking the variance.
    bounded=False gives the unbounded Gaussian, log_var = raw_log_var.

    `loc` and `log_var` are float32 (float64 kept); `scale` = exp(log_var / 2). log_prob is computed
    from log_var directly. `discretized()` returns the same Gaussian as a pmf on the 8-bit bins.
    """

    arg_constraints = {"loc": constraints.real, "log_var": constraints.real}

    def __init__(self, loc, raw_log_var, min_log_var: float = -1.0, max_log_var: float = 1.0,
                 bounded: bool = True, validate_args=None):
        if bounded and not min_log_var < max_log_var:
            raise ValueError(f"need min_log_var < max_log_var, got {min_log_var}, {max_log_var}")
        loc, raw_log_var = broadcast_all(loc, raw_log_var)
        dtype = _full_precision_dtype(loc, raw_log_var)
        with _autocast_off(loc.device):
            loc, raw_log_var = loc.to(dtype), raw_log_var.to(dtype)
            if bounded:
                squashed = (torch.tanh(raw_log_var) + 1) / 2  # in [0, 1]
                log_var = (min_log_var + (max_log_var - min_log_var) * squashed).clamp(min_log_var, max_log_var)
            else:
                log_var = raw_log_var
            self.log_var = log_var
            self.min_log_var, self.max_log_var, self.bounded = min_log_var, max_log_var, bounded
            super().__init__(loc, torch.exp(0.5 * log_var), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(BoundedVarianceNormal, _instance)
        new.log_var = self.log_var.expand(torch.Size(batch_shape))
        new.min_log_var, new.max_log_var, new.bounded = self.min_log_var, self.max_log_var, self.bounded
        return super().expand(batch_shape, _instance=new)

    @property
    def variance(self) -> torch.Tensor:
        return torch.exp(self.log_var)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        with _autocast_off(self.loc.device):
            value = value.to(self.loc.dtype)
            standardised = (value - self.loc) * torch.exp(-0.5 * self.log_var)
            return -0.5 * (standardised.square() + self.log_var + math.log(2 * math.pi))

    def entropy(self) -> torch.Tensor:
        return 0.5 * (1.0 + math.log(2 * math.pi) + self.log_var)

    def discretized(self) -> "DiscretizedGaussian":
        """The same Gaussian as a pmf over the 256 bins (no log-scale floor: the variance is
        already whatever this object's map made it)."""
        return DiscretizedGaussian(self.loc, 0.5 * self.log_var, min_log_scale=None,
                                   validate_args=self._validate_args)


class _DiscretizedEightBit(_EightBitValueChecks, Distribution):
    """Base for element-wise pmfs on the 8-bit grid, parameterised by a location and a log-scale.

    batch_shape = broadcast shape of (loc, log_scale); event_shape = (). Subclasses set
    `_log_mass`, `_survival` and `_standard_draw` (a sampler for the continuous standard form).
    `log_scale` is stored after the floor: log_scale = max(log_scale, min_log_scale), unless
    min_log_scale is None (no floor; only the numerical guard at +-30 inside the maths).
    """

    arg_constraints = {"loc": constraints.real, "log_scale": constraints.real}
    support = eight_bit_grid
    has_enumerate_support = True

    def __init__(self, loc, log_scale, min_log_scale: float | None = None, validate_args=None):
        loc, log_scale = broadcast_all(loc, log_scale)
        dtype = _full_precision_dtype(loc, log_scale)
        with _autocast_off(loc.device):
            loc, log_scale = loc.to(dtype), log_scale.to(dtype)
            if min_log_scale is not None:
                log_scale = log_scale.clamp_min(min_log_scale)
        self.loc, self.log_scale, self.min_log_scale = loc, log_scale, min_log_scale
        super().__init__(loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.log_scale = self.log_scale.expand(batch_shape)
        new.min_log_scale = self.min_log_scale
        Distribution.__init__(new, batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def scale(self) -> torch.Tensor:
        return torch.exp(self.log_scale)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log P(X = value), value on the 8-bit grid (snapped to the nearest bin). Shape: broadcast
        of value and batch_shape."""
        if self._validate_args:
            self._validate_sample(value)
        with _autocast_off(self.loc.device):
            return self._log_mass(_bin_index(value, self.loc.dtype), self.loc, self.log_scale)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Draws on the 8-bit grid (values exactly k/255), shape sample_shape + batch_shape."""
        shape = self._extended_shape(sample_shape)
        with _autocast_off(self.loc.device):
            standard = self._standard_draw(shape, self.loc.dtype, self.loc.device)
            return _snap_to_grid(self.loc + self.scale.clamp_max(math.exp(_LOG_SCALE_GUARD)) * standard)

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        """The 256 grid values, shape [256] + (1,)*len(batch_shape), or expanded to [256] + batch_shape."""
        values = torch.arange(NUM_LEVELS, dtype=self.loc.dtype, device=self.loc.device) / _MAX_LEVEL
        values = values.reshape((NUM_LEVELS,) + (1,) * len(self.batch_shape))
        return values.expand((NUM_LEVELS,) + self.batch_shape) if expand else values

    @property
    def mean(self) -> torch.Tensor:
        """Exact mean of the discretized pmf (not the location: the two differ near 0 and 1 and
        for wide scales). Costs 255 element-wise passes; meant for figures, not training."""
        with _autocast_off(self.loc.device):
            return _discretized_moments(self.loc, self.log_scale, self._survival)[0]

    @property
    def variance(self) -> torch.Tensor:
        """Exact variance of the discretized pmf (same cost as `mean`)."""
        with _autocast_off(self.loc.device):
            mean, second_moment = _discretized_moments(self.loc, self.log_scale, self._survival)
            return (second_moment - mean.square()).clamp_min(0.0)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, "
                f"min_log_scale={self.min_log_scale})")


class DiscretizedGaussian(_DiscretizedEightBit):
    """Mass of Normal(loc, scale = exp(log_scale)) over each 8-bit bin, edge bins open-ended.

    DiscretizedGaussian(loc, log_scale, min_log_scale=None, validate_args=None). `loc` may lie
    outside [0, 1]. log_prob: see `_discretized_gaussian_log_mass` for the stable forms.
    `sample()` is a Gaussian draw snapped to its bin (exactly on the grid); `mean`/`variance` are
    the exact moments of the pmf. Usually obtained as `BoundedVarianceNormal(...).discretized()`.
    """

    _log_mass = staticmethod(_discretized_gaussian_log_mass)
    _survival = staticmethod(_normal_survival)

    @staticmethod
    def _standard_draw(shape, dtype, device):
        return torch.randn(shape, dtype=dtype, device=device)


class DiscretizedLogistic(_DiscretizedEightBit):
    """Mass of Logistic(loc, scale = exp(log_scale)) over each 8-bit bin, edge bins open-ended.

    DiscretizedLogistic(loc, log_scale, min_log_scale=-7.0, validate_args=None): the log-scale is
    floored at min_log_scale (exp(-7) ~ a quarter of a bin) so the pmf cannot collapse onto one
    value; min_log_scale=None removes the floor (model03's --no-variance-bound). log_prob: see
    `_discretized_logistic_log_mass`. `sample()` is a logistic draw snapped to its bin (exactly on
    the grid); `mean`/`variance` are the exact moments of the pmf.
    """

    def __init__(self, loc, log_scale, min_log_scale: float | None = -7.0, validate_args=None):
        super().__init__(loc, log_scale, min_log_scale=min_log_scale, validate_args=validate_args)

    _log_mass = staticmethod(_discretized_logistic_log_mass)
    _survival = staticmethod(_logistic_survival)

    @staticmethod
    def _standard_draw(shape, dtype, device):
        # inverse CDF of the standard logistic; u kept off 0 and 1 so the log stays finite
        eps = torch.finfo(dtype).eps
        u = torch.rand(shape, dtype=dtype, device=device).clamp_(eps, 1 - eps)
        return torch.log(u) - torch.log1p(-u)


# ----------------------------------------------------------------------------- mixture (model04)


def num_coupling_coefficients(num_channels: int) -> int:
    """Coefficients letting channel c's location depend on the values of channels 0..c-1: C(C-1)/2
    (0 for grey, 3 for RGB: G<-R, B<-R, B<-G)."""
    return num_channels * (num_channels - 1) // 2


def num_mixture_params(num_channels: int, num_components: int, rgb_coupling: bool = True) -> int:
    """Decoder output channels P needed by `mixture_from_decoder_output`:

        P = K * (1 + 2 C + C (C - 1) / 2)
            (one mixture logit, a location and a log-scale per channel, and the coupling
            coefficients, per component), so P = 10 K for RGB (C = 3) and P = 3 K for grey (C = 1);
        P = K * (1 + 2 C) without the coupling (channels independent given the component).
    """
    if num_channels < 1 or num_components < 1:
        raise ValueError(f"need num_channels >= 1 and num_components >= 1, got {num_channels}, {num_components}")
    coupling = num_coupling_coefficients(num_channels) if rgb_coupling else 0
    return num_components * (1 + 2 * num_channels + coupling)


def _coupling_index(channel: int, earlier_channel: int) -> int:
    """Position of the coefficient (channel <- earlier_channel) in the coupling axis: pairs are
    ordered (1,0), (2,0), (2,1), ... -- for RGB: 0 = G<-R, 1 = B<-R, 2 = B<-G."""
    return num_coupling_coefficients(channel) + earlier_channel


class MixtureOfDiscretizedLogistics(_EightBitValueChecks, Distribution):
    """PixelCNN++-style mixture of discretized logistics over whole images (model04's p(x|z)).

    Every pixel has its own K-component mixture, shared by its C channels: for component k,
    channel c is a discretized logistic (8-bit bins, as `DiscretizedLogistic`) with scale
    exp(log_scale[k, c]) and location
        loc[k, c] + sum_{j < c} coupling[k, (c, j)] * x_j,      coupling = tanh(raw_coupling) in (-1, 1)
    where x_j is the *value* (in [0, 1]) of the pixel's earlier channel j. So for RGB the G mean moves
    with R and the B mean with R and G, and
        p(pixel) = sum_k pi_k p(R | k) p(G | R, k) p(B | R, G, k),   pi = softmax(logits over k),
    the exact joint over the pixel's channels. For C = 1 it is a plain mixture of discretized
    logistics. Pixels are independent given the parameters.

    Shapes (`...` = batch_shape, which broadcasts across the arguments):
        logits        [..., K, H, W]          mixture weights (unnormalised log-probabilities)
        loc           [..., K, C, H, W]       locations, pixel units (may lie outside [0, 1])
        log_scale     [..., K, C, H, W]       floored at min_log_scale (None: no floor)
        raw_coupling  [..., K, C(C-1)/2, H, W] pre-tanh coefficients (None allowed when C = 1)
    event_shape = [C, H, W]; log_prob(x) with x [..., C, H, W] returns [...] (summed over the image).

    `sample()` draws a component per pixel, then channels in order, each a logistic draw snapped
    to its bin using the already-drawn earlier channels: values exactly on the grid k/255.
    `mean`: for C = 1 the exact mean of the pmf. For C > 1 channel 0 is exact and later channels
    use a plug-in: inside component k, the location is coupled to the component's mean of the
    earlier channels rather than averaged over their values (exact when the coupling is 0; the
    exact value would need a sum over 256^(c) values per pixel). Costs 255 element-wise passes per
    channel; meant for reconstruction figures.
    """

    has_rsample = False

    def __init__(self, logits, loc, log_scale, raw_coupling=None, min_log_scale: float | None = -7.0,
                 validate_args=None):
        if loc.dim() < 4 or log_scale.shape[-4:] != loc.shape[-4:]:
            raise ValueError(f"loc and log_scale must be [..., K, C, H, W] with equal trailing dims, got "
                             f"{tuple(loc.shape)} and {tuple(log_scale.shape)}")
        num_components, num_channels, height, width = loc.shape[-4:]
        if logits.dim() < 3 or logits.shape[-3:] != (num_components, height, width):
            raise ValueError(f"logits must be [..., K={num_components}, H={height}, W={width}], got "
                             f"{tuple(logits.shape)}")
        num_coupling = num_coupling_coefficients(num_channels)
        if raw_coupling is None:
            if num_coupling:
                raise ValueError(f"raw_coupling is required for {num_channels} channels")
            raw_coupling = loc.new_zeros(loc.shape[:-4] + (num_components, 0, height, width))
        if raw_coupling.dim() < 4 or raw_coupling.shape[-4:] != (num_components, num_coupling, height, width):
            raise ValueError(f"raw_coupling must be [..., K={num_components}, {num_coupling}, H={height}, "
                             f"W={width}], got {tuple(raw_coupling.shape)}")
        batch_shape = torch.broadcast_shapes(logits.shape[:-3], loc.shape[:-4], log_scale.shape[:-4],
                                             raw_coupling.shape[:-4])
        dtype = _full_precision_dtype(logits, loc, log_scale, raw_coupling)
        with _autocast_off(loc.device):
            self.logits = logits.to(dtype).expand(batch_shape + logits.shape[-3:])
            self.loc = loc.to(dtype).expand(batch_shape + loc.shape[-4:])
            log_scale = log_scale.to(dtype).expand(batch_shape + log_scale.shape[-4:])
            self.log_scale = log_scale if min_log_scale is None else log_scale.clamp_min(min_log_scale)
            self.raw_coupling = raw_coupling.to(dtype).expand(batch_shape + raw_coupling.shape[-4:])
            self.coupling = torch.tanh(self.raw_coupling)
        self.min_log_scale = min_log_scale
        self.num_components, self.num_channels = num_components, num_channels
        super().__init__(batch_shape, torch.Size((num_channels, height, width)), validate_args=validate_args)

    arg_constraints = {"logits": constraints.real, "loc": constraints.real,
                       "log_scale": constraints.real, "raw_coupling": constraints.real}

    @property
    def support(self):
        return constraints.independent(eight_bit_grid, 3)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(MixtureOfDiscretizedLogistics, _instance)
        batch_shape = torch.Size(batch_shape)
        for name, tail_dims in (("logits", 3), ("loc", 4), ("log_scale", 4), ("raw_coupling", 4), ("coupling", 4)):
            param = getattr(self, name)
            setattr(new, name, param.expand(batch_shape + param.shape[-tail_dims:]))
        new.min_log_scale, new.num_components, new.num_channels = (
            self.min_log_scale, self.num_components, self.num_channels)
        Distribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mixture_log_weights(self) -> torch.Tensor:
        """log pi, normalised over components: [..., K, H, W]."""
        return torch.log_softmax(self.logits, dim=-3)

    def _coupled_loc(self, loc: torch.Tensor, coupling: torch.Tensor, channel: int,
                     earlier_values: list[torch.Tensor]) -> torch.Tensor:
        """loc[..., channel] + sum_j coupling[..., (channel, j)] * earlier_values[j].

        loc/coupling: [..., (K,) C or C(C-1)/2, H, W] -- the channel axis is dim -3; earlier_values[j]
        broadcasts against loc[..., channel, :, :]."""
        coupled = loc[..., channel, :, :]
        for earlier, value in enumerate(earlier_values):
            coupled = coupled + coupling[..., _coupling_index(channel, earlier), :, :] * value
        return coupled

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log p(x) of whole images, summed over pixels: value [..., C, H, W] -> [...]."""
        if self._validate_args:
            self._validate_sample(value)
        with _autocast_off(self.loc.device):
            bin_index = _bin_index(value, self.loc.dtype)  # [..., C, H, W]
            pixel_values = (bin_index / _MAX_LEVEL).unsqueeze(-4)  # [..., 1, C, H, W]: broadcasts over K
            # log pi_k + sum_c log p(x_c | x_<c, k), accumulated channel by channel: [..., K, H, W]
            log_joint = self.mixture_log_weights
            for channel in range(self.num_channels):
                earlier = [pixel_values[..., j, :, :] for j in range(channel)]
                loc = self._coupled_loc(self.loc, self.coupling, channel, earlier)
                log_joint = log_joint + _discretized_logistic_log_mass(
                    bin_index.unsqueeze(-4)[..., channel, :, :], loc, self.log_scale[..., channel, :, :])
            log_pixel = torch.logsumexp(log_joint, dim=-3)  # [..., H, W]
            return log_pixel.sum(dim=(-2, -1))

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Images on the 8-bit grid: [*sample_shape, *batch_shape, C, H, W]."""
        sample_shape = torch.Size(sample_shape)
        with _autocast_off(self.loc.device):
            # component per pixel: Categorical over K, which must be the last axis
            logits_last = self.logits.movedim(-3, -1)  # [..., H, W, K]
            component = torch.distributions.Categorical(logits=logits_last).sample(sample_shape)  # [*s, ..., H, W]
            index = component.unsqueeze(-3).unsqueeze(-3)  # [*s, ..., 1, 1, H, W]: picks along K

            def pick(param):  # [..., K, X, H, W] -> [*s, ..., X, H, W] for the drawn component
                expanded = param.expand(sample_shape + param.shape)
                return expanded.gather(-4, index.expand(index.shape[:-4] + (1,) + param.shape[-3:])).squeeze(-4)

            loc, log_scale, coupling = pick(self.loc), pick(self.log_scale), pick(self.coupling)
            scale = torch.exp(log_scale.clamp(-_LOG_SCALE_GUARD, _LOG_SCALE_GUARD))
            channels = []  # each [*s, ..., H, W], on the grid
            for channel in range(self.num_channels):
                channel_loc = self._coupled_loc(loc, coupling, channel, channels)
                standard = DiscretizedLogistic._standard_draw(channel_loc.shape, channel_loc.dtype, channel_loc.device)
                channels.append(_snap_to_grid(channel_loc + scale[..., channel, :, :] * standard))
            return torch.stack(channels, dim=-3)

    @property
    def mean(self) -> torch.Tensor:
        """[..., C, H, W]; exact for C = 1, plug-in for coupled channels (see class docstring)."""
        with _autocast_off(self.loc.device):
            component_means = []  # each [..., K, H, W]
            for channel in range(self.num_channels):
                loc = self._coupled_loc(self.loc, self.coupling, channel, component_means)
                component_means.append(_discretized_moments(
                    loc, self.log_scale[..., channel, :, :], _logistic_survival)[0])
            weights = torch.softmax(self.logits, dim=-3)  # [..., K, H, W]
            return torch.stack([(weights * m).sum(dim=-3) for m in component_means], dim=-3)

    def __repr__(self) -> str:
        return (f"MixtureOfDiscretizedLogistics(batch_shape={tuple(self.batch_shape)}, "
                f"event_shape={tuple(self.event_shape)}, K={self.num_components}, "
                f"min_log_scale={self.min_log_scale})")


def mixture_from_decoder_output(raw: torch.Tensor, num_channels: int, num_components: int,
                                min_log_scale: float | None = -7.0, rgb_coupling: bool = True,
                                validate_args=None) -> MixtureOfDiscretizedLogistics:
    """Decoder output [..., P, H, W], P = num_mixture_params(C, K, rgb_coupling), -> MixtureOfDiscretizedLogistics.

    Channel layout of P (K components, C image channels), component-major within each block:
        [0, K)                       logits                      (k)
        [K, K + KC)                  locations, used as-is       (k * C + c)
        [K + KC, K + 2KC)            log-scales, floored         (k * C + c)
        [K + 2KC, P)                 raw coupling, tanh'd        (k * C(C-1)/2 + i), i: G<-R, B<-R, B<-G
    Without rgb_coupling the last block is absent and the coupling is 0: channels are independent given
    the component (the ablation of the autoregression over RGB; identical to it for C = 1).
    """
    expected = num_mixture_params(num_channels, num_components, rgb_coupling)
    if raw.dim() < 3 or raw.shape[-3] != expected:
        raise ValueError(f"decoder output must be [..., P={expected}, H, W] for C={num_channels}, "
                         f"K={num_components} (P = K * (1 + 2C{' + C(C-1)/2' if rgb_coupling else ''})), "
                         f"got {tuple(raw.shape)}")
    lead, (height, width) = raw.shape[:-3], raw.shape[-2:]
    K, C, num_coupling = num_components, num_channels, num_coupling_coefficients(num_channels)
    if rgb_coupling:
        logits, loc, log_scale, raw_coupling = torch.split(raw, [K, K * C, K * C, K * num_coupling], dim=-3)
    else:
        logits, loc, log_scale = torch.split(raw, [K, K * C, K * C], dim=-3)
        raw_coupling = raw.new_zeros(lead + (K * num_coupling, height, width))  # tanh(0) = 0: no coupling
    return MixtureOfDiscretizedLogistics(
        logits,
        loc.reshape(lead + (K, C, height, width)),  # [..., K*C, H, W] -> [..., K, C, H, W]
        log_scale.reshape(lead + (K, C, height, width)),
        raw_coupling.reshape(lead + (K, num_coupling, height, width)),  # [..., K*C(C-1)/2, H, W] -> [..., K, C(C-1)/2, H, W]
        min_log_scale=min_log_scale, validate_args=validate_args)


# ----------------------------------------------------------------------------- factories


def gaussian_likelihood(loc: torch.Tensor, raw_log_var: torch.Tensor, event_dims: int = 3,
                        min_log_var: float = -1.0, max_log_var: float = 1.0, bounded: bool = True,
                        validate_args=None) -> Independent:
    """p(x|z) as `Independent(BoundedVarianceNormal)` over the image (model02 training). For the
    comparable pmf use `.base_dist.discretized()` or `discretized_gaussian_likelihood`."""
    base = BoundedVarianceNormal(loc, raw_log_var, min_log_var, max_log_var, bounded, validate_args=validate_args)
    return Independent(base, event_dims, validate_args=False)  # the base validates values


def discretized_gaussian_likelihood(loc: torch.Tensor, log_scale: torch.Tensor, event_dims: int = 3,
                                    min_log_scale: float | None = None, validate_args=None) -> Independent:
    """p(x|z) as `Independent(DiscretizedGaussian)` over the image (model02's reported test LL)."""
    base = DiscretizedGaussian(loc, log_scale, min_log_scale=min_log_scale, validate_args=validate_args)
    return Independent(base, event_dims, validate_args=False)  # the base validates with clear messages


def discretized_logistic_likelihood(loc: torch.Tensor, log_scale: torch.Tensor, event_dims: int = 3,
                                    min_log_scale: float | None = -7.0, validate_args=None) -> Independent:
    """p(x|z) as `Independent(DiscretizedLogistic)` over the image (model03)."""
    base = DiscretizedLogistic(loc, log_scale, min_log_scale=min_log_scale, validate_args=validate_args)
    return Independent(base, event_dims, validate_args=False)  # the base validates with clear messages
