"""Likelihoods, posteriors and priors as `torch.distributions` objects.

Pixel convention (used everywhere in this repo):
    images are float tensors in [0, 1]. Binary data holds {0., 1.}; 8-bit data holds k/255 for
    k = 0..255, so bin k of a discretized likelihood is centred on k/255 and has width 1/255.

Every likelihood is returned wrapped in `Independent` so that `log_prob(x)` sums over the
pixels of one image and returns one number per image (batch shape = leading dims, event shape =
the image shape). All likelihood maths runs in float32, also under bf16 autocast.
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


def bernoulli_likelihood(logits: torch.Tensor, event_dims: int = 3) -> Independent:
    """p(x|z) for binary images: independent Bernoulli per pixel, parameterised by logits.

    Logits are cast to float32 so that log_prob is exact under autocast. `mean` = sigmoid(logits)
    is what reconstruction and sample figures show.
    """
    return Independent(Bernoulli(logits=logits.float()), event_dims)


