"""distributions.FastBernoulli: the same log-mass and gradient as the exact formula, for every logit."""
import pytest
import torch
from torch.distributions import Bernoulli

from distributions import FastBernoulli, bernoulli_likelihood


def exact_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """x l - softplus(l) = -softplus(-t), t = (2x - 1) l, in float64 with softplus(u) = max(u, 0) + log1p(exp(-|u|)):
    no overflow and no cancellation (x l - softplus(l) itself cancels to 0 for x = 1 and large l)."""
    t = logits.double() * (2 * value.double() - 1)
    return -((-t).clamp_min(0) + torch.log1p(torch.exp(-t.abs())))


LOGITS = torch.cat([torch.linspace(-120.0, 120.0, 48001),
                    torch.tensor([0.0, -1e-8, 1e-8, 16.6, -16.6, 79.9, -79.9, 80.1, -80.1, 88.0, -88.0,
                                  104.0, -104.0, 1e4, -1e4, 3e38, -3e38])])


@pytest.mark.parametrize("x", [0.0, 1.0])
def test_log_prob_matches_the_exact_formula_in_float32(x):
    value = torch.full_like(LOGITS, x)
    got = FastBernoulli(logits=LOGITS).log_prob(value).double()
    ref = exact_log_prob(LOGITS, value)
    # absolute error at float32 rounding of values near 0 (what a sum over pixels sees); relative where large
    err = (got - ref).abs()
    assert (err <= 1e-7 + 2e-7 * ref.abs()).all(), (err.max(), LOGITS[err.argmax()])
    assert (got <= 0).all()


@pytest.mark.parametrize("x", [0.0, 1.0])
def test_log_prob_is_exact_in_float64(x):
    logits = LOGITS.double()
    value = torch.full_like(logits, x)
    got = FastBernoulli(logits=logits).log_prob(value)
    ref = exact_log_prob(logits, value)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-15)


def test_gradient_matches_x_minus_sigmoid_and_gradcheck():
    logits = LOGITS.clone().requires_grad_()
    value = (torch.arange(len(LOGITS)) % 2).float()
    FastBernoulli(logits=logits).log_prob(value).sum().backward()
    expected = value.double() - torch.sigmoid(LOGITS.double())
    assert torch.allclose(logits.grad.double(), expected, atol=1e-7)
    small = (torch.randn(3, 7, dtype=torch.float64) * 5).requires_grad_()
    x = (torch.rand(3, 7) < 0.5).double()
    assert torch.autograd.gradcheck(lambda l: FastBernoulli(logits=l).log_prob(x), (small,))


def test_agrees_with_torch_bernoulli_per_image():
    torch.manual_seed(0)
    logits = torch.randn(5, 64, 1, 28, 28) * 6  # [k, B, C, H, W], as model01's decoder gives
    x = (torch.rand(64, 1, 28, 28) < 0.2).float()
    ours = bernoulli_likelihood(logits).log_prob(x)  # [5, 64]
    theirs = torch.distributions.Independent(Bernoulli(logits=logits.double()), 3).log_prob(x.double())
    assert ours.shape == (5, 64)
    assert torch.allclose(ours.double(), theirs, rtol=1e-6, atol=1e-4)


def test_bf16_logits_are_scored_in_float32():
    logits = torch.randn(4, 1, 28, 28).bfloat16()
    x = (torch.rand(4, 1, 28, 28) < 0.5).float()
    ll = bernoulli_likelihood(logits).log_prob(x)
    assert ll.dtype == torch.float32
    ref = exact_log_prob(logits.float(), x).sum((-1, -2, -3))
    assert torch.allclose(ll.double(), ref, atol=1e-4)


def test_non_binary_values_are_rejected_when_validating():
    with pytest.raises(ValueError):
        FastBernoulli(logits=torch.zeros(3), validate_args=True).log_prob(torch.tensor([0.0, 0.5, 1.0]))


def test_impossible_and_non_finite_logits():
    # an infinitely sure logit gives log 1 = 0 for the right value and -inf for the wrong one; NaN stays NaN
    logits = torch.tensor([float("inf"), float("inf"), float("-inf"), float("nan")])
    value = torch.tensor([1.0, 0.0, 0.0, 1.0])
    got = FastBernoulli(logits=logits, validate_args=False).log_prob(value)  # validation rejects inf/NaN logits
    assert got[0] == 0 and got[1] == float("-inf") and got[2] == 0 and torch.isnan(got[3])
