"""Merge/unmerge of importance samples, and model01's forward pass against a per-sample loop."""
import pytest
import torch

import data as data_lib
from distributions import bernoulli_likelihood, diagonal_gaussian
import layers
from layers import merge_samples, unmerge_samples
from model01 import IWAE, Config


def test_merge_unmerge_round_trip_and_layout():
    x = torch.randn(4, 3, 2, 5)  # [k, B, ...]
    merged = merge_samples(x)
    assert merged.shape == (12, 2, 5)
    assert torch.equal(unmerge_samples(merged, 4), x)
    # sample-major: rows i*B .. (i+1)*B-1 hold sample i of every image
    assert torch.equal(merged[3:6], x[1])
    with pytest.raises(ValueError):
        unmerge_samples(merged, 5)
    with pytest.raises(ValueError):
        merge_samples(torch.randn(3))


def _model():
    torch.manual_seed(0)
    return IWAE(Config(hidden=16, latent_dim=5), data_lib.DATASETS["binarized-mnist"])


def test_merged_importance_samples_equal_a_loop_over_samples():
    model = _model()
    x = torch.bernoulli(torch.rand(3, 1, 28, 28))
    k = 4
    torch.manual_seed(7)
    out = model(x, k)
    # the same computation, one importance sample at a time
    torch.manual_seed(7)
    q = diagonal_gaussian(*model.posterior(model.encoder(x)))
    z = q.rsample((k,))  # same draws as inside forward
    looped = torch.stack([bernoulli_likelihood(model.decoder(z[i]).reshape(3, 1, 28, 28)).log_prob(x)
                          for i in range(k)])
    torch.testing.assert_close(out["log_px_z"], looped, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["log_qz"], q.log_prob(z))
    assert out["log_px_z"].shape == out["log_pz"].shape == out["log_qz"].shape == (k, 3)


def test_encoder_runs_once_per_image_and_decoder_once_on_all_samples():
    model = _model()
    calls = {"encoder": [], "decoder": []}
    model.encoder.register_forward_hook(lambda m, i, o: calls["encoder"].append(i[0].shape[0]))
    model.decoder.register_forward_hook(lambda m, i, o: calls["decoder"].append(i[0].shape[0]))
    model(torch.bernoulli(torch.rand(6, 1, 28, 28)), 5)
    assert calls == {"encoder": [6], "decoder": [30]}


def test_conv_decoder_goes_channels_last_before_upsampling_with_the_same_values():
    """In a channels-last model the decoder converts its small first map to NHWC before the 2x upsampling
    (one copy of a 16x smaller tensor than the first conv would make); the values must not change at all,
    forward and backward, and the plain NCHW module must keep its layout."""
    torch.manual_seed(0)
    decoder = layers.ConvDecoder(latent_dim=8, image_shape=(1, 28, 28), out_channels=2, width=8).double()
    z = torch.randn(6, 8, dtype=torch.float64)
    reference = decoder.net(z)  # the Sequential as written: the first conv converts the upsampled map itself
    assert decoder(z).is_contiguous() and torch.equal(decoder(z), reference)
    decoder = decoder.to(memory_format=torch.channels_last)
    z_cl = z.clone().requires_grad_(True)
    z_ref = z.clone().requires_grad_(True)
    out, ref = decoder(z_cl), decoder.net(z_ref)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, ref)
    # and the only layout copy is of the small map: none of the upsampled [6, 32, 14, 14] one
    from torch.profiler import profile
    with torch.no_grad(), profile(record_shapes=True) as prof:
        decoder(z)
    copied = [e.input_shapes[0] for e in prof.events() if e.name == "aten::copy_"]
    assert [6, 32, 7, 7] in copied and [6, 32, 14, 14] not in copied, copied
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.allclose(z_cl.grad, z_ref.grad, rtol=0, atol=1e-12)
