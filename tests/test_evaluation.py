"""evaluation.evaluate_bound: the chunked, streaming L_S equals the one-shot log-mean-exp over all S samples.

An estimator with random samples cannot be compared exactly, so the model here has deterministic
log-weights: sample s of image b gets log w = f(s, x_b), where s counts the samples drawn for the
current batch of images across consecutive forward calls (evaluate_bound draws all S samples of a
batch before it moves to the next batch). Whatever the chunking, L_S must then equal the closed form
log(1/S sum_s exp f(s, x_b)). The log-weights span several hundred nats, far beyond float32's exp
range, and include -inf, so the streaming log-sum-exp must be the stable one.
"""
import math

import pytest
import torch
from torch import nn

import data as data_lib
import evaluation
import runtime

S = 50  # importance samples per image in these tests
N = 8  # test images


def scheduled_log_weights(s: torch.Tensor, image_key: torch.Tensor) -> torch.Tensor:
    """[k] sample indices x [B] image keys -> [k, B] float64 log-weights, some of them -inf."""
    s, key = s.double()[:, None], image_key.double()[None, :]
    log_w = 400.0 * torch.sin(0.37 * s + key) + 30.0 * torch.cos(1.3 * s) - 0.01 * s
    return torch.where(s.remainder(5) == 0, torch.full_like(log_w, -math.inf), log_w)


class ScheduledModel(nn.Module):
    """No randomness: forward(x, k) returns the next k scheduled log-weights of every image in x.

    `max_latents` > 0 raises CUDA's out-of-memory error for passes larger than that (before drawing),
    to exercise evaluate_bound's halving of the chunk."""

    def __init__(self, num_samples: int, max_latents: int = 0):
        super().__init__()
        self.num_samples, self.max_latents = num_samples, max_latents
        self.drawn = 0  # samples drawn for the current batch of images (mod num_samples)
        self.passes = []  # (k, B) of every successful forward

    def forward(self, x, k: int):
        if self.max_latents and k * x.shape[0] > self.max_latents:
            raise torch.cuda.OutOfMemoryError(f"fake CUDA out of memory: {k * x.shape[0]} latents")
        offset = self.drawn % self.num_samples
        assert offset + k <= self.num_samples, "a pass crossed into the next batch of images"
        self.drawn += k
        self.passes.append((k, x.shape[0]))
        log_w = scheduled_log_weights(torch.arange(offset, offset + k), image_key(x)).float()  # [k, B]
        zeros = torch.zeros_like(log_w)
        return {"log_px_z": log_w, "log_pz": zeros, "log_qz": zeros}


def image_key(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1) * 10.0  # [B], distinct for the images below


@pytest.fixture(scope="module")
def split() -> data_lib.Split:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 1, 4, 4), dtype=torch.uint8, generator=generator)
    return data_lib.Split(images, binary=False)


def closed_form(split: data_lib.Split) -> torch.Tensor:
    """log mean_s exp(log w_s) over all S at once, in float64, from the float32 log-weights the model returns."""
    log_w = scheduled_log_weights(torch.arange(S), image_key(split.to_float(split.images))).float().double()
    return torch.logsumexp(log_w, dim=0) - math.log(S)  # [N]


@pytest.mark.parametrize("chunk", [1, 7, S - 1, S, 3 * S + 5, 10 ** 6])
def test_chunked_evaluation_equals_one_shot(split, chunk):
    model = ScheduledModel(S)
    ll = evaluation.evaluate_bound(model, split, S, seed=0, chunk=chunk)
    expected = closed_form(split)
    assert ll.dtype == torch.float64 and ll.shape == (N,)
    assert torch.isfinite(expected).all() and expected.abs().max() > 100  # exp() would overflow float32
    torch.testing.assert_close(ll, expected, rtol=0, atol=2e-3)
    assert sum(k * b for k, b in model.passes) == N * S  # every image got exactly S samples
    assert max(k * b for k, b in model.passes) <= max(chunk, 1)  # no pass beyond the chunk


def test_streaming_log_sum_exp_equals_logsumexp_over_all():
    """The running combination evaluate_bound uses, chunk by chunk, against torch.logsumexp over everything."""
    log_w = scheduled_log_weights(torch.arange(997), torch.tensor([0.0, 1.5, -2.0])).float()  # [997, 3]
    for chunk in (1, 13, 500, 997):
        log_sum = torch.full((3,), -math.inf)
        for part in log_w.split(chunk):
            log_sum = torch.logaddexp(log_sum, torch.logsumexp(part, dim=0))
        torch.testing.assert_close(log_sum, torch.logsumexp(log_w, dim=0), rtol=0, atol=1e-3)


def test_out_of_memory_halves_the_chunk_and_gives_the_same_result(split):
    model = ScheduledModel(S, max_latents=16)
    ll = evaluation.evaluate_bound(model, split, S, seed=0, chunk=1000)
    torch.testing.assert_close(ll, closed_form(split), rtol=0, atol=2e-3)
    assert max(k * b for k, b in model.passes) <= 16
    assert sum(k * b for k, b in model.passes) == N * S  # failed passes drew nothing and were retried


def test_all_minus_inf_weights_give_minus_inf_not_nan():
    class Impossible(nn.Module):
        def forward(self, x, k):
            minus_inf = torch.full((k, x.shape[0]), -math.inf)
            return {"log_px_z": minus_inf, "log_pz": torch.zeros_like(minus_inf), "log_qz": torch.zeros_like(minus_inf)}

    split = data_lib.Split(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), binary=True)
    ll = evaluation.evaluate_bound(Impossible(), split, 10, seed=0, chunk=4)
    assert torch.equal(ll, torch.full((3,), -math.inf, dtype=torch.float64))


def iwae_model():
    import model01

    cfg = model01.Config(hidden=16, latent_dim=4)
    torch.manual_seed(0)
    return model01.IWAE(cfg, data_lib.DATASETS["binarized-mnist"])


def binary_split(n: int) -> data_lib.Split:
    generator = torch.Generator().manual_seed(1)
    return data_lib.Split(torch.randint(0, 2, (n, 1, 28, 28), dtype=torch.uint8, generator=generator), binary=True)


def test_real_model_one_pass_equals_direct_computation_and_is_rng_neutral():
    """With the chunk covering everything, evaluate_bound is exactly log_mean_exp of one seeded forward;
    it leaves the caller's RNG untouched and is reproducible from its seed."""
    model, split = iwae_model(), binary_split(6)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    ll = evaluation.evaluate_bound(model, split, 40, seed=7, chunk=10 ** 6)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training  # the caller's mode is restored
    with torch.no_grad():
        torch.manual_seed(7)
        model.eval()
        direct = evaluation.bound_per_image(evaluation.log_weights(model(split.to_float(split.images), 40)), "iwae")
        model.train()
    torch.testing.assert_close(ll, direct.double(), rtol=0, atol=1e-4)
    assert torch.equal(evaluation.evaluate_bound(model, split, 40, seed=7, chunk=10 ** 6), ll)
    assert not torch.equal(evaluation.evaluate_bound(model, split, 40, seed=8, chunk=10 ** 6), ll)


def test_real_model_chunked_estimate_agrees_statistically():
    """Chunked (37 samples per pass) and one-shot L_S of a small model01 estimate the same number: with
    S = 400 their per-image difference is about 0.2 nats (seeded, so deterministic), while a mis-normalised
    chunk (log 37 instead of log 400) would be off by 2.4 nats. The exact checks are the tests above."""
    model, split = iwae_model(), binary_split(4)
    one_shot = evaluation.evaluate_bound(model, split, 400, seed=0, chunk=10 ** 6)
    chunked = evaluation.evaluate_bound(model, split, 400, seed=1, chunk=37)
    assert (one_shot - chunked).abs().max() < 0.5


def test_cuda_device_turns_tf32_off_so_float32_evaluation_is_float32(monkeypatch):
    """PyTorch runs cuDNN convolutions in TF32 by default; results say eval_precision "float32" and are compared with
    CPU numbers, so choosing a CUDA device must switch TF32 off (checked without a GPU: only the flags are read)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # (torch.backends.cuda.matmul is a property-backed module monkeypatch cannot undo: saved and restored by hand)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        device = runtime.resolve_device("cuda", runtime.DistInfo())
        assert device.type == "cuda"
        assert torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
