"""Building blocks shared by the rungs: importance-sample merge/unmerge and network blocks.

Importance sampling with k samples per image gives latents of shape [k, B, ...]. Networks take a
plain batch, so the k samples are folded into the batch dim ([k*B, ...], sample-major: rows
i*B .. (i+1)*B-1 hold sample i of every image) and unfolded afterwards. The encoder runs once per
image; the decoder runs once on all k*B latents; no Python loop over samples.
"""
import torch
from torch import nn


def merge_samples(x: torch.Tensor) -> torch.Tensor:
    """[k, B, ...] -> [k*B, ...] (sample-major), a view when x is contiguous."""
    if x.dim() < 2:
        raise ValueError(f"merge_samples needs a [k, B, ...] tensor, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def unmerge_samples(x: torch.Tensor, k: int) -> torch.Tensor:
    """[k*B, ...] -> [k, B, ...], the inverse of merge_samples."""
    if x.shape[0] % k != 0:
        raise ValueError(f"unmerge_samples: leading dim {x.shape[0]} is not a multiple of k={k}")
    return x.reshape(k, x.shape[0] // k, *x.shape[1:])


class MergeSamples(nn.Module):
    """Module form of merge_samples, for use inside nn.Sequential."""

    def forward(self, x):
        return merge_samples(x)


class UnmergeSamples(nn.Module):
    """Module form of unmerge_samples; k is given at call time (it changes between train and eval)."""

    def forward(self, x, k: int):
        return unmerge_samples(x, k)


def mlp(sizes: list[int], activation=nn.Tanh, final_activation: bool = False) -> nn.Sequential:
    """Fully connected stack sizes[0] -> ... -> sizes[-1], `activation` between layers."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2 or final_activation:
            layers.append(activation())
    return nn.Sequential(*layers)


class GaussianHead(nn.Module):
    """Linear map to the mean and log-scale of a diagonal Gaussian: [B, n_in] -> 2 x [B, n_out]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.mean = nn.Linear(n_in, n_out)
        self.log_scale = nn.Linear(n_in, n_out)

    def forward(self, h):
        return self.mean(h), self.log_scale(h)
