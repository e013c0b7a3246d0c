"""data.py: splits, dynamic binarization statistics, the index batcher, and missing-data errors."""
import math

import numpy as np
import pytest
import torch

import data as data_lib


def test_dynamic_binarization_draws_bernoulli_of_the_intensity():
    intensities = torch.tensor([0, 32, 128, 200, 255], dtype=torch.uint8).repeat(40, 1).reshape(40, 1, 1, 5)
    split = data_lib.Split(intensities, binary=True, dynamic_binarize=True)
    batcher = data_lib.Batcher(split, batch_size=40, seed=0)
    draws = torch.cat([batcher.next() for _ in range(250)])  # 10,000 draws of each pixel value
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    p = intensities[0, 0, 0].double() / 255
    freq = draws.reshape(-1, 5).double().mean(0)
    stderr = torch.sqrt(p * (1 - p) / draws.shape[0]).clamp_min(1e-12)
    assert torch.all((freq - p).abs() <= 5 * stderr + 1e-12), (freq, p)
    assert freq[0] == 0 and freq[-1] == 1  # 0 and 255 are deterministic
    # two draws of the same image differ (re-binarized at every draw)
    a, b = split.to_float(intensities[:1].repeat(2, 1, 1, 1))
    c = split.to_float(intensities[:1])
    assert not (torch.equal(a, b) and torch.equal(a, c[0]))


def test_batcher_epochs_cover_every_image_once_and_resume_exactly():
    images = torch.arange(100, dtype=torch.uint8).reshape(100, 1, 1, 1)
    split = data_lib.Split(images, binary=False)
    batcher = data_lib.Batcher(split, batch_size=10, seed=3)
    epoch = torch.cat([batcher.next() for _ in range(10)]).flatten() * 255
    assert sorted(epoch.round().long().tolist()) == list(range(100))
    batcher.next()
    state = batcher.state_dict()
    expected = [batcher.next() for _ in range(15)]  # crosses an epoch boundary
    resumed = data_lib.Batcher(split, batch_size=10, seed=999)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (resumed.next() for _ in range(15))):
        assert torch.equal(want, got)


def test_rank_slices_of_the_global_batch_concatenate_to_the_single_process_batch():
    images = torch.randint(0, 256, (64, 1, 2, 2), dtype=torch.uint8)
    split = data_lib.Split(images, binary=True, dynamic_binarize=True)
    single = data_lib.Batcher(split, batch_size=16, seed=1)
    ranks = [data_lib.Batcher(split, batch_size=16, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):
        assert torch.equal(single.next(), torch.cat([b.next() for b in ranks]))
    with pytest.raises(ValueError, match="divisible"):
        data_lib.Batcher(split, batch_size=15, seed=1, rank=0, world_size=2)


def test_missing_data_names_the_files_and_the_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_DATA_DIR", str(tmp_path / "from-env"))
    with pytest.raises(data_lib.DataError) as err:
        data_lib.load_data("binarized-mnist-static", tmp_path / "empty")  # --data-dir wins over the env
    message = str(err.value)
    assert "binarized_mnist_train.amat.gz" in message and str(tmp_path / "empty") in message
    assert "from-env" not in message
    assert data_lib.resolve_data_dir(None) == tmp_path / "from-env"
    monkeypatch.delenv("VAE_DATA_DIR")
    assert str(data_lib.resolve_data_dir(None)) == "data"


def test_real_mnist_splits(data_dir):
    mnist = data_lib.load_data("mnist", data_dir)
    assert mnist.train.images.dtype == torch.uint8 and mnist.train.images.shape[1:] == (1, 28, 28)
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (59_000, 1_000, 10_000)
    # the validation images are training images, and no training image is in validation
    train_keys = {bytes(im) for im in mnist.train.images.reshape(len(mnist.train), -1).numpy()}
    val_keys = [bytes(im) for im in mnist.val.images.reshape(1000, -1).numpy()]
    assert sum(k in train_keys for k in val_keys) <= 5  # MNIST has a few exact duplicate digits
    x = mnist.test.to_float(mnist.test.images[:10])
    assert x.min() >= 0 and x.max() <= 1 and torch.allclose(x * 255, (x * 255).round(), atol=1e-4)

    binarized = data_lib.load_data("binarized-mnist", data_dir)
    again = data_lib.load_data("binarized-mnist", data_dir)
    assert torch.equal(binarized.test.images, again.test.images)  # binarized once, fixed seed
    assert torch.equal(binarized.val.images, again.val.images)
    assert set(binarized.test.images.unique().tolist()) == {0, 1}
    assert binarized.train.dynamic_binarize and not binarized.test.dynamic_binarize
    # the fixed binarization has the statistics of the intensities it came from
    mean_intensity = mnist.test.images.double().mean().item() / 255
    assert abs(binarized.test.images.double().mean().item() - mean_intensity) < 5 * math.sqrt(0.25 / 7.84e6)


def test_real_static_binarized_and_fashion(data_dir):
    static = data_lib.load_data("binarized-mnist-static", data_dir)
    assert (len(static.train), len(static.val), len(static.test)) == (50_000, 10_000, 10_000)
    assert set(static.train.images[:100].unique().tolist()) == {0, 1}
    fashion = data_lib.load_data("fashion-mnist", data_dir)
    assert not fashion.info.binary and fashion.info.num_dims == 784
    assert int(fashion.test.images.max()) == 255
    assert not np.array_equal(fashion.test.images[:5].numpy(), data_lib.load_data("mnist", data_dir).test.images[:5].numpy())
