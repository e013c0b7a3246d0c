"""Likelihoods of 8-bit pixels: pmfs on the 256 bins, as `torch.distributions` objects (model02, model03).

A density on 8-bit data is not a probability, so the discretized classes put mass on the 256 bins
[k/255 - 1/510, k/255 + 1/510]; the first bin also takes all mass below 1/510 and the last all mass above
1 - 1/510, so each pmf sums to exactly 1.
    BoundedVarianceNormal        continuous Gaussian, log-variance squashed by tanh into
                                 [min_log_var, max_log_var] (model02's training likelihood);
                                 `bounded=False` gives log-variance = raw. `.discretized()` gives ->
    DiscretizedGaussian          the Gaussian's mass per 8-bit bin (model02's reported test LL).
    DiscretizedLogistic          logistic mass per 8-bit bin, log-scale floored (model03).
Factories `gaussian_likelihood`, `discretized_gaussian_likelihood`, `discretized_logistic_likelihood`
wrap the element-wise classes in `Independent`, like distributions.bernoulli_likelihood. Discrete classes
validate `log_prob` values (in [0, 1] and on the k/255 grid) and raise a ValueError naming the problem;
`sample()` returns values exactly on the grid. mixture.py builds model04's mixture of discretized logistics
on the grid, the log-mass and the value checks of this module (the names it imports from here).
"""
import contextlib
import math

import torch
from torch.distributions import Distribution, Independent, Normal, constraints
from torch.distributions.utils import broadcast_all

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
