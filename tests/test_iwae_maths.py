"""The importance-weighted bound and the latent-variable maths against closed forms.

A linear-Gaussian model  z ~ N(0, I_d),  x | z ~ N(W z + b, s^2 I_D)  has an exact marginal
x ~ N(b, W W^T + s^2 I), so log p(x) is known and the IWAE bound L_k can be checked against it:
E[L_k] <= log p(x), E[L_k] increases with k, L_k -> log p(x), and with the exact posterior as q
every importance weight equals p(x), so L_k = log p(x) for every k and every draw.
"""
import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

import data as data_lib
import evaluation
from distributions import (bernoulli_likelihood, diagonal_gaussian, kl_independent_normals, log_mean_exp,
                           standard_normal)



@pytest.fixture(autouse=True)
def _float64():
    """Exactness tests run in float64; the default dtype is restored for other test files."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


class LinearGaussian(nn.Module):
    """The training.py model contract for a linear-Gaussian model with a chosen linear-Gaussian q."""

    def __init__(self, d=2, D=3, seed=0, exact_posterior=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(D, d, generator=g)
        self.b = torch.randn(D, generator=g) * 0.1
        self.noise_std = 0.7
        self.d, self.D = d, D
        # exact posterior p(z|x) = N(A (x-b), S), S = (I + W^T W / s^2)^-1, A = S W^T / s^2
        self.post_cov = torch.linalg.inv(torch.eye(d) + self.W.T @ self.W / self.noise_std ** 2)
        self.A = self.post_cov @ self.W.T / self.noise_std ** 2
        if not exact_posterior:  # a deliberately imperfect q: shifted mean, over-dispersed (finite-variance weights)
            self.A = self.A + 0.3 * torch.randn(d, D, generator=g)
            self.post_cov = 2.0 * self.post_cov

    def log_marginal(self, x):  # x [B, D] -> [B]
        cov = self.W @ self.W.T + self.noise_std ** 2 * torch.eye(self.D)
        return MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def posterior(self, x):
        mean = (x - self.b) @ self.A.T
        return MultivariateNormal(mean, covariance_matrix=self.post_cov)

    def forward(self, x, k):
        x = x.reshape(x.shape[0], -1)  # [B, D]
        q = self.posterior(x)
        z = q.rsample((k,))  # [k, B, d]
        px = Independent(Normal(z @ self.W.T + self.b, self.noise_std), 1)
        return {"log_px_z": px.log_prob(x), "log_pz": standard_normal((self.d,)).log_prob(z), "log_qz": q.log_prob(z)}


def _bound(model, x, k, objective="iwae"):
    return evaluation.bound_per_image(evaluation.log_weights(model(x, k)), objective)


def _bound_draws(model, x, k, reps):
    """`reps` independent draws of L_k per image from one forward pass: [reps, B]."""
    log_w = evaluation.log_weights(model(x, k * reps)).reshape(reps, k, x.shape[0])
    return log_mean_exp(log_w, dim=1)


def test_exact_posterior_makes_every_bound_exact():
    model = LinearGaussian(exact_posterior=True)
    x = torch.randn(16, 3) * 2
    log_px = model.log_marginal(x)
    for k in (1, 7):
        torch.testing.assert_close(_bound(model, x, k), log_px, rtol=0, atol=1e-9)


def test_iwae_bound_is_below_log_px_increases_with_k_and_converges():
    torch.manual_seed(0)
    model = LinearGaussian(seed=1)
    x = torch.randn(8, 3) * 1.5
    log_px = model.log_marginal(x)
    reps = 2000
    means = {}
    for k in (1, 5, 50):
        draws = _bound_draws(model, x, k, reps)  # [reps, B]
        mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(reps)
        assert torch.all(mean <= log_px + 4 * stderr + 1e-9), (k, mean, log_px)
        means[k] = mean
    gap = {k: (log_px - means[k]).mean().item() for k in means}
    assert gap[1] > gap[5] > gap[50] > -1e-3, gap  # tighter with k, on average
    assert gap[1] > 0.05, gap  # the imperfect q leaves a real gap to close
    final = _bound_draws(model, x, 20000, 5)  # [5, B]
    assert (log_px - final).abs().max() < 0.1 * gap[1], (log_px, final)  # L_k -> log p(x)


def test_k1_iwae_equals_elbo_and_matches_the_closed_form_elbo():
    torch.manual_seed(0)
    model = LinearGaussian(seed=2)
    x = torch.randn(4, 3)
    out = model(x, 1)
    log_w = evaluation.log_weights(out)
    torch.testing.assert_close(evaluation.bound_per_image(log_w, "iwae"), evaluation.bound_per_image(log_w, "vae"))
    # closed form ELBO = E_q[log p(x|z)] - KL(q || p(z)) for the linear-Gaussian model
    q = model.posterior(x)
    m, S = q.mean, q.covariance_matrix  # [B, d], [B, d, d]
    resid = x - m @ model.W.T - model.b
    s2 = model.noise_std ** 2
    expected_loglik = (-0.5 * model.D * math.log(2 * math.pi * s2) - 0.5 * (resid ** 2).sum(-1) / s2
                       - 0.5 * torch.einsum("ij,bjk,ik->b", model.W, S, model.W) / s2)
    prior = MultivariateNormal(torch.zeros(model.d), torch.eye(model.d))
    elbo = expected_loglik - kl_divergence(q, prior)
    draws = _bound_draws(model, x, 1, 20000)
    assert torch.all((draws.mean(0) - elbo).abs() < 4 * draws.std(0) / math.sqrt(20000) + 1e-6)


def test_evaluate_bound_chunks_and_streams_to_the_exact_value():
    """evaluation.evaluate_bound on the exact-posterior model gives log p(x) whatever the chunking."""
    model = LinearGaussian(d=2, D=4, exact_posterior=True).float()
    for name in ("W", "b", "A", "post_cov"):
        setattr(model, name, getattr(model, name).float())
    images = torch.randint(0, 256, (13, 1, 2, 2), dtype=torch.uint8)
    split = data_lib.Split(images, binary=False)
    expected = model.log_marginal(split.to_float(images).reshape(13, -1)).double()
    for chunk in (17, 10_000):  # 17: one image and 17 samples a pass, ragged last chunk
        got = evaluation.evaluate_bound(model, split, num_samples=50, seed=0, chunk=chunk)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_evaluate_bound_is_seeded_and_leaves_the_global_rng_alone():
    model = LinearGaussian(seed=3).float()
    for name in ("W", "b", "A", "post_cov"):
        setattr(model, name, getattr(model, name).float())
    split = data_lib.Split(torch.randint(0, 256, (10, 1, 1, 3), dtype=torch.uint8), binary=False)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = evaluation.evaluate_bound(model, split, 20, seed=5, chunk=30)
    assert torch.equal(torch.get_rng_state(), before)
    b = evaluation.evaluate_bound(model, split, 20, seed=5, chunk=30)
    c = evaluation.evaluate_bound(model, split, 20, seed=6, chunk=30)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- KL


def test_kl_independent_normals_matches_torch_closed_form_and_monte_carlo():
    torch.manual_seed(0)
    q = diagonal_gaussian(torch.randn(5, 4), torch.randn(5, 4) * 0.3)
    p = diagonal_gaussian(torch.randn(5, 4), torch.randn(5, 4) * 0.3)
    kl = kl_independent_normals(q, p)
    torch.testing.assert_close(kl, kl_divergence(q, p))
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    assert torch.allclose(mc, kl, atol=0.03), (mc, kl)


def test_kl_with_different_reinterpreted_batch_dims_sums_the_shared_right_most_dims():
    torch.manual_seed(1)
    mean, log_scale = torch.randn(3, 6), torch.randn(3, 6) * 0.2
    q = diagonal_gaussian(mean, log_scale)  # batch [3], event [6]
    # torch.distributions refuses this pair; ours sums over the larger event
    prior_2d = Independent(Normal(torch.zeros(3, 6), torch.ones(3, 6)), 2)  # batch [], event [3, 6]
    with pytest.raises(NotImplementedError):
        kl_divergence(q, prior_2d)
    elementwise = kl_divergence(Normal(mean, log_scale.exp()), Normal(0.0, 1.0))  # [3, 6]
    torch.testing.assert_close(kl_independent_normals(q, prior_2d), elementwise.sum())
    # a prior with batch [] and event [6] broadcasts against q's batch [3]
    prior = standard_normal((6,))
    torch.testing.assert_close(kl_independent_normals(q, prior), elementwise.sum(-1))
    # closed form for N(m, s^2) against N(0, 1): 0.5 (m^2 + s^2 - 1) - log s
    closed = (0.5 * (mean ** 2 + (2 * log_scale).exp() - 1) - log_scale).sum(-1)
    torch.testing.assert_close(kl_independent_normals(q, prior), closed)


def test_log_mean_exp_and_bernoulli_likelihood():
    log_w = torch.tensor([[-1000.0, 0.0], [-1001.0, math.log(3.0)]])
    expected = torch.tensor([-1000.0 + math.log((1 + math.exp(-1)) / 2), math.log(2.0)])
    torch.testing.assert_close(log_mean_exp(log_w, dim=0), expected)
    logits = torch.randn(2, 1, 2, 2)
    x = torch.bernoulli(torch.sigmoid(logits))
    lik = bernoulli_likelihood(logits)
    assert lik.batch_shape == (2,) and lik.event_shape == (1, 2, 2)
    manual = (x * torch.log(torch.sigmoid(logits)) + (1 - x) * torch.log(1 - torch.sigmoid(logits))).sum((1, 2, 3))
    torch.testing.assert_close(lik.log_prob(x), manual)
