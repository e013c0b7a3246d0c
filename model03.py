"""model03: the same convolutional VAE with a discretized logistic p(x|z) and a bounded scale.

Hypothesis: as model02, but the observation model is a proper pmf on the 8-bit grid -- a logistic
discretized onto the 256 bins, the first and last bin open-ended (PixelCNN++'s likelihood without
the mixture) -- trained directly on what is reported. A pmf is at most 1, so log p(x|z) cannot run
off to infinity; the question is whether the scale still needs a floor. `--no-variance-bound`
removes it (log-scale = raw decoder output, only a numerical guard at +-30): the decoder may then
make interior pixels near-deterministic, and one miss costs a great deal.

Units of the bound, chosen as model02's: the logistic's variance s^2 pi^2 / 3 is floored at e^-1
levels^2 (min_log_var_levels = -1, sigma >= 0.61 levels, just under one bin), so both rungs
promise the same minimum spread. In log-scale: log s >= -1/2 - ln(pi / sqrt 3) = -1.10 levels,
i.e. log s >= -1.10 - ln 255 = -6.64 in pixel units (x in [0, 1]) -- close to PixelCNN++'s -7
(s = 0.23 levels). At the floor one interior bin holds at most 63% of the mass. The logistic
needs no ceiling: its edge bins absorb any width.

Trained and reported with the same pmf: `log_px_z` is the discretized logistic's log-mass in
training and in evaluation, so the training loss, the validation bound and the test L_5000 are
one quantity, and test bits/dim compare with model02 and model04.

Figures (eval mode): reconstructions are the exact means of the pmf at one z ~ q(z|x); samples are
real draws x ~ p(x|z), z ~ p(z) (a logistic draw snapped to its 8-bit bin), not means.

Architecture: identical to model02 (layers.ConvEncoder / ConvDecoder, one latent layer of 32
dims, prior N(0, I)); the decoder's 2C output channels are a location and a raw log-scale.

    python model03.py --dataset cifar10                                     # full run, CUDA if present
    python model03.py --dataset cifar10 --no-variance-bound                 # no floor on the scale
    python model03.py --quick --dataset fashion-mnist --data-dir ../shared/data  # about a minute on CPU
"""
import argparse
import math
from dataclasses import dataclass

import torch
from torch import nn

import config
import runtime
import training
from discretized import discretized_logistic_likelihood
from distributions import diagonal_gaussian, standard_normal
from layers import ConvDecoder, ConvEncoder, GaussianHead, merge_samples, unmerge_samples

EIGHT_BIT_DATASETS = ["cifar10", "svhn", "cifar10-jpeg", "fashion-mnist", "mnist"]
LOG_LEVELS = math.log(255.0)  # ln of the number of 8-bit levels per unit of pixel value
LOG_LOGISTIC_STD = math.log(math.pi / math.sqrt(3.0))  # std of a logistic = scale * pi / sqrt(3)


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


# ----------------------------------------------------------------------------- model
class ConvVAE(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int, cfg: Config):
        super().__init__()
        self.encoder = encoder  # images [B, C, H, W] -> features [B, encoder.features]
        self.posterior = GaussianHead(encoder.features, latent_dim)
        self.decoder = decoder  # latents [N, L] -> [N, 2C, H, W]: a location and a scale parameter per sub-pixel
        self.latent_dim = latent_dim
        self.variance_bound = cfg.variance_bound
        # variance floor -> log-scale floor: log s = (log sigma^2) / 2 - ln(pi / sqrt 3), levels -> pixels
        self.min_log_scale = 0.5 * cfg.min_log_var_levels - LOG_LOGISTIC_STD - LOG_LEVELS
        self.channels_last = True  # conv nets run faster in NHWC, on CUDA and on CPU (runtime.prepare_model)

    def prior(self, device):
        return standard_normal((self.latent_dim,), device=device)

    def likelihood(self, params):
        """p(x|z) from decoder output [..., 2C, H, W] -> batch [...], event [C, H, W].

        Training and evaluation: the discretized logistic (log-scale floored unless --no-variance-bound).
        """
        loc, raw_log_scale = params.chunk(2, dim=-3)  # each [..., C, H, W]
        return discretized_logistic_likelihood(loc, raw_log_scale,
                                               min_log_scale=self.min_log_scale if self.variance_bound else None)

    def forward(self, x, k: int):
        q = diagonal_gaussian(*self.posterior(self.encoder(x)))  # once per image: batch [B], event [L]
        z = q.rsample((k,))  # [k, B, L]
        params = self.decoder(merge_samples(z))  # one pass over all k*B latents: [k*B, 2C, H, W]
        px = self.likelihood(unmerge_samples(params, k))  # batch [k, B], event [C, H, W]
        return {"log_px_z": px.log_prob(x), "log_pz": self.prior(x.device).log_prob(z), "log_qz": q.log_prob(z)}

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
        raise runtime.UserError(f"{info.name} is binary; model03 models 8-bit images: use --dataset one of "
                                 f"{', '.join(EIGHT_BIT_DATASETS)} (binary data sets belong to model01).")
    if min(cfg.latent_dim, cfg.width, cfg.features) < 1:
        raise runtime.UserError(f"--latent-dim, --width and --features must be >= 1, got {cfg.latent_dim}, "
                                 f"{cfg.width}, {cfg.features}")
    channels = info.shape[0]
    encoder = ConvEncoder(info.shape, cfg.width, cfg.features)
    decoder = ConvDecoder(cfg.latent_dim, info.shape, 2 * channels, cfg.width)
    return ConvVAE(encoder, decoder, cfg.latent_dim, cfg)


def likelihood_name(cfg: Config, info) -> str:
    if cfg.variance_bound:
        return f"discretized-logistic (variance floored at exp({cfg.min_log_var_levels:g}) 8-bit levels^2)"
    return "discretized-logistic (unbounded log-scale)"


# ----------------------------------------------------------------------------- entry point
def quick_overrides(cfg: Config) -> dict:
    """--quick: a small network, a few hundred steps and a small test bound, about a minute on 2 CPU cores."""
    return {**config.quick_overrides(cfg), "width": 8, "features": 64, "batch_size": 32, "max_steps": 200,
            "val_every": 100, "val_samples": 5, "n_test": 200, "eval_samples": 20, "eval_chunk": 2000,
            "checkpoint_every": 100}


RUNG = training.Rung(name="model03", config_class=Config, build_model=build_model, likelihood=likelihood_name,
                     figure_prefix=lambda cfg: "model03" if cfg.variance_bound else "model03_unbounded",
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
    return parser


if __name__ == "__main__":
    training.run_script(RUNG, build_parser())
