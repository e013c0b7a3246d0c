"""Image folders as data sets: any images in torchvision's ImageFolder layout, decoded once and cached.

    FOLDER/train/<class>/<image>    required
    FOLDER/test/<class>/<image>     required: the test set, touched once for the final number
    FOLDER/val/<class>/<image>      optional: without it, validation is carved from train with data.SPLIT_SEED

Classes are ignored (the models are unsupervised); the class folders only follow torchvision's layout, so a
folder prepared for a classifier works as it is. Images are read with torchvision.datasets.ImageFolder and PIL
(any format PIL reads: .jpg .png .bmp .webp ...), converted to RGB (or to luma with `grey`), and, where not
already image_size x image_size, centre-cropped to a square and resized (bicubic, antialiased). They are held
as uint8 [N, C, H, W], like every other data set in data.py.

image_size None means the default 32 *and* that every image must already share one size: a folder of mixed
sizes needs an explicit --image-size N, so that cropping and resizing each image is a choice, not an accident.

Decoding tens of thousands of files takes a while, so the uint8 arrays are cached (VAE_CACHE_DIR, else
./data/cache) in a folder keyed by the image files' paths, sizes and modification times and the image options:
a second start reads the cache in seconds; a changed folder is decoded again. The cache also keeps the
folder's content hash: sha256 of the lines "<sha256 of the file>  <path relative to FOLDER>\\n" of every image
file, sorted by path (what `cd FOLDER && find train test val -type f | LC_ALL=C sort | xargs sha256sum |
sha256sum` prints when FOLDER holds images only). result.json records it, so two different folders never
share a row of the results table even when they share a name.
"""
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_IMAGE_SIZE = 32
SPLITS = ("train", "val", "test")
CACHE_FORMAT = 1  # bump when the decoding changes, so old caches are not reused


class FolderError(RuntimeError):
    """A folder that is not a usable image data set; data.py turns it into a DataError (exit 2)."""


@dataclass
class FolderImages:
    """The decoded splits (uint8 [N, C, H, W]; val None when the folder has no val/) and where they came from."""
    train: np.ndarray
    val: np.ndarray | None
    test: np.ndarray
    content_sha256: str
    from_cache: bool


def dataset_name(folder: str | Path, image_size: int | None, grey: bool) -> str:
    """The name runs, result files and README tables use: the folder's name, lower-case, other characters
    as '-' (CIFAR10-JPEG -> cifar10-jpeg), with '-grey' and '-<N>px' when those options change the images."""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(folder).name.lower()).strip("-") or "images"
    if grey:
        slug += "-grey"
    if image_size is not None and image_size != DEFAULT_IMAGE_SIZE:
        slug += f"-{image_size}px"
    return slug


def cache_root() -> Path:
    return Path(os.environ.get("VAE_CACHE_DIR") or Path("data") / "cache").expanduser()


# ----------------------------------------------------------------------------- listing


def _list_split(split_dir: Path):
    """ImageFolder over one split: its (path, class) samples in torchvision's stable order (classes sorted,
    files sorted within each class). Empty class folders and folders without images are errors."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(split_dir), loader=lambda path: path)  # decoding happens in _decode
    except FileNotFoundError as e:  # torchvision: no class folder, or a class folder without images
        raise FolderError(f"{split_dir} is not an image split: {e}") from None


def _file_stats(datasets: dict, folder: Path) -> list[tuple[str, int, int]]:
    stats = []
    for ds in datasets.values():
        for path, _ in ds.samples:
            st = os.stat(path)
            stats.append((Path(path).relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
    return stats


def _cache_key(stats: list, image_size: int | None, grey: bool) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, "image_size": image_size, "grey": grey, "files": stats})
    return hashlib.sha256(payload.encode()).hexdigest()


# ----------------------------------------------------------------------------- decoding


def _decode(path: str, raw: bytes, image_size: int | None, grey: bool, first_size: list) -> np.ndarray:
    """One image file -> uint8 [C, S, S]. `first_size` holds the first image's size (for the mixed-size check)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()  # PIL decodes lazily: a truncated file fails here, not at open()
            image = image.convert("L" if grey else "RGB")
    except UnidentifiedImageError:
        raise FolderError(f"cannot read image {path}: not in an image format PIL recognises. Replace or remove "
                          f"the file.") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise FolderError(f"cannot read image {path}: {type(e).__name__}: {e}. Replace or remove the file.") from None
    if image_size is None:
        if not first_size:
            first_size.append(image.size)
        elif image.size != first_size[0]:
            raise FolderError(
                f"the images differ in size ({path} is {image.size[0]}x{image.size[1]}, the first one "
                f"{first_size[0][0]}x{first_size[0][1]}); pass --image-size N to centre-crop and resize every "
                f"image to NxN")
    side = image_size or DEFAULT_IMAGE_SIZE
    if image.size != (side, side):
        image = TF.center_crop(image, [min(image.size)] * 2)  # the largest centred square
        image = TF.resize(image, [side, side], interpolation=InterpolationMode.BICUBIC, antialias=True)
    pixels = np.asarray(image, dtype=np.uint8)  # [H, W, C] (RGB) or [H, W] (L)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # -> [C, H, W]


def _decode_all(datasets: dict, folder: Path, image_size: int | None, grey: bool):
    from tqdm import tqdm

    arrays, file_hashes, first_size = {}, [], []
    for split, ds in datasets.items():
        out = None
        for i, (path, _) in enumerate(tqdm(ds.samples, desc=f"decoding {folder.name}/{split}", unit="img",
                                            mininterval=2.0)):
            raw = Path(path).read_bytes()
            file_hashes.append((Path(path).relative_to(folder).as_posix(), hashlib.sha256(raw).hexdigest()))
            pixels = _decode(path, raw, image_size, grey, first_size)
            if out is None:
                out = np.empty((len(ds.samples), *pixels.shape), dtype=np.uint8)
            out[i] = pixels
        arrays[split] = out
    listing = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(file_hashes, key=lambda t: t[0].encode()))
    return arrays, hashlib.sha256(listing.encode()).hexdigest()


# ----------------------------------------------------------------------------- cache


def _read_cache(entry: Path) -> FolderImages | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        arrays = {s: np.load(entry / f"{s}.npy") if (entry / f"{s}.npy").exists() else None for s in SPLITS}
    except (OSError, ValueError):  # absent, or a partial entry from another process: decode again
        return None
    if arrays["train"] is None or arrays["test"] is None:
        return None
    return FolderImages(arrays["train"], arrays["val"], arrays["test"], meta["content_sha256"], from_cache=True)


def _write_cache(entry: Path, folder: Path, arrays: dict, content_sha256: str):
    """Write the entry into a temporary folder beside it and rename it into place (a reader never sees half
    of one); an unwritable cache only costs the next start a decode."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        for split, array in arrays.items():
            np.save(tmp / f"{split}.npy", array)
        (tmp / "meta.json").write_text(json.dumps({"folder": str(folder), "content_sha256": content_sha256,
                                                   "images": {s: len(a) for s, a in arrays.items()}}))
        os.replace(tmp, entry)
    except OSError as e:
        print(f"note: could not cache the decoded images in {entry.parent} ({e}); set VAE_CACHE_DIR to a "
              f"writable folder to skip decoding next time")
        return
    name = entry.name.rsplit("-", 1)[0]  # the data set's name (it carries the image options)
    for stale in entry.parent.glob(f"{name}-*"):  # older decodes of this same folder with the same options
        if stale != entry and stale.name.rsplit("-", 1)[0] == name and stale.is_dir():
            try:
                if json.loads((stale / "meta.json").read_text()).get("folder") == str(folder):
                    shutil.rmtree(stale)
            except (OSError, ValueError):
                pass


# ----------------------------------------------------------------------------- public API


def load_image_folder(folder: Path, image_size: int | None = None, grey: bool = False) -> FolderImages:
    """Decode (or read from the cache) FOLDER's splits; FolderError names what is wrong and which file."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FolderError(f"image folder {folder} does not exist or is not a directory")
    missing = [s for s in ("train", "test") if not (folder / s).is_dir()]
    if missing:
        raise FolderError(f"image folder {folder} has no {' or '.join(f'{s}/' for s in missing)}: an image-folder "
                          f"data set needs train/<class>/<images> and test/<class>/<images> (val/ is optional)")
    if image_size is not None and image_size < 1:
        raise FolderError(f"--image-size must be >= 1, got {image_size}")
    datasets = {s: _list_split(folder / s) for s in SPLITS if (folder / s).is_dir()}
    key = _cache_key(_file_stats(datasets, folder), image_size, grey)
    entry = cache_root() / f"{dataset_name(folder, image_size, grey)}-{key[:16]}"
    cached = _read_cache(entry)
    if cached is not None:
        return cached
    arrays, content_sha256 = _decode_all(datasets, folder, image_size, grey)
    _write_cache(entry, folder, arrays, content_sha256)
    return FolderImages(arrays["train"], arrays.get("val"), arrays["test"], content_sha256, from_cache=False)
