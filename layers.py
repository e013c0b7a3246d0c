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


# ----------------------------------------------------------------------------- convolutional blocks (model02+)
#
# Encoder and decoder for 8-bit images, built outside the VAE and passed in, so every rung on
# 28x28x1 (MNIST, Fashion-MNIST) and 32x32x3 (CIFAR-10, SVHN) shares them. Both work at three
# resolutions, H, H/2 and H/4 (28 -> 14 -> 7, 32 -> 16 -> 8): the image side must be divisible by 4.
# Channels: `width` at full resolution, 2 * width at H/2, 4 * width at H/4.


def _check_image_shape(image_shape) -> tuple[int, int, int]:
    if len(image_shape) != 3 or image_shape[1] % 4 or image_shape[2] % 4:
        raise ValueError(f"conv blocks need an image shape (C, H, W) with H and W divisible by 4, got {image_shape}")
    return tuple(image_shape)


class ConvEncoder(nn.Module):
    """Images [B, C, H, W] in [0, 1] -> features [B, features] (q(z|x)'s head, e.g. GaussianHead, sits on top).

    3x3 conv at full resolution, two 4x4 stride-2 convs (H -> H/2 -> H/4), then a linear layer.
    """

    def __init__(self, image_shape, width: int = 64, features: int = 512, activation=nn.SiLU):
        super().__init__()
        c, h, w = _check_image_shape(image_shape)
        self.features = features
        self.net = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), activation(),  # [B, w, H, W]
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), activation(),  # [B, 2w, H/2, W/2]
            nn.Conv2d(2 * width, 4 * width, 4, stride=2, padding=1), activation(),  # [B, 4w, H/4, W/4]
            nn.Flatten(),  # [B, 4w * H/4 * W/4]
            nn.Linear(4 * width * (h // 4) * (w // 4), features), activation(),
        )

    def forward(self, x):
        return self.net(x * 2.0 - 1.0)  # centre the pixels on 0


class ConvDecoder(nn.Module):
    """Latents [N, latent_dim] -> per-pixel parameters [N, out_channels, H, W] (e.g. 2C: a location
    and a log-scale per sub-pixel; the rung decides what they mean).

    Linear to a [4w, H/4, W/4] map, two stages of nearest-neighbour 2x upsampling + 3x3 conv
    (H/4 -> H/2 -> H; upsample-then-conv avoids the checkerboard pattern of transposed convs), and a
    final stride-1 3x3 conv into the pixels. The last layer is deliberately not a stride-2 transposed
    conv: that would make each 2x2 pixel block a linear map of one feature vector.
    """

    def __init__(self, latent_dim: int, image_shape, out_channels: int, width: int = 64, activation=nn.SiLU):
        super().__init__()
        _, h, w = _check_image_shape(image_shape)
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 4 * width * (h // 4) * (w // 4)), activation(),
            nn.Unflatten(1, (4 * width, h // 4, w // 4)),  # [N, 4w * H/4 * W/4] -> [N, 4w, H/4, W/4]
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(4 * width, 2 * width, 3, padding=1), activation(),  # [N, 2w, H/2, W/2]
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * width, width, 3, padding=1), activation(),  # [N, w, H, W]
            nn.Conv2d(width, out_channels, 3, padding=1),  # stride 1: [N, out_channels, H, W]
        )

    def forward(self, z):
        # Unflatten gives an NCHW view of the Linear's output. In a channels-last model the first conv would
        # convert its input, upsampled 4x larger by then, to NHWC (a copy measured at ~15% of model03's CPU
        # evaluation pass); converting the small [N, 4w, H/4, W/4] map first lets the nearest upsampling write
        # NHWC itself. Same values bit for bit: the conv sees the same NHWC tensor either way.
        h = self.net[:3](z)
        if self.net[4].weight.is_contiguous(memory_format=torch.channels_last):
            h = h.contiguous(memory_format=torch.channels_last)
        return self.net[3:](h)


# ----------------------------------------------------------------------------- residual blocks (model04)
#
# Blocks of the hierarchical VAE (model04): pre-activation residual blocks that keep the shape, and
# the resampling between its resolutions. Unnormalised (no batch norm: its batch statistics would mix
# the k importance samples of an image and differ between training and evaluation), so depth is kept
# stable by scaling each block's last conv at initialisation (`out_scale`, e.g. 1/sqrt(blocks)).


def soft_clamp(x: torch.Tensor, bound: float) -> torch.Tensor:
    """bound * tanh(x / bound): the identity near 0, smoothly limited to (-bound, bound)."""
    return bound * torch.tanh(x / bound)


class ResidualBlock(nn.Module):
    """x + conv3x3(act(conv3x3(act(x)))): [N, C, H, W] -> [N, C, H, W]."""

    def __init__(self, channels: int, hidden: int | None = None, out_scale: float = 1.0, activation=nn.SiLU):
        super().__init__()
        hidden = hidden or channels
        self.net = nn.Sequential(activation(), nn.Conv2d(channels, hidden, 3, padding=1),
                                 activation(), nn.Conv2d(hidden, channels, 3, padding=1))
        with torch.no_grad():
            self.net[-1].weight.mul_(out_scale)

    def forward(self, x):
        return x + self.net(x)


def downsample(x: torch.Tensor) -> torch.Tensor:
    """Average over 2x2 windows: [N, C, H, W] -> [N, C, ceil(H/2), ceil(W/2)] (odd sides keep their edge)."""
    return nn.functional.avg_pool2d(x, 2, ceil_mode=True)


def upsample_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize to `size` (H, W): the inverse of `downsample`'s shape change, also for odd
    sides (7 -> 14 -> 28, or 4 -> 7)."""
    return nn.functional.interpolate(x, size=tuple(size), mode="nearest")
