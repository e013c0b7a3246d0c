"""Image folders as data sets (image_folder.py, data.py's folder route), on real image files the tests write:
exact pixel round trips, the stable order, the cache and its invalidation, every kind of bad input (exit 2,
one paragraph, no file written), and model04 through the whole route on real CIFAR10-JPEG images."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data as data_lib
import image_folder
from conftest import run_script


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("VAE_CACHE_DIR", str(cache))
    return cache


def write_folder(root: Path, layout: dict, size=(32, 32), fmt="png", seed=0, mode="RGB") -> dict:
    """layout {split: {class: n_images}} -> {relative path: uint8 [H, W, C] pixels written} (random pixels)."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                channels = 3 if mode == "RGB" else 1
                pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
                rel = f"{split}/{cls}/{i:03d}.{fmt}"
                image = Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode)
                image.save(root / rel, **({"quality": 75} if fmt == "jpg" else {}))
                written[rel] = pixels
    return written


def folder_order(written: dict, split: str) -> list[str]:
    """ImageFolder's order: classes sorted, files sorted within each class."""
    return sorted(rel for rel in written if rel.startswith(f"{split}/"))


LAYOUT = {"train": {"cat": 12, "dog": 11}, "test": {"cat": 4, "dog": 5}}


def test_png_folder_round_trips_exactly_in_a_stable_order(tmp_path):
    written = write_folder(tmp_path / "Pets", LAYOUT)
    images = image_folder.load_image_folder(tmp_path / "Pets")
    for split, array in (("train", images.train), ("test", images.test)):
        expected = np.stack([written[rel].transpose(2, 0, 1) for rel in folder_order(written, split)])
        assert array.dtype == np.uint8 and array.shape == expected.shape == (len(expected), 3, 32, 32)
        assert np.array_equal(array, expected)  # exact: PNG is lossless, nothing resized
    assert images.val is None
    # data.py holds each split in a fixed permutation of that order; validation carved from train (a tenth here)
    data = data_lib.load_data(f"folder:{tmp_path / 'Pets'}")
    test_expected = images.test[np.random.default_rng(data_lib.SPLIT_SEED).permutation(len(images.test))]
    assert np.array_equal(data.test.images.numpy(), test_expected)
    assert (len(data.train), len(data.val), len(data.test)) == (21, 2, 9)
    train_and_val = np.concatenate([data.train.images.numpy(), data.val.images.numpy()])
    assert sorted(map(bytes, train_and_val)) == sorted(map(bytes, images.train))  # nothing lost, nothing repeated
    again = data_lib.load_data(f"folder:{tmp_path / 'Pets'}")
    for a, b in ((data.train, again.train), (data.val, again.val), (data.test, again.test)):
        assert np.array_equal(a.images.numpy(), b.images.numpy())
    assert data.info.name == "pets" and data.info.shape == (3, 32, 32) and not data.info.binary
    assert data.test.to_float(data.test.images[:1]).max() <= 1.0


def test_a_val_folder_is_the_validation_split(tmp_path):
    written = write_folder(tmp_path / "withval", {**LAYOUT, "val": {"cat": 3}})
    data = data_lib.load_data(f"folder:{tmp_path / 'withval'}")
    assert (len(data.train), len(data.val), len(data.test)) == (23, 3, 9)
    val = sorted(map(bytes, data.val.images.numpy()))
    assert val == sorted(bytes(written[rel].transpose(2, 0, 1)) for rel in folder_order(written, "val"))


def test_jpeg_folder_decodes_as_pil_does_and_grey_is_luma(tmp_path):
    write_folder(tmp_path / "J", LAYOUT, fmt="jpg")
    images = image_folder.load_image_folder(tmp_path / "J")
    first = tmp_path / "J" / folder_order({f"test/cat/{i:03d}.jpg": 0 for i in range(4)}, "test")[0]
    with Image.open(first) as im:
        assert np.array_equal(images.test[0], np.asarray(im.convert("RGB")).transpose(2, 0, 1))
        grey = image_folder.load_image_folder(tmp_path / "J", grey=True)
        assert grey.test.shape == (9, 1, 32, 32)
        assert np.array_equal(grey.test[0, 0], np.asarray(im.convert("L")))
    assert data_lib.dataset_info(f"folder:{tmp_path / 'J'}", grey=True).name == "j-grey"


def test_other_sizes_are_centre_cropped_and_resized(tmp_path):
    """A uniform colour stays that colour; the crop keeps the centred square (a wide image whose outer
    columns differ loses them)."""
    root = tmp_path / "wide"
    for split in ("train", "test"):
        (root / split / "x").mkdir(parents=True)
        pixels = np.zeros((40, 60, 3), dtype=np.uint8)
        pixels[:, :, 0] = 200  # red everywhere ...
        pixels[:, :10, 1] = pixels[:, 50:, 1] = 255  # ... and yellow in the 10 columns either side of the centre square
        for i in range(12 if split == "train" else 2):
            Image.fromarray(pixels).save(root / split / "x" / f"{i}.png")
    images = image_folder.load_image_folder(root, image_size=16)
    assert images.test.shape == (2, 3, 16, 16)
    assert np.all(images.test[:, 0] == 200) and np.all(images.test[:, 1:] == 0)
    # without --image-size the images only need to share one size: resized to the default 32
    assert image_folder.load_image_folder(root).test.shape == (2, 3, 32, 32)
    assert data_lib.dataset_info("folder:wide", image_size=16).name == "wide-16px"


def test_cache_is_hit_and_invalidated_by_a_changed_folder(tmp_path, cache_dir):
    root = tmp_path / "C"
    written = write_folder(root, LAYOUT)
    first = image_folder.load_image_folder(root)
    assert not first.from_cache and len(list(cache_dir.iterdir())) == 1
    listing = "".join(f"{hashlib.sha256((root / rel).read_bytes()).hexdigest()}  {rel}\n" for rel in sorted(written))
    assert first.content_sha256 == hashlib.sha256(listing.encode()).hexdigest()
    second = image_folder.load_image_folder(root)
    assert second.from_cache and second.content_sha256 == first.content_sha256
    assert np.array_equal(second.train, first.train) and np.array_equal(second.test, first.test)
    # another set of options is another cache entry
    assert not image_folder.load_image_folder(root, grey=True).from_cache
    # rewrite one test image with other pixels: decoded again, new hash, the stale entry of the folder removed
    target = root / "test" / "dog" / "000.png"
    Image.fromarray(np.full((32, 32, 3), 7, dtype=np.uint8)).save(target)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    third = image_folder.load_image_folder(root)
    assert not third.from_cache and third.content_sha256 != first.content_sha256
    assert np.all(third.test[4] == 7)  # test/dog/000.png is the fifth test image in folder order
    names = sorted(p.name for p in cache_dir.iterdir())
    assert len(names) == 2 and all(n.startswith("c-") for n in names)  # the new RGB entry and the grey one
    assert image_folder.load_image_folder(root).from_cache
    # an added image invalidates too
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(root / "train" / "cat" / "new.png")
    fourth = image_folder.load_image_folder(root)
    assert not fourth.from_cache and len(fourth.train) == 24


def _truncate_a_jpeg(root):
    path = root / "test" / "cat" / "001.jpg"
    path.write_bytes(path.read_bytes()[:300])
    return "test/cat/001.jpg"


BAD_FOLDERS = {
    # case: (how to spoil a good folder, words the message must hold)
    "no train": (lambda root: shutil.rmtree(root / "train"), ["no train/"]),
    "no test": (lambda root: shutil.rmtree(root / "test"), ["no test/"]),
    "empty class": (lambda root: (root / "train" / "bird").mkdir(), ["bird"]),
    "no images": (lambda root: [p.unlink() for p in root.rglob("*.jpg")], ["no valid file"]),
    "unreadable": (lambda root: (root / "train" / "dog" / "002.jpg").write_bytes(b"not an image"),
                   ["train/dog/002.jpg"]),
    "truncated": (_truncate_a_jpeg, ["test/cat/001.jpg"]),
    "mixed sizes": (lambda root: Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / "train" / "dog" / "x.jpg"),
                    ["--image-size", "24x20"]),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folders_exit_2_with_one_paragraph_and_write_nothing(tmp_path, cache_dir, case):
    root = tmp_path / "bad"
    write_folder(root, LAYOUT, fmt="jpg")
    spoil, words = BAD_FOLDERS[case]
    spoil(root)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "run"
    proc = run_script("model03.py", "--quick", "--dataset", f"folder:{root}", "--device", "cpu", "--out-dir", out)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]  # (beside a progress bar)
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]) and "Traceback" not in proc.stderr
    message = errors[0]
    assert all(w.lower() in message.lower() for w in words), message
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no out-dir, no cache entry


def test_folder_flags_are_checked(tmp_path):
    proc = run_script("model03.py", "--dataset", "fashion-mnist", "--grey", "--quick", "--out-dir", tmp_path / "r")
    assert proc.returncode == 2 and "apply to image folders" in proc.stderr
    proc = run_script("model03.py", "--dataset", "folder:", "--quick", "--out-dir", tmp_path / "r")
    assert proc.returncode == 2 and "give the folder's path" in proc.stderr
    proc = run_script("model03.py", "--dataset", "cifar100", "--quick")
    assert proc.returncode == 2 and "folder:PATH" in proc.stderr


def test_missing_named_folder_names_the_files_and_where(tmp_path):
    with pytest.raises(data_lib.DataError) as err:
        data_lib.load_data("cifar10-jpeg", tmp_path)
    assert "CIFAR10-JPEG/train" in str(err.value) and str(tmp_path) in str(err.value)


def test_model04_trains_on_real_cifar10_jpeg_images_through_the_folder_route(tmp_path, data_dir):
    source = data_dir / "CIFAR10-JPEG"
    if not (source / "train").is_dir():
        pytest.skip(f"needs {source} (CIFAR-10 as JPEG in ImageFolder layout; CI has it in ../shared/data)")
    root = tmp_path / "CIFAR10-JPEG-64"
    classes = sorted(p.name for p in (source / "train").iterdir())
    picks = [("train", cls, 5) for cls in classes] + [("test", cls, 7) for cls in classes[:2]]  # 50 + 14 real files
    for split, cls, n in picks:  # no val/: validation is carved from train (a tenth: 5 images)
        (root / split / cls).mkdir(parents=True)
        for name in sorted(os.listdir(source / split / cls))[:n]:
            shutil.copy(source / split / cls / name, root / split / cls / name)
    assert len(list(root.rglob("*.jpg"))) == 64
    out = tmp_path / "run"
    proc = run_script("model04.py", "--quick", "--dataset", f"folder:{root}", "--max-steps", "4", "--device", "cpu",
                      "--batch-size", "8", "--eval-samples", "5", "--out-dir", out, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["dataset"] == "cifar10-jpeg-64" and result["run_name"].startswith("model04_cifar10-jpeg-64_")
    assert result["likelihood"] == "logistic-mixture" and result["n_test"] == 14
    assert result["dataset_sha256"] == image_folder.load_image_folder(root).content_sha256
    assert result["dataset_folder"] == str(root.resolve())
    assert np.isfinite(result["test_bpd"]) and 0 < result["test_bpd"] < 16  # 4 steps: near a uniform pmf's 8
    assert all((out / f"model04_{kind}.png").exists() for kind in ("imgs", "recs", "samples"))
    # a checkpoint belongs to the folder content it was trained on
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "cat" / "extra.png")
    proc = run_script("model04.py", "--eval-only", "--checkpoint", out / "best.pt", "--device", "cpu",
                      "--out-dir", tmp_path / "eval")
    assert proc.returncode == 2 and "another set of images" in proc.stderr, proc.stderr
