"""Data sets by name, held as uint8 tensors on the training device and batched by index.

| name                    | shape    | pixels       | train / val / test                                  |
|-------------------------|----------|--------------|-----------------------------------------------------|
| binarized-mnist         | 1x28x28  | {0,1}        | 59k / 1k / 10k; train re-binarized every draw       |
| binarized-mnist-static  | 1x28x28  | {0,1}        | Larochelle & Murray's fixed 50k / 10k / 10k files   |
| mnist                   | 1x28x28  | 8-bit        | 59k / 1k / 10k                                      |
| fashion-mnist           | 1x28x28  | 8-bit        | 59k / 1k / 10k                                      |
| cifar10                 | 3x32x32  | 8-bit        | 49k / 1k / 10k                                      |
| svhn                    | 3x32x32  | 8-bit        | 72,257 / 1k / 26,032 (the 'train' split, no extra)  |
| cifar10-jpeg            | 3x32x32  | 8-bit        | 49k / 1k / 10k: the image folder CIFAR10-JPEG/      |
| folder:PATH             | CxSxS    | 8-bit        | PATH/train, PATH/val or 1k carved, PATH/test        |

Image folders (image_folder.py): `folder:PATH` is any directory in torchvision's ImageFolder layout
(train/<class>/..., test/<class>/..., val/ optional), PATH absolute, relative to the working directory, or
relative to the data root; named after the folder (CIFAR10-JPEG -> cifar10-jpeg). `cifar10-jpeg` is the
folder CIFAR10-JPEG under the data root: CIFAR-10's images re-encoded as JPEG quality 75 with 4:2:0 chroma,
our colour set. JPEG removed detail and halved the colour resolution, so its bits/dim are lower than
CIFAR-10's and never compare with CIFAR-10 numbers in the literature. Options for folders only:
image_size (S, default 32; see image_folder.py for mixed sizes) and grey (1 channel instead of RGB).
The test and validation splits are held in a fixed pseudo-random order (a SPLIT_SEED permutation of
ImageFolder's class-by-class order), so that the first N test images (--n-test N, the figure grids) sample
every class.

Validation: VAL_SIZE = 1000 images carved from the training set by a fixed permutation
(SPLIT_SEED), the same for every run and every training seed; it selects checkpoints, the test
set is touched once for the final number. (IWAE reported no validation split; 1000 images keep the
standard error of the validation bound around 0.3 nats on MNIST while costing ~2% of train.)

Dynamic binarization (binarized-mnist, as in Burda et al. 2015): every time a training image is
drawn, its pixels are sampled as Bernoulli(intensity/255). The validation and test sets are
binarized once with a fixed seed (BINARIZE_SEED), so the test number is reproducible.

Data root: `--data-dir`, else $VAE_DATA_DIR, else ./data, laid out as torchvision does:
    <root>/MNIST/raw/{train-images-idx3-ubyte,t10k-images-idx3-ubyte}.gz
    <root>/FashionMNIST/raw/{train-images-idx3-ubyte,t10k-images-idx3-ubyte}.gz
    <root>/BinarizedMNIST/binarized_mnist_{train,valid,test}.amat[.gz]
    <root>/cifar-10-batches-py/  (or cifar-10-python.tar.gz)
    <root>/SVHN/{train_32x32,test_32x32}.mat
Files are read in place (a read-only copy works) and checked against the originals' md5 sums;
missing files are downloaded through torchvision where a network exists, else a DataError names
the files and the directory. VAE_DATA_VERIFY=0 skips the md5 checks, for the synthetic CIFAR-10 /
SVHN files the tests write (no colour data set exists on the development machines);
VAE_DATA_DOWNLOAD=0 never tries a download (offline machines: fail at once instead of waiting on DNS).
"""
import argparse
import gzip
import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import image_folder

VAL_SIZE = 1000
SPLIT_SEED = 20151101  # fixed: the validation images never depend on the training seed
BINARIZE_SEED = 0  # fixed binarization of the dynamic set's validation and test images

# md5 of the uncompressed Larochelle & Murray files (binarized_mnist_*.amat)
AMAT_MD5 = {
    "train": "db28b1a6ae0fe70cbd3da91acf46e477",
    "valid": "bf37822a04e94123630de6a7dfd9c9ef",
    "test": "14e41ae11040adba6ab8cb291eda0dd8",
}
AMAT_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{}.amat"


class DataError(RuntimeError):
    """Data missing or corrupted; the message says which files and where they belong."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    shape: tuple  # (C, H, W)
    binary: bool  # {0,1} pixels (Bernoulli likelihood) vs 8-bit pixels (discrete likelihoods)
    folder: str | None = None  # image folders: the resolved directory, once loaded
    content_sha256: str | None = None  # image folders: the hash of its image files (image_folder.py), once loaded

    @property
    def num_dims(self) -> int:
        c, h, w = self.shape
        return c * h * w


DATASETS = {
    "binarized-mnist": DatasetInfo("binarized-mnist", (1, 28, 28), binary=True),
    "binarized-mnist-static": DatasetInfo("binarized-mnist-static", (1, 28, 28), binary=True),
    "mnist": DatasetInfo("mnist", (1, 28, 28), binary=False),
    "fashion-mnist": DatasetInfo("fashion-mnist", (1, 28, 28), binary=False),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), binary=False),
    "svhn": DatasetInfo("svhn", (3, 32, 32), binary=False),
    "cifar10-jpeg": DatasetInfo("cifar10-jpeg", (3, 32, 32), binary=False),
}
FOLDER_PREFIX = "folder:"  # --dataset folder:PATH
NAMED_FOLDERS = {"cifar10-jpeg": "CIFAR10-JPEG"}  # data sets that are image folders under the data root


@dataclass
class Split:
    """uint8 images [N, C, H, W] on the device. `dynamic_binarize`: pixels hold 0..255 intensities
    that are re-sampled to {0,1} at every draw; otherwise binary sets hold {0,1} and 8-bit sets 0..255."""
    images: torch.Tensor
    binary: bool
    dynamic_binarize: bool = False

    def __len__(self):
        return self.images.shape[0]

    def to_float(self, images_u8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 batch -> float batch in [0, 1] following the pixel convention of distributions.py."""
        if self.dynamic_binarize:
            return torch.bernoulli(images_u8.float() / 255.0, generator=generator)
        if self.binary:
            return images_u8.float()
        return images_u8.float() / 255.0

    def mean_image(self) -> torch.Tensor:
        """[C, H, W] float32: the mean of to_float over the split (for a dynamically binarized split, the
        probability that each pixel is 1)."""
        mean = self.images.float().mean(0)
        return mean if self.binary and not self.dynamic_binarize else mean / 255.0

    def subset(self, n: int) -> "Split":
        return Split(self.images[:n], self.binary, self.dynamic_binarize)


@dataclass
class Data:
    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    root: Path


# ----------------------------------------------------------------------------- data root


def resolve_data_dir(cli_value: str | None = None) -> Path:
    """--data-dir, else $VAE_DATA_DIR, else ./data."""
    if cli_value:
        return Path(cli_value).expanduser()
    env = os.environ.get("VAE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path("data")


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _try_download(fetch):
    """Run a torchvision download; VAE_DATA_DOWNLOAD=0 (offline machines, the tests) skips it, since
    a download attempt without a network can wait tens of seconds on DNS before failing."""
    if os.environ.get("VAE_DATA_DOWNLOAD", "1") == "0":
        raise RuntimeError("downloads disabled by VAE_DATA_DOWNLOAD=0")
    fetch()


def _missing(root: Path, names: list[str], how: str, cause: Exception | None = None) -> DataError:
    detail = f" (download failed: {type(cause).__name__}: {cause})" if cause is not None else ""
    return DataError(
        f"data not found: need {', '.join(names)} in {root.resolve()}{detail}. {how} "
        f"Point --data-dir or VAE_DATA_DIR at a directory holding them."
    )


# ----------------------------------------------------------------------------- MNIST-style idx files


def _read_idx_images(path: Path, md5: str | None) -> np.ndarray:
    """Read an idx3 image file (.gz or extracted) -> uint8 [N, 28, 28]; checks the .gz md5."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        if md5 is not None and _md5(raw) != md5:
            raise DataError(f"corrupted data file {path}: md5 {_md5(raw)} != expected {md5}. "
                            f"Replace it with the original (or delete it to re-download).")
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"corrupted data file {path}: cannot decompress ({e}).") from e
    magic, n, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in range(0, 16, 4))
    if magic != 2051 or len(raw) != 16 + n * rows * cols:
        raise DataError(f"corrupted data file {path}: not an idx3 image file of the expected size.")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def _load_idx_dataset(root: Path, folder: str) -> tuple[np.ndarray, np.ndarray]:
    import torchvision  # the reference md5 sums and mirrors live in torchvision

    cls = {"MNIST": torchvision.datasets.MNIST, "FashionMNIST": torchvision.datasets.FashionMNIST}[folder]
    md5s = dict(cls.resources)
    raw_dir = root / folder / "raw"
    wanted = ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte"]

    def find(stem):
        for p in (raw_dir / f"{stem}.gz", raw_dir / stem):
            if p.exists():
                return p
        return None

    if any(find(s) is None for s in wanted):
        try:  # torchvision downloads into <root>/<folder>/raw and verifies md5
            _try_download(lambda: cls(str(root), train=True, download=True))
        except Exception as e:  # no network, read-only root, ...
            raise _missing(raw_dir, [f"{s}.gz" for s in wanted],
                           f"Copy the original {folder} files there.", e) from None
    train, test = (_read_idx_images(find(s), md5s.get(f"{s}.gz")) for s in wanted)
    return train[:, None], test[:, None]  # [N, 1, 28, 28]


# ----------------------------------------------------------------------------- Larochelle's binarized MNIST


def _read_amat(path: Path, split: str) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"corrupted data file {path}: cannot decompress ({e}).") from e
    if _md5(raw) != AMAT_MD5[split]:
        raise DataError(f"corrupted data file {path}: md5 of its contents {_md5(raw)} != "
                        f"expected {AMAT_MD5[split]}. Replace it with the original.")
    chars = np.frombuffer(raw, dtype=np.uint8)
    bits = chars[(chars == ord("0")) | (chars == ord("1"))] - ord("0")  # drop spaces and newlines
    return bits.reshape(-1, 1, 28, 28)


def _load_static_binarized(root: Path) -> dict[str, np.ndarray]:
    folder = root / "BinarizedMNIST"
    out = {}
    for split in ("train", "valid", "test"):
        name = f"binarized_mnist_{split}.amat"
        path = next((p for p in (folder / f"{name}.gz", folder / name) if p.exists()), None)
        if path is None:
            try:
                from torchvision.datasets.utils import download_url
                _try_download(lambda: download_url(AMAT_URL.format(split), str(folder), md5=AMAT_MD5[split]))
                path = folder / name
            except Exception as e:
                raise _missing(folder, [f"binarized_mnist_{s}.amat.gz" for s in ("train", "valid", "test")],
                               "Copy Larochelle & Murray's files there (gzipped or not).", e) from None
        out[split] = _read_amat(path, split)
    return out


# ----------------------------------------------------------------------------- colour sets


def _verify_checksums() -> bool:
    """VAE_DATA_VERIFY=0 skips md5 checks: only for the synthetic colour files the tests write."""
    return os.environ.get("VAE_DATA_VERIFY", "1") != "0"


def _check_md5(path: Path, expected: str):
    if _verify_checksums() and _md5(path.read_bytes()) != expected:
        raise DataError(f"corrupted data file {path}: md5 does not match the original ({expected}). "
                        f"Replace it with the original (or delete it to re-download).")


def _load_cifar10(root: Path) -> tuple[np.ndarray, np.ndarray]:
    import pickle

    import torchvision

    cls = torchvision.datasets.CIFAR10
    folder = root / cls.base_folder  # cifar-10-batches-py
    names = [n for n, _ in cls.train_list + cls.test_list]
    if not all((folder / n).exists() for n in names):
        try:
            _try_download(lambda: cls(str(root), train=True, download=True))
        except Exception as e:
            raise _missing(folder, names, "Copy the CIFAR-10 python version there "
                           "(or cifar-10-python.tar.gz into its parent).", e) from None

    def read(entries):
        parts = []
        for name, md5 in entries:
            _check_md5(folder / name, md5)
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            parts.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # rows: R, G, B planes
        return np.concatenate(parts)

    return read(cls.train_list), read(cls.test_list)


def _load_svhn(root: Path) -> tuple[np.ndarray, np.ndarray]:
    import torchvision
    from scipy.io import loadmat

    folder = root / "SVHN"
    splits = torchvision.datasets.SVHN.split_list  # {"train": [url, filename, md5], ...}
    names = [splits[s][1] for s in ("train", "test")]
    if not all((folder / n).exists() for n in names):
        try:
            for s in ("train", "test"):
                _try_download(lambda: torchvision.datasets.SVHN(str(folder), split=s, download=True))
        except Exception as e:
            raise _missing(folder, names, "Copy the SVHN cropped-digits files there.", e) from None

    def read(split):
        path = folder / splits[split][1]
        _check_md5(path, splits[split][2])
        return np.ascontiguousarray(loadmat(str(path))["X"].transpose(3, 2, 0, 1))  # [H, W, C, N] -> [N, C, H, W]

    return read("train"), read("test")


# ----------------------------------------------------------------------------- public API


def _carve_validation(train: np.ndarray, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(train))
    return train[perm[val_size:]], train[perm[:val_size]]


def _binarize_once(images: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(images.shape) < images / 255.0).astype(np.uint8)


def is_folder(spec: str) -> bool:
    """Whether a --dataset value names an image folder (folder:PATH or one of NAMED_FOLDERS)."""
    return spec.startswith(FOLDER_PREFIX) or spec in NAMED_FOLDERS


def dataset_info(spec: str, image_size: int | None = None, grey: bool = False) -> DatasetInfo:
    """The DatasetInfo of a --dataset value, without reading any file (configs check shapes before loading)."""
    if is_folder(spec):
        folder = spec[len(FOLDER_PREFIX):] if spec.startswith(FOLDER_PREFIX) else NAMED_FOLDERS[spec]
        if not folder:
            raise DataError(f"--dataset {spec!r}: give the folder's path, e.g. folder:path/to/images")
        side = image_size or image_folder.DEFAULT_IMAGE_SIZE
        return DatasetInfo(image_folder.dataset_name(folder, image_size, grey), (1 if grey else 3, side, side),
                           binary=False)
    if spec not in DATASETS:
        raise DataError(f"unknown dataset {spec!r}; choose one of {', '.join(DATASETS)}, or folder:PATH")
    if image_size is not None or grey:
        raise DataError(f"--image-size and --grey apply to image folders ({', '.join(NAMED_FOLDERS)} or "
                        f"folder:PATH), not to {spec}")
    return DATASETS[spec]


def dataset_arg(names: list[str], folders: bool):
    """argparse `type=` for --dataset: one of `names`, or (when `folders`) an image folder; else exit 2."""
    def parse(value: str) -> str:
        if value in names or (folders and is_folder(value)):
            return value
        raise argparse.ArgumentTypeError(
            f"invalid choice {value!r} (choose from {', '.join(names)}" + (", folder:PATH)" if folders else ")"))
    parse.__name__ = "dataset"  # argparse names the type in its messages
    return parse


def _resolve_folder(spec: str, root: Path) -> Path:
    """folder:PATH as given (absolute, or relative to the working directory), else under the data root."""
    if spec in NAMED_FOLDERS:
        return root / NAMED_FOLDERS[spec]
    path = Path(spec[len(FOLDER_PREFIX):]).expanduser()
    return path if path.is_absolute() or path.exists() else root / path


def _load_folder(spec: str, root: Path, image_size: int | None, grey: bool):
    folder = _resolve_folder(spec, root)
    if spec in NAMED_FOLDERS and not folder.is_dir():
        raise _missing(folder.parent, [f"{folder.name}/train/<class>/*.jpg", f"{folder.name}/test/<class>/*.jpg"],
                       "Copy the image folder there (see data.py for what it holds).")
    try:
        images = image_folder.load_image_folder(folder, image_size, grey)
    except image_folder.FolderError as e:
        raise DataError(str(e)) from None
    return images, str(folder.resolve())


def load_data(name: str, data_dir: str | Path | None = None, device="cpu", val_size: int = VAL_SIZE,
              image_size: int | None = None, grey: bool = False) -> Data:
    """Load data set `name` (a --dataset value) into uint8 tensors on `device`; see the module docstring."""
    info = dataset_info(name, image_size, grey)
    root = resolve_data_dir(str(data_dir) if data_dir is not None else None)
    dynamic = False
    if is_folder(name):
        images, folder = _load_folder(name, root, image_size, grey)
        info = replace(info, folder=folder, content_sha256=images.content_sha256)
        # ImageFolder's order is class by class: a fixed permutation makes any prefix (--n-test N, the figure
        # grids) a sample of every class, as in the built-in sets (training batches are drawn at random anyway)
        train, val, test = images.train, *(None if a is None else a[np.random.default_rng(SPLIT_SEED).permutation(len(a))]
                                           for a in (images.val, images.test))
        if val is None:  # carved as for the built-in sets; a small folder gives a tenth of its images
            if len(train) < 10:
                raise DataError(f"image folder {folder} has {len(train)} training images: too few to carve a "
                                f"validation set from; add a val/ folder or more images")
            train, val = _carve_validation(train, min(val_size, len(train) // 10))
    elif name == "binarized-mnist-static":
        parts = _load_static_binarized(root)
        train, val, test = parts["train"], parts["valid"], parts["test"]
    else:
        if name in ("binarized-mnist", "mnist"):
            train, test = _load_idx_dataset(root, "MNIST")
        elif name == "fashion-mnist":
            train, test = _load_idx_dataset(root, "FashionMNIST")
        elif name == "cifar10":
            train, test = _load_cifar10(root)
        else:
            train, test = _load_svhn(root)
        train, val = _carve_validation(train, val_size)
        if name == "binarized-mnist":
            val = _binarize_once(val, BINARIZE_SEED)
            test = _binarize_once(test, BINARIZE_SEED + 1)
            dynamic = True

    def to_split(a, dyn=False):
        return Split(torch.from_numpy(np.array(a, dtype=np.uint8, copy=True)).to(device), info.binary, dyn)

    return Data(info, to_split(train, dynamic), to_split(val), to_split(test), root)


class Batcher:
    """Training batches by index from a device-resident Split: no DataLoader, no per-step host work.

    Each epoch draws one permutation on the device generator; a step takes the next `batch_size`
    indices (the global batch; with torch.distributed each rank keeps its contiguous slice of it,
    so N ranks see exactly the images one process would). Dynamic binarization samples the whole
    global batch on every rank before slicing, so the draws do not depend on the number of ranks.
    The state (epoch, position, permutation, generator) goes into checkpoints for exact resume.
    """

    def __init__(self, split: Split, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size != 0:
            raise ValueError(f"batch size {batch_size} must be divisible by the number of processes {world_size}")
        if batch_size > len(split):
            raise ValueError(f"batch size {batch_size} exceeds the {len(split)} training images")
        self.split, self.batch_size = split, batch_size
        self.rank, self.world_size = rank, world_size
        self.device = split.images.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.steps_per_epoch = len(split) // batch_size  # drop the ragged last batch
        self.epoch, self.position = 0, 0
        self.perm = torch.randperm(len(split), generator=self.generator, device=self.device)

    def next(self) -> torch.Tensor:
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self.perm = torch.randperm(len(self.split), generator=self.generator, device=self.device)
        start = self.position * self.batch_size
        idx = self.perm[start:start + self.batch_size]
        self.position += 1
        x = self.split.to_float(self.split.images[idx], self.generator)  # [B_global, C, H, W]
        local = self.batch_size // self.world_size
        return x[self.rank * local:(self.rank + 1) * local]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "perm": self.perm.cpu(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict):
        self.epoch, self.position = state["epoch"], state["position"]
        self.perm = state["perm"].to(self.device)
        self.generator.set_state(state["generator"])
