"""model01: the IWAE baseline on binarized MNIST (Burda, Grosse & Salakhutdinov, 2015).

Hypothesis: with one stochastic layer and a Bernoulli p(x|z), training on the importance-weighted
bound L_k with k > 1 samples gives a better test log-likelihood than the VAE's ELBO (k-sample
average), because the bound is tighter and the posterior need not cover only one mode.
The number to beat: -85.54 nats with k=5 on dynamically binarized MNIST (L_5000; Burda et al. 2015, Table 1).

Architecture (the paper's 1-stochastic-layer model): encoder 784-200-200 with tanh -> Gaussian
q(z|x) with 50 dims; decoder 50-200-200-784 with tanh -> Bernoulli logits; prior N(0, I).

    python model01.py --importance-samples 5            # full run (default 100 epochs)
    python model01.py --quick --data-dir ../shared/data # about a minute on 2 CPU cores
"""
import argparse
from dataclasses import dataclass

import torch
from torch import nn

import config
import evaluation
import runtime
import training
from distributions import bernoulli_likelihood, diagonal_gaussian, kl_independent_normals, standard_normal
from layers import GaussianHead, merge_samples, mlp, unmerge_samples


# ----------------------------------------------------------------------------- config
BINARY_DATASETS = ["binarized-mnist", "binarized-mnist-static"]  # a Bernoulli p(x|z) models {0,1} pixels


@dataclass
class Config(config.TrainConfig):
    dataset: str = "binarized-mnist"  # dynamic binarization, as in the IWAE paper
    hidden: int = 200  # units in each of the two deterministic layers
    latent_dim: int = 50  # stochastic units
    # the paper used 20: 5x the updates of a schedule in epochs, each cheaper but ~2.5x the time per epoch on one
    # CPU thread (results/bench_cpu_b20.json vs bench_cpu.json); runs at another batch get "_b<batch>" in their name
    batch_size: int = 100
    epochs: int = 100
    # pytorch: nn.Linear's default init. burda: as the paper's code (yburda/iwae) -- Glorot-uniform weights, zero
    # biases, and the Bernoulli output bias at the logit of the training set's mean pixel, so p(x|z) starts at the
    # data's marginal instead of 0.5 everywhere. Runs with burda get "_initburda" in their name.
    init: str = "pytorch"


# ----------------------------------------------------------------------------- model
class IWAE(nn.Module):
    def __init__(self, cfg: Config, info):
        super().__init__()
        if not info.binary:
            raise runtime.UserError(f"model01 has a Bernoulli p(x|z): use a binary data set, not {info.name}")
        self.image_shape = info.shape  # (1, 28, 28)
        d, h = info.num_dims, cfg.hidden
        self.encoder = nn.Sequential(nn.Flatten(), mlp([d, h, h], final_activation=True))
        self.posterior = GaussianHead(h, cfg.latent_dim)
        self.decoder = mlp([cfg.latent_dim, h, h, d])
        self.latent_dim = cfg.latent_dim
        if cfg.init == "burda":
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)  # U(+-sqrt(6 / (fan_in + fan_out))), for tanh units
                    nn.init.zeros_(layer.bias)
        elif cfg.init != "pytorch":
            raise runtime.UserError(f"model01: unknown init {cfg.init!r} (pytorch or burda)")

    def prior(self, device):
        return standard_normal((self.latent_dim,), device=device)

    def likelihood(self, z):
        """p(x|z) for latents [..., L] -> Bernoulli with batch shape [...] and event [1, 28, 28]."""
        logits = self.decoder(z.reshape(-1, self.latent_dim))  # [N, 784]
        return bernoulli_likelihood(logits.reshape(*z.shape[:-1], *self.image_shape))

    def forward(self, x, k: int):
        q = diagonal_gaussian(*self.posterior(self.encoder(x)))  # once per image: batch [B], event [L]
        z = q.rsample((k,))  # [k, B, L]
        logits = self.decoder(merge_samples(z))  # one pass over all k*B latents: [k*B, 784]
        px = bernoulli_likelihood(unmerge_samples(logits, k).reshape(k, x.shape[0], *self.image_shape))
        return {"log_px_z": px.log_prob(x), "log_pz": self.prior(x.device).log_prob(z), "log_qz": q.log_prob(z)}

    @torch.no_grad()
    def reconstruct(self, x):
        """Bernoulli means of p(x|z) at one z ~ q(z|x)."""
        z = diagonal_gaussian(*self.posterior(self.encoder(x))).sample()
        return self.likelihood(z).mean

    @torch.no_grad()
    def sample(self, n: int):
        """Bernoulli means of p(x|z) at z ~ p(z) (the usual way to show binary-data samples)."""
        return self.likelihood(self.prior(next(self.parameters()).device).sample((n,))).mean


@torch.no_grad()
def latent_statistics(model: IWAE, split, cfg: Config) -> dict:
    """Burda et al.'s measure of how much of the latent space a run uses, on the evaluated test images: the
    active units (Var_x E_q[u | x] > evaluation.ACTIVE_UNIT_THRESHOLD; E_q[u | x] is q's mean, no sampling) and the
    mean KL(q(z|x) || p(z)) in nats. Their Table 1 counts more active units for IWAE than for the VAE at equal k."""
    was_training = model.training
    model.eval()
    n, images_per_pass = len(split), 1000
    mean_sum, mean_sq_sum, kl_sum = 0.0, 0.0, 0.0
    # deterministic for a fixed-binarized test split; a dynamically binarized one draws from a seeded generator
    generator = torch.Generator(split.images.device).manual_seed(cfg.seed + 2)
    for start in range(0, n, images_per_pass):
        x = split.to_float(split.images[start:start + images_per_pass], generator)
        mean, log_scale = model.posterior(model.encoder(x))  # [B, L] each
        kl_sum += kl_independent_normals(diagonal_gaussian(mean, log_scale), model.prior(x.device)).sum().item()
        mean = mean.double()
        mean_sum = mean_sum + mean.sum(0)
        mean_sq_sum = mean_sq_sum + (mean * mean).sum(0)
    model.train(was_training)
    variance = mean_sq_sum / n - (mean_sum / n) ** 2  # [L]: over images, of q's mean
    layer = {"layer": 1, "units": model.latent_dim, "kl_nats": kl_sum / n,
             "active_units": evaluation.count_active_units(variance)}
    return evaluation.latent_stats_result([layer], n)


def init_output_bias(model: IWAE, train, cfg: Config):
    """--init burda: p(x|z)'s logits start at logit(mean training pixel), clipped to [0.001, 0.999] as in the
    paper's code, so that the first steps need not learn the background (for MNIST, most logits are about -6.9)."""
    if cfg.init == "burda":
        p = train.mean_image().flatten().clamp(0.001, 0.999).to(model.decoder[-1].bias)  # [784]
        model.decoder[-1].bias.copy_(torch.log(p) - torch.log1p(-p))


# ----------------------------------------------------------------------------- entry point
RUNG = training.Rung(name="model01", config_class=Config, build_model=IWAE,
                     likelihood=lambda cfg, info: "bernoulli",
                     # the batch decides the number of updates of a schedule given in epochs: a run at the paper's
                     # 20 must not publish over the batch-100 row (the default keeps the names already published)
                     run_suffix=lambda cfg: ("" if cfg.batch_size == Config.batch_size else f"_b{cfg.batch_size}")
                     + ("" if cfg.init == Config.init else f"_init{cfg.init}"),
                     init_from_data=init_output_bias, extra_metrics=latent_statistics)


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_common_args(parser, defaults, datasets=BINARY_DATASETS)
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="units per deterministic layer")
    parser.add_argument("--latent-dim", type=int, default=defaults.latent_dim, help="stochastic units")
    parser.add_argument("--init", default=defaults.init, choices=["pytorch", "burda"],
                        help="pytorch: nn.Linear's default; burda: the paper's code (Glorot-uniform weights, zero "
                             "biases, output bias at the logit of the mean training pixel)")
    return parser


if __name__ == "__main__":
    training.run_script(RUNG, build_parser())
