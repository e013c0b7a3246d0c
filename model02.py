"""model02: a convolutional VAE on 8-bit images with a Gaussian p(x|z) whose log-variance is tanh-bounded.

Hypothesis: as model01, but on 8-bit images with a continuous Gaussian observation model. A
Gaussian density can be driven to infinity on data that sit on a grid -- shrink the variance of a
pixel that is always 0 and log p(x|z) grows without limit -- so the decoder learns to be sure where
it should not be. Bounding the log-variance from below (tanh-squashed into [min, max]) keeps the
density finite; `--no-variance-bound` (log-variance = raw decoder output) shows the failure: the
means still look good, the samples do not, and the proper pmf (the discretized Gaussian, below)
gives the honest number in bits/dim.

Units of the bound. Pixels are k/255 in [0, 1], but the bound only has a meaning per 8-bit level:
  min_log_var_levels = -1: sigma^2 >= e^-1 levels^2, i.e. sigma >= 0.61 levels (just under one bin).
  Then the largest density per level is 1/sqrt(2 pi e^-1) = 0.66 < 1, so the density times one
  bin's width can never claim more than a probability could. In pixel units the floor is
  log sigma^2 >= -1 - 2 ln 255 = -12.08. The ceiling, max_log_var_levels = 2 ln 255, is sigma = 255
  levels, the whole pixel range (any wider is uninformative).

Trained on the density, reported with the pmf. In training (model.train()) `log_px_z` is the
continuous Gaussian log-density per 8-bit level, log N(x; mu, sigma^2) - D ln 255 (D sub-pixels),
the midpoint approximation of the discretized pmf on interior bins while sigma is wider than a level
(the pmf's edge bins 0 and 255 also collect the tails, so on images with many black or white pixels
the pmf is higher by hundreds of nats), and able to exceed 0 -- impossible for a pmf -- when sigma
is narrower (the unbounded run). In evaluation (model.eval(): validation, the test L_5000, figures)
`log_px_z` is the discretized Gaussian pmf of the same mu and sigma, the mass of each 8-bit bin
(edge bins open-ended), so test bits/dim compare with model03 and model04. Why not train on the
discretized Gaussian directly? It would give a better number (it optimises what is reported, and
its open-ended edge bins reward the saturated 0 and 255 pixels), but a pmf is at most 1 and cannot
blow up: the failure this rung is about exists only for the density, and so does the bound's job.
model03 trains on a proper pmf.

Figures (eval mode): reconstructions are the means of the discretized pmf at one z ~ q(z|x);
samples are real draws x ~ p(x|z), z ~ p(z), from the discretized pmf (a Gaussian draw snapped to
its 8-bit bin), not means.

Architecture (layers.ConvEncoder / ConvDecoder, built outside the VAE and passed in): encoder
3x3 conv (width) -> two 4x4 stride-2 convs (2 width, 4 width) -> linear (features) -> Gaussian
q(z|x) with latent_dim dims; decoder linear -> two (2x upsample, 3x3 conv) stages -> stride-1 3x3
conv to a location and a raw log-variance per sub-pixel; prior N(0, I). One latent layer of 32
dims (the original used 20 on grey 28x28 images; 32 leaves a little room for colour while the
single layer stays the bottleneck that model04's hierarchy addresses).

    python model02.py --dataset cifar10                                     # full run, CUDA if present
    python model02.py --dataset cifar10 --no-variance-bound                 # the failure
    python model02.py --quick --dataset fashion-mnist --data-dir ../shared/data  # about a minute on CPU
"""
import argparse
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Independent

import config
import runtime
import training
from discretized import gaussian_likelihood
from distributions import diagonal_gaussian, standard_normal
from layers import ConvDecoder, ConvEncoder, GaussianHead, merge_samples, unmerge_samples

EIGHT_BIT_DATASETS = ["cifar10", "svhn", "cifar10-jpeg", "fashion-mnist", "mnist"]
LOG_LEVELS = math.log(255.0)  # ln of the number of 8-bit levels per unit of pixel value


# ----------------------------------------------------------------------------- config
@dataclass
class Config(config.TrainConfig):
    dataset: str = "cifar10"  # the standard colour benchmark
    # A loss here is thousands of nats per image and its gradient grows like 1 / sigma^2 as p(x|z)'s scale
    # shrinks: norms of 1e4..1e6 are the normal regime (bounded runs peak near 5e5; an unbounded model02
    # run passes 1e6 within an epoch and would be stopped by a lower threshold). Clipping (--grad-clip)
    # bounds every update; only non-finite or astronomically large ones are skipped.
    skip_threshold: float = 1e12
    latent_dim: int = 32  # stochastic units (one layer)
    # conv channels at full resolution (2x at H/2, 4x at H/4). Kept small because the test L_5000 runs the
    # decoder on 5000 x 10000 latents and its full-resolution feature maps dominate that cost
    width: int = 32
    # encoder output units, the input of q(z|x)'s head; its linear layer holds most of the weights, and 128
    # keeps the weights-only checkpoint (6 MB on CIFAR-10) under the 8 MB that --publish puts in git
    features: int = 128
    variance_bound: bool = True  # False (--no-variance-bound): the likelihood's scale is unbounded
    min_log_var_levels: float = -1.0  # floor of log sigma^2, sigma in 8-bit levels: sigma >= 0.61 levels
    max_log_var_levels: float = 2 * LOG_LEVELS  # ceiling: sigma <= 255 levels, the whole range


# ----------------------------------------------------------------------------- model
class ConvVAE(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int, cfg: Config):
        super().__init__()
        self.encoder = encoder  # images [B, C, H, W] -> features [B, encoder.features]
        self.posterior = GaussianHead(encoder.features, latent_dim)
        self.decoder = decoder  # latents [N, L] -> [N, 2C, H, W]: a location and a scale parameter per sub-pixel
        self.latent_dim = latent_dim
        self.variance_bound = cfg.variance_bound
        self.min_log_var = cfg.min_log_var_levels - 2 * LOG_LEVELS  # levels -> pixel units (x in [0, 1])
        self.max_log_var = cfg.max_log_var_levels - 2 * LOG_LEVELS
        self.channels_last = True  # conv nets run faster in NHWC, on CUDA and on CPU (runtime.prepare_model)

    def prior(self, device):
        return standard_normal((self.latent_dim,), device=device)

    def likelihood(self, params):
        """p(x|z) from decoder output [..., 2C, H, W] -> batch [...], event [C, H, W].

        Training: the continuous Gaussian (log-variance tanh-bounded unless --no-variance-bound).
        Evaluation: the same Gaussian discretized onto the 8-bit bins, a proper pmf.
        """
        loc, raw_log_var = params.chunk(2, dim=-3)  # each [..., C, H, W]
        gaussian = gaussian_likelihood(loc, raw_log_var, min_log_var=self.min_log_var,
                                       max_log_var=self.max_log_var, bounded=self.variance_bound)
        return gaussian if self.training else Independent(gaussian.base_dist.discretized(), 3)

    def forward(self, x, k: int):
        q = diagonal_gaussian(*self.posterior(self.encoder(x)))  # once per image: batch [B], event [L]
        z = q.rsample((k,))  # [k, B, L]
        params = self.decoder(merge_samples(z))  # one pass over all k*B latents: [k*B, 2C, H, W]
        px = self.likelihood(unmerge_samples(params, k))  # batch [k, B], event [C, H, W]
        log_px_z = px.log_prob(x)  # [k, B]
        if self.training:  # density per unit of [0, 1] -> per 8-bit level, comparable with the pmf
            log_px_z = log_px_z - x[0].numel() * LOG_LEVELS
        return {"log_px_z": log_px_z, "log_pz": self.prior(x.device).log_prob(z), "log_qz": q.log_prob(z)}

    @torch.no_grad()
    def reconstruct(self, x):
        """Mean of p(x|z) at one z ~ q(z|x) (in eval mode the exact mean of the pmf)."""
        z = diagonal_gaussian(*self.posterior(self.encoder(x))).sample()  # [B, L]
        return self.likelihood(self.decoder(z)).mean

    @torch.no_grad()
    def sample(self, n: int):
        """Real samples x ~ p(x|z), z ~ p(z) -- draws, not means (in eval mode on the 8-bit grid)."""
        z = self.prior(next(self.parameters()).device).sample((n,))  # [n, L]
        return self.likelihood(self.decoder(z)).sample()


def build_model(cfg: Config, info) -> ConvVAE:
    if info.binary:
        raise runtime.UserError(f"{info.name} is binary; model02 models 8-bit images: use --dataset one of "
                                 f"{', '.join(EIGHT_BIT_DATASETS)} (binary data sets belong to model01).")
    if min(cfg.latent_dim, cfg.width, cfg.features) < 1:
        raise runtime.UserError(f"--latent-dim, --width and --features must be >= 1, got {cfg.latent_dim}, "
                                 f"{cfg.width}, {cfg.features}")
    if cfg.variance_bound and not cfg.min_log_var_levels < cfg.max_log_var_levels:
        raise runtime.UserError(f"--min-log-var-levels ({cfg.min_log_var_levels:g}) must be below "
                                 f"--max-log-var-levels ({cfg.max_log_var_levels:g})")
    channels = info.shape[0]
    encoder = ConvEncoder(info.shape, cfg.width, cfg.features)
    decoder = ConvDecoder(cfg.latent_dim, info.shape, 2 * channels, cfg.width)
    return ConvVAE(encoder, decoder, cfg.latent_dim, cfg)


def likelihood_name(cfg: Config, info) -> str:
    if cfg.variance_bound:
        trained = (f"gaussian density, tanh-bounded log-var in [{cfg.min_log_var_levels:g}, "
                   f"{cfg.max_log_var_levels:.4g}] (variance in 8-bit levels^2)")
    else:
        trained = "gaussian density, unbounded log-var"
    return f"discretized-gaussian (trained: {trained})"


# ----------------------------------------------------------------------------- entry point
def quick_overrides(cfg: Config) -> dict:
    """--quick: a small network, a few hundred steps and a small test bound, about a minute on 2 CPU cores."""
    return {**config.quick_overrides(cfg), "width": 8, "features": 64, "batch_size": 32, "max_steps": 200,
            "val_every": 100, "val_samples": 5, "n_test": 200, "eval_samples": 20, "eval_chunk": 2000,
            "checkpoint_every": 100}


RUNG = training.Rung(name="model02", config_class=Config, build_model=build_model, likelihood=likelihood_name,
                     figure_prefix=lambda cfg: "model02" if cfg.variance_bound else "model02_unbounded",
                     run_suffix=lambda cfg: "" if cfg.variance_bound else "_unbounded", quick=quick_overrides,
                     cpu_eval_chunk=128)  # 28x28 conv decoder: 128 latents per pass measured fastest on 1 CPU thread


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_common_args(parser, defaults, datasets=EIGHT_BIT_DATASETS)
    a = parser.add_argument
    a("--latent-dim", type=int, default=defaults.latent_dim, help=f"stochastic units (default {defaults.latent_dim})")
    a("--width", type=int, default=defaults.width, help=f"conv channels at full resolution (default {defaults.width})")
    a("--features", type=int, default=defaults.features, help=f"encoder output units (default {defaults.features})")
    a("--no-variance-bound", dest="variance_bound", action="store_false",
      help="remove the bound on p(x|z)'s scale: its log is the raw decoder output (shows the failure)")
    a("--min-log-var-levels", type=float, default=defaults.min_log_var_levels,
      help=f"floor of log sigma^2 with sigma in 8-bit levels (default {defaults.min_log_var_levels:g})")
    a("--max-log-var-levels", type=float, default=defaults.max_log_var_levels,
      help=f"ceiling of log sigma^2 in 8-bit levels (default 2 ln 255 = {defaults.max_log_var_levels:.4g})")
    return parser


if __name__ == "__main__":
    training.run_script(RUNG, build_parser())
