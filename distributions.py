"""Latents and the binary likelihood as `torch.distributions` objects, and the bound's small helpers.

Pixel convention (used everywhere in this repo):
    images are float tensors in [0, 1]. Binary data holds {0., 1.}; 8-bit data holds k/255 for
    k = 0..255, so bin k of a discretized likelihood is centred on k/255 and has width 1/255.

Every likelihood is returned wrapped in `Independent` so that `log_prob(x)` sums over the
pixels of one image and returns one number per image (batch shape = leading dims, event shape =
the image shape). All likelihood maths runs in float32, also under bf16 autocast.

Here: log_mean_exp and bits_per_dim; the diagonal Gaussians of every latent (`diagonal_gaussian`,
`standard_normal`, `kl_independent_normals`); and the Bernoulli of binary images (`bernoulli_likelihood`,
model01 and model04). The likelihoods of 8-bit images live beside it: discretized.py (model02's Gaussian and
model03's logistic, as pmfs on the 256 bins) and mixture.py (model04's mixture of discretized logistics).
"""
import math

import torch
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

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


# The likelihoods of 8-bit pixels moved to discretized.py and mixture.py; a model script of an earlier commit still
# imports them from here when it runs beside this tree's modules (bench.py --baseline-commit REV).
from discretized import (BoundedVarianceNormal, DiscretizedGaussian, DiscretizedLogistic,  # noqa: E402, F401
                         discretized_gaussian_likelihood, discretized_logistic_likelihood, gaussian_likelihood)
from mixture import MixtureOfDiscretizedLogistics, mixture_from_decoder_output, num_mixture_params  # noqa: E402, F401
