"""model04: a top-down hierarchical VAE with a mixture of discretized logistics.

Hypothesis: as model03, but with a mixture of discretized logistics p(x|z) (RGB channels
autoregressive within a pixel) and several stochastic layers instead of one: a top-down hierarchy
p(z_1) p(z_2|z_1) ... p(z_L|z_<L) p(x|z), with spatial latents at two or more resolutions, gives a
better test log-likelihood than one latent vector -- on binarized MNIST (Bernoulli p(x|z)) the goal
is L_5000 >= -82.0 nats, at least 3 nats above model01's single layer (about -85.3); on 8-bit data,
colour images included, a lower bits/dim than model03. Trained and evaluated like every rung: the importance-weighted bound with
k samples per image in every stochastic layer, and L_5000 on the test set.

Architecture (a ladder / VDVAE-style model; layers are numbered from the top, l = 1 is coarsest):
  bottom-up, once per image:  x -> 3x3 conv -> residual block (H) -> [2x2 average pool -> residual
      blocks] per resolution H/2, H/4, ... -> features a_r at every latent resolution r
  top-down, on k*B rows (k importance samples of each of B images):  a learned state h at the
      coarsest resolution; at each stochastic layer l (at resolution r, upsampling h when r grows)
          prior      p(z_l | z_<l)    = N(mu_p, sigma_p)          from h
          posterior  q(z_l | x, z_<l) = N(mu_p + dmu, sigma_p * exp(dlog_sigma))   from h and a_r
          z_l ~ q (or ~ p when sampling);  h <- residual block(h + state update + 1x1 conv(z_l))
      The posterior is a correction of the prior (as in NVAE): at initialisation q = p, so no layer
      starts with a KL to pay. Log-scales are soft-clamped (+-LOG_SCALE_BOUND) so exp() stays finite.
  output: h upsampled to H x W -> 3x3 conv -> 1x1 conv -> the likelihood's parameters per pixel:
      bernoulli         1 logit per pixel (binary data sets)
      logistic-mixture  K-component PixelCNN++ mixture, K (1 + 2C + C(C-1)/2) channels (8-bit sets)
  The features a_r enter the posterior through a conv applied once per image, broadcast over the
  k samples; everything in the top-down pass runs once on all k*B rows, no loop over samples.

What the bound means. In evaluation (validation, the test L_S, `evaluate_bound`) and in training
with k > 1 and --objective iwae, log p(z) and log q(z|x) are the log-densities of the sampled
latents, summed over layers, so log w = log p(x|z) + log p(z) - log q(z|x) is an importance weight
and L_S a real bound. With k = 1 or --objective vae, training uses the k-sample ELBO, for which the
KL of each layer can be taken analytically given the sampled layers above (lower variance, same
expectation): then `log_pz` holds -sum_l KL_l and `log_qz` is 0 (their difference is what the loop
uses); --no-analytic-kl turns it off.

What keeps it trainable (each a flag): KL warm-up (--kl-warmup-steps), free bits per layer
(--free-bits, on the batch-mean KL of each layer; ELBO objectives only), gradient clipping and
skipping of huge or non-finite updates (--grad-clip, --skip-threshold), and an EMA of the weights
that is what gets evaluated and drawn (--ema-decay). result.json gains per-layer KL (nats) and
active units (units whose posterior mean varies over the test images by more than 0.01), so a
collapsed layer shows.

    python model04.py                                                 # binarized MNIST, CUDA if present
    python model04.py --dataset fashion-mnist                         # 8-bit: mixture of logistics
    python model04.py --quick --data-dir ../shared/data               # about a minute on 2 CPU cores
    python model04.py --dataset cifar10-jpeg --data-dir ../shared/data  # colour: MoDL with RGB coupling
    python model04.py --dataset cifar10-jpeg --no-rgb-coupling --mixture-components 1   # the ablations of p(x|z)
    python model04.py --dataset cifar10-jpeg --latent-layers 1 --top-down-layers 6     # ... and of the hierarchy

Figures: test images, reconstructions (means of p(x|z)), prior samples at temperature 1 and --sample-temperature
(real draws x ~ p(x|z) on 8-bit images, Bernoulli means on binary ones), and
`layers`: what each stochastic layer encodes (a row per layer, top first: that layer resampled from its
prior, the layers above fixed to one draw, the layers below at their prior means).
"""
import argparse
import math
from dataclasses import dataclass

import torch
from torch import nn

import config
import data as data_lib
import evaluation
import runtime
import training
from distributions import bernoulli_likelihood, diagonal_gaussian, kl_independent_normals
from mixture import mixture_from_decoder_output, num_mixture_params
from layers import ResidualBlock, downsample, merge_samples, soft_clamp, unmerge_samples, upsample_to

LIKELIHOODS = ["bernoulli", "logistic-mixture"]
LOG_SCALE_BOUND = 5.0  # latent log-scales (and the posterior's log-scale correction) stay in (-5, 5)
ACTIVE_UNIT_SAMPLES = 10  # samples of the layers above, averaged for E_q[z_l | x] in a hierarchy


def default_likelihood(dataset: str) -> str:
    return "bernoulli" if data_lib.dataset_info(dataset).binary else "logistic-mixture"


# ----------------------------------------------------------------------------- config
@dataclass
class Config(config.TrainConfig):
    dataset: str = "binarized-mnist"  # dynamic binarization, as model01
    likelihood: str | None = None  # None: bernoulli for binary data sets, logistic-mixture for 8-bit ones
    mixture_components: int = 10  # K of the logistic mixture (PixelCNN++ used 10 for CIFAR-10)
    rgb_coupling: bool = True  # a channel's location depends on the pixel's earlier channels (PixelCNN++)
    min_log_scale: float = -7.0  # floor of the mixture's log-scales (pixel units; 1 bin = 1/255 ~ e^-5.5)
    latent_layers: int = 6  # L stochastic layers, spread over the resolutions (coarsest first)
    # top-down layers in all (0: L). With more, the first L (the coarsest) are stochastic and the rest deterministic
    # blocks of the same shape: the same network with fewer latent layers (e.g. --latent-layers 1 --top-down-layers 6)
    top_down_layers: int = 0
    downsamplings: int = 3  # latent resolutions H/2 ... H/2^D: 14, 7, 4 for MNIST; 16, 8, 4 for 32x32
    latent_channels: int = 16  # latent units per position of every layer
    width: int = 64  # channels of the deterministic paths
    encoder_blocks: int = 2  # residual blocks per resolution in the bottom-up pass
    blocks_per_layer: int = 1  # residual blocks after each stochastic layer in the top-down pass
    analytic_kl: bool = True  # ELBO training (k = 1 or --objective vae): analytic KL per layer
    free_bits: float = 0.0  # > 0: nats per layer below which its batch-mean KL is not penalised
    sample_temperature: float = 0.7  # prior temperature of the extra sample figure
    # training: the ELBO with analytic KL, as in LVAE / VDVAE; L_5000 at the end. Sized for one H100:
    # a step of this small net is bound by kernel launches (~1000 per step), not by FLOPs, so a
    # batch of 256 costs about what 128 does; 300 epochs = 69k steps.
    importance_samples: int = 1
    objective: str = "vae"
    kl_warmup_steps: int = 10000  # the first ~43 epochs
    epochs: int = 300
    batch_size: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 1000
    grad_clip: float = 200.0
    # Losses are summed over pixels (hundreds of nats per image on binarized MNIST, thousands on 8-bit
    # data), so gradient norms of 1e3..1e4 are normal early on binarized MNIST (measured: up to 3.9e3 in the
    # first 50 steps) and of 1e6 under the mixture on 32x32 RGB (measured on cifar10-jpeg: 0.7e6..1.4e6 from
    # step 300 to 1,500, with no harm done). A threshold inside that range freezes the run: skipped steps leave
    # the weights where the norms are large, so every later step is skipped too (1e6 stopped cifar10-jpeg at
    # step 500). Only blow-ups are skipped: None means 1e6 for binary data, 1e9 for 8-bit data.
    skip_threshold: float | None = None
    ema_decay: float = 0.9995  # averages the last ~2000 steps
    val_every: int = 1150  # every 5 epochs (230 steps each): a 100-sample validation is < 10% of that time
    eval_chunk: int = 0  # latents per evaluation pass; 0: 2^14 on CUDA (3 images x 5000 samples), on CPU cpu_eval_chunk

    def __post_init__(self):
        def check(ok, message):
            if not ok:
                raise runtime.UserError(message)

        try:
            info = data_lib.dataset_info(self.dataset, self.image_size, self.grey)
        except data_lib.DataError as e:
            raise runtime.UserError(str(e)) from None
        binary = info.binary
        if self.skip_threshold is None:
            self.skip_threshold = 1e6 if binary else 1e9
        check(self.likelihood is None or self.likelihood in LIKELIHOODS,
              f"--likelihood must be one of {', '.join(LIKELIHOODS)}, got {self.likelihood!r}")
        likelihood = self.likelihood or default_likelihood(self.dataset)
        check(not (likelihood == "bernoulli" and not binary),
              f"--likelihood bernoulli models {{0,1}} pixels, but {self.dataset} has 8-bit pixels: use "
              f"--likelihood logistic-mixture (the default for it), or a binarized data set.")
        check(not (likelihood == "logistic-mixture" and binary),
              f"--likelihood logistic-mixture is a pmf over 256 levels, but {self.dataset} has {{0,1}} pixels: "
              f"use --likelihood bernoulli (the default for it), or an 8-bit data set.")
        check(self.downsamplings >= 1, f"--downsamplings must be >= 1, got {self.downsamplings}")
        check(self.latent_layers >= 1, f"--latent-layers must be >= 1, got {self.latent_layers}")
        check(self.top_down_layers == 0 or self.top_down_layers >= self.latent_layers,
              f"--top-down-layers ({self.top_down_layers}) must be 0 (= --latent-layers) or at least "
              f"--latent-layers ({self.latent_layers})")
        check((self.top_down_layers or self.latent_layers) >= self.downsamplings,
              f"--latent-layers ({self.latent_layers}, or --top-down-layers when given) must be >= --downsamplings "
              f"({self.downsamplings}): every latent resolution gets at least one top-down layer")
        side = min(info.shape[1:])
        check(side / 2 ** self.downsamplings >= 2,
              f"--downsamplings {self.downsamplings} would shrink {side}x{side} images below 2x2")
        for name in ("latent_channels", "width", "mixture_components", "encoder_blocks", "blocks_per_layer"):
            check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        check(self.free_bits >= 0, f"--free-bits must be >= 0, got {self.free_bits}")
        check(not (self.free_bits > 0 and self.objective == "iwae" and self.importance_samples > 1),
              "--free-bits shapes the per-layer KL of the ELBO; with --objective iwae and k > 1 the loss is "
              "not a sum of per-layer KLs. Use --objective vae, -k 1, or --free-bits 0.")
        check(0 < self.sample_temperature <= 1, f"--sample-temperature must be in (0, 1], got {self.sample_temperature}")


# ----------------------------------------------------------------------------- model
def layer_resolutions(latent_layers: int, downsamplings: int) -> list[int]:
    """Resolution index d (1..D: the image side halved d times) of every layer, top (coarsest) first.

    Layers are spread evenly over the D resolutions; the coarser ones take the remainder.
    E.g. L = 6, D = 3: [3, 3, 2, 2, 1, 1] -> 4x4, 4x4, 7x7, 7x7, 14x14, 14x14 for 28x28 images.
    """
    per_resolution = [latent_layers // downsamplings + (1 if i < latent_layers % downsamplings else 0)
                      for i in range(downsamplings)]  # coarsest first
    return [downsamplings - i for i, n in enumerate(per_resolution) for _ in range(n)]


class TopDownLayer(nn.Module):
    """One stochastic layer of the top-down pass, at one resolution r x r.

    Input: the top-down state h [N, w, r, r] (N = k*B rows, sample-major) and, unless sampling from
    the prior, the bottom-up features a [B, w, r, r] of the B images. Output: the new state and the
    layer's prior, posterior (None when sampling) and sample z [N, c, r, r].
    """

    def __init__(self, width: int, latent_channels: int, blocks: int, out_scale: float):
        super().__init__()
        self.latent_channels = latent_channels
        c = latent_channels
        # prior head: mean and log-scale of p(z_l | z_<l) and an update of the state, from h
        self.prior_net = nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                       nn.Conv2d(width, 2 * c + width, 1))
        # posterior head: conv(h) + conv(a) (the latter once per image), then the correction of the prior
        self.posterior_from_state = nn.Conv2d(width, width, 3, padding=1)
        self.posterior_from_data = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.posterior_out = nn.Sequential(nn.SiLU(), nn.Conv2d(width, 2 * c, 1))
        self.z_to_state = nn.Conv2d(c, width, 1)
        self.blocks = nn.Sequential(*[ResidualBlock(width, out_scale=out_scale) for _ in range(blocks)])
        with torch.no_grad():
            last = self.prior_net[-1]
            last.weight[:2 * c].mul_(0.1)  # prior starts near N(0, 1)
            last.weight[2 * c:].mul_(out_scale)  # residual updates of the state start small
            self.posterior_out[-1].weight.zero_()  # q = p at initialisation: no KL to pay at the start
            self.posterior_out[-1].bias.zero_()
            self.z_to_state.weight.mul_(out_scale)

    def forward(self, h, k: int, features=None, temperature: float = 1.0):
        c = self.latent_channels
        if torch.is_grad_enabled():  # training: each head its own SiLU, so gradients round as they always have
            prior_out, activated = self.prior_net(h), None
        else:  # evaluation: silu(h) feeds both heads, computed once (prior_net[0] is that SiLU): the same values
            activated = nn.functional.silu(h)
            prior_out = self.prior_net[1:](activated)
        prior_mean, prior_log_scale, state_update = prior_out.split([c, c, h.shape[1]], dim=1)
        prior_log_scale = soft_clamp(prior_log_scale.float(), LOG_SCALE_BOUND)
        prior = diagonal_gaussian(prior_mean, prior_log_scale, event_dims=3)  # batch [N], event [c, r, r]
        if features is None:  # sampling from the (tempered) prior
            posterior = None
            z = prior.base_dist.loc + temperature * prior.base_dist.scale * torch.randn_like(prior.base_dist.loc)
        else:
            # [k, B, w, r, r] + [B, w, r, r]: the image's features broadcast over its k samples
            activated = nn.functional.silu(h) if activated is None else activated
            hidden = unmerge_samples(self.posterior_from_state(activated), k) \
                + self.posterior_from_data(nn.functional.silu(features))
            delta_mean, delta_log_scale = self.posterior_out(merge_samples(hidden)).float().split([c, c], dim=1)
            posterior = diagonal_gaussian(prior.base_dist.loc + delta_mean,
                                          prior_log_scale + soft_clamp(delta_log_scale, LOG_SCALE_BOUND), event_dims=3)
            z = posterior.rsample()  # [N, c, r, r], float32
        h = self.blocks(h + state_update + self.z_to_state(z))
        return h, prior, posterior, z


class DeterministicLayer(nn.Module):
    """A top-down layer without a latent (--top-down-layers > --latent-layers): the state update of a TopDownLayer
    with no z, so a model with fewer stochastic layers keeps the same network. Same call and outputs, with
    prior, posterior and z None."""

    def __init__(self, width: int, blocks: int, out_scale: float):
        super().__init__()
        self.state_net = nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                       nn.Conv2d(width, width, 1))
        self.blocks = nn.Sequential(*[ResidualBlock(width, out_scale=out_scale) for _ in range(blocks)])
        with torch.no_grad():
            self.state_net[-1].weight.mul_(out_scale)  # residual updates of the state start small

    def forward(self, h, k: int, features=None, temperature: float = 1.0):
        return self.blocks(h + self.state_net(h)), None, None, None


class HierarchicalVAE(nn.Module):
    channels_last = True  # NHWC convs: faster on GPUs (tensor cores) and, for few channels, on CPUs too

    def __init__(self, cfg: Config, info):
        super().__init__()
        self.image_shape = info.shape  # (C, H, W)
        self.likelihood_name = cfg.likelihood or default_likelihood(cfg.dataset)
        self.mixture_components = cfg.mixture_components
        self.rgb_coupling = cfg.rgb_coupling
        self.min_log_scale = cfg.min_log_scale
        self.analytic_kl_in_training = cfg.analytic_kl and (cfg.importance_samples == 1 or cfg.objective == "vae")
        self.sample_temperature = cfg.sample_temperature
        channels, height, width_px = info.shape
        w = cfg.width
        # resolution d = 0 (the image), 1, ..., D: sides halved (rounded up) d times
        self.resolutions = [(height, width_px)]
        for _ in range(cfg.downsamplings):
            self.resolutions.append(tuple(math.ceil(s / 2) for s in self.resolutions[-1]))
        num_top_down = cfg.top_down_layers or cfg.latent_layers
        self.layer_resolution = layer_resolutions(num_top_down, cfg.downsamplings)  # every top-down layer's
        self.latent_resolution = self.layer_resolution[:cfg.latent_layers]  # the stochastic ones': the first L
        n_blocks = 1 + cfg.downsamplings * cfg.encoder_blocks + num_top_down * (1 + cfg.blocks_per_layer)
        out_scale = 1.0 / math.sqrt(n_blocks)  # keeps the residual streams' variance bounded at init
        # bottom-up
        self.stem = nn.Sequential(nn.Conv2d(channels, w, 3, padding=1), ResidualBlock(w, out_scale=out_scale))
        self.encoder_stages = nn.ModuleList([
            nn.Sequential(*[ResidualBlock(w, out_scale=out_scale) for _ in range(cfg.encoder_blocks)])
            for _ in range(cfg.downsamplings)])
        # top-down
        self.top_state = nn.Parameter(torch.zeros(1, w, *self.resolutions[self.layer_resolution[0]]))
        self.layers = nn.ModuleList([TopDownLayer(w, cfg.latent_channels, cfg.blocks_per_layer, out_scale)
                                     for _ in range(cfg.latent_layers)]
                                    + [DeterministicLayer(w, cfg.blocks_per_layer, out_scale)
                                       for _ in range(num_top_down - cfg.latent_layers)])
        if self.likelihood_name == "bernoulli":
            out_channels = channels  # one logit per pixel
        else:
            out_channels = num_mixture_params(channels, cfg.mixture_components, cfg.rgb_coupling)
        self.head = nn.Sequential(nn.SiLU(), nn.Conv2d(w, w // 2 or 1, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(w // 2 or 1, out_channels, 1))
        self.to(memory_format=torch.channels_last)  # on every device (as runtime.prepare_model does)

    # --- the two passes
    def encode(self, x) -> list[torch.Tensor]:
        """Bottom-up, once per image: x [B, C, H, W] -> features [B, w, *resolution d] for d = 1..D."""
        x = x.contiguous(memory_format=torch.channels_last)  # [B, C, H, W] stored as NHWC, like the weights
        h = self.stem(x * 2.0 - 1.0)  # pixels centred on 0
        features = []
        for stage in self.encoder_stages:
            h = stage(downsample(h))
            features.append(h)
        return features

    def top_down(self, k: int, batch: int, features=None, temperature: float = 1.0):
        """Top-down on k*batch rows -> (final state [k*batch, w, H/2, W/2], [(prior, posterior, z)] per stochastic
        layer, top first). features None: every z_l ~ p(z_l | z_<l) at `temperature`, else z_l ~ q."""
        h = self.top_state.expand(k * batch, *self.top_state.shape[1:])
        return self.top_down_layers(h, range(len(self.layers)), k, features, [temperature] * len(self.layers))

    def top_down_layers(self, h, indices, k: int, features, temperatures: list[float]):
        """Layers `indices` (in order) of the top-down pass from state h; temperature 0 puts a prior layer at
        its mean (z = mu_p + 0 * sigma_p * eps)."""
        per_layer = []
        for i in indices:
            d = self.layer_resolution[i]
            if tuple(h.shape[-2:]) != self.resolutions[d]:
                h = upsample_to(h, self.resolutions[d])
            h, prior, posterior, z = self.layers[i](h, k, None if features is None else features[d - 1],
                                                    temperatures[i])
            if prior is not None:  # (a deterministic layer has none)
                per_layer.append((prior, posterior, z))
        return h, per_layer

    def pixel_distribution(self, h, k: int):
        """p(x|z) from the final state [k*B, w, r, r] -> distribution with batch [k, B], event [C, H, W]."""
        if torch.is_grad_enabled():  # training: the graph as it always was, so gradients round as before
            raw = self.head(upsample_to(h, self.resolutions[0]))
        else:  # evaluation: the head's first SiLU before the nearest upsampling (a copy): same values, 1/4 of the work
            raw = self.head[1:](upsample_to(self.head[0](h), self.resolutions[0]))
        raw = unmerge_samples(raw, k)  # [k*B, P, H, W] -> [k, B, P, H, W]
        if self.likelihood_name == "bernoulli":
            return bernoulli_likelihood(raw)
        return mixture_from_decoder_output(raw, self.image_shape[0], self.mixture_components, self.min_log_scale,
                                           self.rgb_coupling)

    # --- the model contract of training.py
    def forward(self, x, k: int, analytic_kl: bool | None = None):
        """x [B, C, H, W] -> dict of [k, B]: log_px_z, log_pz, log_qz; and kl_per_layer [L, B] (mean over k).

        analytic_kl None: analytic in training when the objective is an ELBO (see the module docstring);
        then log_pz = -sum_l KL_l and log_qz = 0. Evaluation always uses the sampled log-densities.
        """
        if analytic_kl is None:
            analytic_kl = self.training and self.analytic_kl_in_training
        features = self.encode(x)
        h, per_layer = self.top_down(k, x.shape[0], features)
        log_px_z = self.pixel_distribution(h, k).log_prob(x)  # [k, B]
        kl_terms, log_pz, log_qz = [], 0.0, 0.0
        for prior, posterior, z in per_layer:
            if analytic_kl:
                kl_terms.append(unmerge_samples(kl_independent_normals(posterior, prior), k))  # [k, B]
            else:
                log_p = unmerge_samples(prior.log_prob(z), k)
                log_q = unmerge_samples(posterior.log_prob(z), k)
                log_pz, log_qz = log_pz + log_p, log_qz + log_q
                kl_terms.append(log_q - log_p)  # single-sample KL estimate, [k, B]
        kl_per_layer = torch.stack(kl_terms)  # [L, k, B]
        if analytic_kl:
            log_pz, log_qz = -kl_per_layer.sum(0), torch.zeros_like(log_px_z)
        return {"log_px_z": log_px_z, "log_pz": log_pz, "log_qz": log_qz, "kl_per_layer": kl_per_layer.mean(1)}

    def _pixel_mean(self, px):
        return px.mean[0].clamp(0, 1)  # [1, B, C, H, W] -> [B, C, H, W]

    @torch.no_grad()
    def reconstruct(self, x):
        """Means of p(x|z) at one z ~ q(z|x) (all layers)."""
        h, _ = self.top_down(1, x.shape[0], self.encode(x))
        return self._pixel_mean(self.pixel_distribution(h, 1))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0):
        """Prior samples, every layer at `temperature` times its prior scale: for 8-bit images real draws
        x ~ p(x|z) on the 8-bit grid, as model02/03 show theirs (the mixture's mean would hide its pixel noise and
        what the RGB coupling does to it); for binary images the Bernoulli means, as model01 shows them."""
        h, _ = self.top_down(1, n, None, temperature)
        px = self.pixel_distribution(h, 1)
        if self.likelihood_name == "bernoulli":
            return self._pixel_mean(px)
        return px.sample()[0]  # batch [1, n] -> [n, C, H, W]

    @torch.no_grad()
    def layer_samples(self, columns: int = 8) -> torch.Tensor:
        """What each layer encodes (as in LVAE's and ladder-vae-pytorch's figure): one draw of the whole prior
        chain z_1..z_L; row l keeps z_1..z_(l-1) of that draw, resamples z_l from p(z_l | z_<l) in every
        column, and puts the layers below at their prior means. -> means of p(x|z) [L * columns, C, H, W],
        row 1 (the top layer) first: what varies along a row is what layer l decides."""
        num_layers, num_latent = len(self.layers), len(self.latent_resolution)
        h = self.top_state.expand(1, *self.top_state.shape[1:])
        states = []  # the chain's state before each stochastic layer, [1, w, r, r]
        for i in range(num_latent):
            states.append(h)
            h, _ = self.top_down_layers(h, [i], 1, None, [1.0] * num_layers)
        rows = []
        for i, state in enumerate(states):
            temperatures = [0.0] * num_layers
            temperatures[i] = 1.0
            h, _ = self.top_down_layers(state.expand(columns, *state.shape[1:]), range(i, num_layers), 1, None,
                                        temperatures)
            rows.append(self._pixel_mean(self.pixel_distribution(h, 1)))
        return torch.cat(rows)

    @torch.no_grad()
    def extra_figure_grids(self, x) -> dict:
        """Extra figures for evaluation.save_figures: prior samples at a lower temperature, and what each
        layer encodes (a row per layer, see layer_samples)."""
        return {f"samples-t{self.sample_temperature:g}": self.sample(x.shape[0], self.sample_temperature),
                "layers": self.layer_samples()}


# ----------------------------------------------------------------------------- per-layer statistics
@torch.no_grad()
def latent_statistics(model: HierarchicalVAE, split: data_lib.Split, cfg: Config) -> dict:
    """Per stochastic layer over the images of `split`, for result.json (seeded, RNG-neutral):

    kl_nats       mean KL(q(z_l | x, z_<l) || p(z_l | z_<l)), analytic given draws of the layers above
    active_units  units u with Var_x(E_q[z_l,u | x]) > evaluation.ACTIVE_UNIT_THRESHOLD (Burda et al.'s count)
    In a hierarchy E_q[z_l | x] averages the posterior mean over the layers above: it is estimated
    from S = ACTIVE_UNIT_SAMPLES draws, and the variance over images of that S-draw average is
    debiased by subtracting the mean within-image variance / S (else the draws' own noise would
    count as activity, e.g. in a layer whose q equals its prior).
    """
    was_training = model.training
    model.eval()
    device = split.images.device
    n, s = len(split), ACTIVE_UNIT_SAMPLES
    images_per_pass = max(1, (cfg.eval_chunk or 16384) // s)
    num_layers = len(model.latent_resolution)
    kl_sum = [0.0] * num_layers
    mean_sum, mean_sq_sum, within_sum = [0.0] * num_layers, [0.0] * num_layers, [0.0] * num_layers  # per unit
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 2)
        for start in range(0, n, images_per_pass):
            x = split.to_float(split.images[start:start + images_per_pass])
            _, per_layer = model.top_down(s, x.shape[0], model.encode(x))
            for i, (prior, posterior, _) in enumerate(per_layer):
                kl_sum[i] += unmerge_samples(kl_independent_normals(posterior, prior), s).mean(0).sum().item()
                draws = unmerge_samples(posterior.mean, s).flatten(2).double()  # [S, B, units]
                mean = draws.mean(0)  # [B, units]: E_q[z_l | x] estimated from S draws
                mean_sum[i] = mean_sum[i] + mean.sum(0)
                mean_sq_sum[i] = mean_sq_sum[i] + (mean * mean).sum(0)
                within_sum[i] = within_sum[i] + draws.var(0).sum(0)  # unbiased over the S draws
    model.train(was_training)
    stats = []
    for i, d in enumerate(model.latent_resolution):
        variance = mean_sq_sum[i] / n - (mean_sum[i] / n) ** 2 - within_sum[i] / n / s  # [units]
        r = model.resolutions[d]
        stats.append({"layer": i + 1, "resolution": f"{r[0]}x{r[1]}", "units": int(variance.numel()),
                      "kl_nats": kl_sum[i] / n, "active_units": evaluation.count_active_units(variance)})
    return evaluation.latent_stats_result(stats, n, latent_stats_samples=s)


# ----------------------------------------------------------------------------- entry point
def quick_overrides(cfg: Config) -> dict:
    """--quick: a real but tiny run, about a minute on 2 CPU cores (a narrow model, few steps)."""
    quick = {**config.quick_overrides(cfg), "max_steps": 200, "batch_size": 32, "width": 16, "latent_channels": 4,
             "encoder_blocks": 1, "kl_warmup_steps": 100, "warmup_steps": 20, "ema_decay": 0.98,
             "val_every": 200, "n_test": 200, "eval_samples": 50, "eval_chunk": 1024, "checkpoint_every": 200}
    if data_lib.dataset_info(cfg.dataset, cfg.image_size, cfg.grey).shape[0] > 1:
        # RGB: the mixture's K (1 + 2C + C(C-1)/2) = 100 output channels per pixel cost more than the whole network
        # at this width, so half the steps and a fifth of the test bound keep it near a minute
        quick.update(max_steps=100, val_every=100, checkpoint_every=100, n_test=100, eval_samples=20)
    return quick


def cpu_eval_chunk(cfg: Config) -> int:
    """Latents per evaluation pass on a CPU (when --eval-chunk is 0), the fastest measured on 1 thread: the more
    p(x|z) parameters per pixel, the smaller the pass that keeps them in the caches. 128 for the Bernoulli's one
    logit; 64 for one discretized logistic per channel (7 per RGB pixel; level with 128, ahead of 32); 32 for the
    mixture of K=10 (70 or 100 per pixel; faster than 128, level with 64). Measured on 32x32 RGB:
    results/bench_cpu_eval_model04_cifar*.json, the bench-chunks table of docs/speed.md."""
    if (cfg.likelihood or default_likelihood(cfg.dataset)) == "bernoulli":
        return 128
    return 64 if cfg.mixture_components == 1 else 32


def run_suffix(cfg: Config) -> str:
    """_L6 for the defaults; the width, the mixture's K and a missing RGB coupling are named when they differ from
    them, so the rows of an ablation (and a GPU-sized run beside a CPU-sized one) never share a name."""
    likelihood = cfg.likelihood or default_likelihood(cfg.dataset)
    suffix = f"_L{cfg.latent_layers}" + (f"of{cfg.top_down_layers}" if cfg.top_down_layers > cfg.latent_layers else "")
    if cfg.width != Config.width:
        suffix += f"_w{cfg.width}"
    if likelihood == "logistic-mixture" and cfg.mixture_components != Config.mixture_components:
        suffix += f"_K{cfg.mixture_components}"
    if likelihood == "logistic-mixture" and not cfg.rgb_coupling:
        suffix += "_nocoupling"
    return suffix


RUNG = training.Rung(name="model04", config_class=Config, build_model=HierarchicalVAE,
                     likelihood=lambda cfg, info: cfg.likelihood or default_likelihood(cfg.dataset),
                     run_suffix=run_suffix, latent_layers=lambda cfg: cfg.latent_layers,
                     quick=quick_overrides, extra_metrics=latent_statistics,
                     # latents per evaluation pass: on CUDA 3 images x 5000 samples (2^18 would need tens of GB at
                     # width 64); on CPU see cpu_eval_chunk
                     cuda_eval_chunk=1 << 14, cpu_eval_chunk=cpu_eval_chunk)


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_common_args(parser, d)
    # (d resolved its default for binarized MNIST; the data set of the command line decides)
    parser.set_defaults(skip_threshold=None)
    a = parser.add_argument
    a("--likelihood", default=None, choices=LIKELIHOODS,
      help="p(x|z): bernoulli (default for binarized sets) or logistic-mixture (default for 8-bit sets)")
    a("--mixture-components", type=int, default=d.mixture_components,
      help=f"components K of the logistic mixture (default {d.mixture_components})")
    a("--no-rgb-coupling", dest="rgb_coupling", action="store_false",
      help="mixture: channels independent given the component (no autoregression over R, G, B within a pixel)")
    a("--min-log-scale", type=float, default=d.min_log_scale,
      help=f"floor of the mixture's log-scales in pixel units (default {d.min_log_scale})")
    a("--latent-layers", type=int, default=d.latent_layers,
      help=f"stochastic layers L, spread over the latent resolutions (default {d.latent_layers})")
    a("--top-down-layers", type=int, default=d.top_down_layers,
      help="top-down layers in all (default 0: as many as --latent-layers); more make the finer ones deterministic, "
           "e.g. --latent-layers 1 --top-down-layers 6: the default network with one stochastic layer")
    a("--downsamplings", type=int, default=d.downsamplings,
      help=f"latent resolutions H/2 .. H/2^D (default {d.downsamplings}: 14, 7, 4 for 28x28)")
    a("--latent-channels", type=int, default=d.latent_channels,
      help=f"latent units per position in every layer (default {d.latent_channels})")
    a("--width", type=int, default=d.width, help=f"channels of the deterministic paths (default {d.width})")
    a("--encoder-blocks", type=int, default=d.encoder_blocks,
      help=f"residual blocks per resolution, bottom-up (default {d.encoder_blocks})")
    a("--blocks-per-layer", type=int, default=d.blocks_per_layer,
      help=f"residual blocks after each stochastic layer, top-down (default {d.blocks_per_layer})")
    a("--no-analytic-kl", dest="analytic_kl", action="store_false",
      help="ELBO training with sampled log p(z) - log q(z|x) instead of the analytic KL per layer")
    a("--free-bits", type=float, default=d.free_bits,
      help="nats per layer of batch-mean KL that cost nothing (0: off; ELBO objectives only)")
    a("--sample-temperature", type=float, default=d.sample_temperature,
      help=f"prior temperature of the extra sample figure (default {d.sample_temperature})")
    return parser


if __name__ == "__main__":
    training.run_script(RUNG, build_parser())
