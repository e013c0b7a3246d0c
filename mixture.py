"""model04's p(x|z) on 8-bit images: a PixelCNN++-style mixture of discretized logistics, as a
`torch.distributions` object.

    MixtureOfDiscretizedLogistics  K-component mixture per pixel; for RGB the G and B locations depend
                                   linearly on the values of R (and G); event shape [C, H, W].
    mixture_from_decoder_output    builds it from a decoder's raw output; `num_mixture_params` gives the
                                   number of output channels that needs.
Each component's channel is discretized.DiscretizedLogistic's pmf on the 256 bins (the same log-mass,
value checks and sampling on the grid).
"""
import torch
from torch.distributions import Distribution, constraints

from discretized import (_LOG_SCALE_GUARD, _MAX_LEVEL, DiscretizedLogistic, _autocast_off, _bin_index,
                         _discretized_logistic_log_mass, _discretized_moments, _EightBitValueChecks,
                         _full_precision_dtype, _logistic_survival, _snap_to_grid, eight_bit_grid)

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
