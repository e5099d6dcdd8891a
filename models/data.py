"""Datasets by the name a model spec carries: Fashion-MNIST (the four standard IDX `.gz`
files), scikit-learn's digits, a folder per class, and real photos for models trained on
ImageNet (which is not here: scikit-image's wheel ships a few colour photos, public domain or
CC0, read from where it is installed without importing it).

Torch-free (numpy, Pillow) so export verification, INT8 calibration and the load tests read real
images without torch. The IDX reader is a dozen lines of numpy: no maintained package reads
these files without also downloading them.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from convserve.models.scenes import Scenes

from convserve.spec import (
    DIGITS,
    FASHION_MNIST,
    FASHION_MNIST_LABELS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET,
    IMPORTED,
    InputSpec,
)

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_DIR_ENV = "CONVSERVE_DATA_DIR"

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

Split = Literal["train", "test"]


class DatasetNotFoundError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # N x 28 x 28, uint8
    labels: np.ndarray  # N, int64


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the four files: the argument, $CONVSERVE_DATA_DIR, or Debian's."""
    candidate = Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)
    missing = [f for pair in _FILES.values() for f in pair if not (candidate / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {candidate} (missing: {', '.join(missing)}). "
            "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
            "or pass --data-dir / set CONVSERVE_DATA_DIR to a directory holding the four IDX "
            ".gz files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)."
        )
    return candidate


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file: 2 zero bytes, a dtype code, the number of dims, big-endian sizes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path.name} is not an IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path.name}: header says {shape}, body holds {data.size} values")
    return data.reshape(shape)


def load_fashion_mnist(split: Split, data_dir: str | os.PathLike[str] | None = None) -> ImageSet:
    root = resolve_data_dir(data_dir)
    images_file, labels_file = _FILES[split]
    images = read_idx(root / images_file)
    labels = read_idx(root / labels_file).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return ImageSet(images=images, labels=labels)


@dataclass(frozen=True)
class LabelledImages:
    """Images of one size and channel count, with their class names."""

    images: np.ndarray  # N x H x W x C, uint8
    labels: np.ndarray  # N, int64
    classes: tuple[str, ...]


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}


def load_image_folder(
    root: str | os.PathLike[str], split: Split, *, channels: int, size: int
) -> LabelledImages:
    """The usual folder-per-class layout, `root/<split>/<class>/*.png|jpg`, resized to `size`
    (bilinear, as the service resizes) and converted to 1 or 3 channels."""
    from PIL import Image

    base = Path(root) / split
    if split == "test" and not base.is_dir() and (Path(root) / "val").is_dir():
        base = Path(root) / "val"
    classes = tuple(sorted(p.name for p in base.iterdir() if p.is_dir())) if base.is_dir() else ()
    if not classes:
        raise DatasetNotFoundError(f"no class folders under {base} (expected {base}/<class>/*)")
    images, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((base / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                img = img.resize((size, size), Image.Resampling.BILINEAR)
                images.append(np.asarray(img, dtype=np.uint8).reshape(size, size, channels))
            labels.append(index)
    return LabelledImages(np.stack(images), np.asarray(labels, dtype=np.int64), classes)


def load_digits(split: Split, *, size: int = 28, test_fraction: float = 0.25) -> LabelledImages:
    """scikit-learn's bundled handwritten digits (8 x 8, values 0..16), scaled to 0..255 and
    resized to `size`; a fixed stratified split."""
    from PIL import Image
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits: Any = sklearn_digits()  # a Bunch (images, target)
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    train_idx, test_idx = train_test_split(
        np.arange(len(pixels)), test_size=test_fraction, random_state=0, stratify=digits.target
    )
    idx = train_idx if split == "train" else test_idx
    resized = np.stack(
        [
            np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BILINEAR))
            for p in pixels[idx]
        ]
    )
    return LabelledImages(
        resized[..., None], digits.target[idx].astype(np.int64), tuple(str(d) for d in range(10))
    )


SCENES = "fashion-scenes"  # detection scenes composed from Fashion-MNIST (models/scenes.py)
TEST_SCENES = 2000


def load_scenes(
    split: Split,
    count: int,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int | None = None,
) -> Scenes:
    """Detection scenes of one split: garments of the training split for "train", of the test
    split for "test", each seeded on its own, so no test garment was seen in training."""
    from convserve.models.scenes import TEST_SEED, TRAIN_SEED, compose

    garments = load_fashion_mnist(split, data_dir)
    default = TRAIN_SEED if split == "train" else TEST_SEED
    return compose(garments.images, garments.labels, count, default if seed is None else seed)


# scikit-image's colour photos (skimage/data), as its documentation licenses them.
PHOTOS: tuple[str, ...] = (
    "chelsea.png",  # a tabby cat (CC0, Stefan van der Walt)
    "coffee.png",  # a cup of espresso (CC0, Rachel Michetti)
    "astronaut.png",  # Eileen Collins (public domain, NASA)
    "rocket.jpg",  # a rocket on its launch pad (public domain, SpaceX)
    "hubble_deep_field.jpg",  # galaxies (public domain, NASA)
    "retina.jpg",  # a human retina (CC0, Mikael Häggström)
    "ihc.png",  # an immunohistochemistry stain (no known copyright restrictions)
)
PHOTO_SIZE = (320, 240)  # width x height: photos as an upload of that size would arrive


def photos_dir() -> Path:
    """skimage/data of the installed scikit-image wheel (the package is never imported)."""
    import importlib.util

    found = importlib.util.find_spec("skimage")
    if found is None or not found.submodule_search_locations:
        raise DatasetNotFoundError(
            "real photos come from scikit-image's wheel: pip install scikit-image "
            "(`make serve` and `make test` install it)"
        )
    return Path(next(iter(found.submodule_search_locations))) / "data"


def photo_bytes(name: str) -> bytes:
    """One of scikit-image's photos, as its file's bytes (PNG or JPEG)."""
    return (photos_dir() / name).read_bytes()


def load_photos(
    names: tuple[str, ...] = PHOTOS, size: tuple[int, int] | None = PHOTO_SIZE
) -> np.ndarray:
    """Real colour photos as uint8 N x H x W x 3, each resized to `size` (width x height,
    bilinear) so they stack; None keeps one photo at its own size."""
    from PIL import Image

    images = []
    for name in names:
        with Image.open(photos_dir() / name) as img:
            rgb = img.convert("RGB")
            images.append(np.asarray(rgb.resize(size, Image.Resampling.BILINEAR) if size else rgb))
    return np.stack(images)


# Phone-camera uploads: 12 MP (4000 x 3000), sensor grain, JPEG quality 90, about 1.9 MB each.
PHONE_SIZE = (4000, 3000)
PHONE_PHOTOS: tuple[str, ...] = PHOTOS[:6]


def phone_photos(
    size: tuple[int, int] = PHONE_SIZE,
    names: tuple[str, ...] = PHONE_PHOTOS,
    *,
    grain: float = 3.0,
    quality: int = 90,
    seed: int = 0,
) -> list[bytes]:
    """scikit-image's colour photos as a phone camera uploads them: scaled to `size` (width x
    height, bicubic) with Gaussian sensor grain of `grain` levels, encoded as JPEG. Made, never
    stored: the same seed gives the same bytes."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        with Image.open(photos_dir() / name) as img:
            big = img.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        # Luminance grain, one value a pixel for all three channels: H x W x 1 (int16 headroom).
        noise = rng.normal(0.0, grain, (size[1], size[0], 1)).astype(np.int16)
        pixels = np.clip(np.asarray(big, np.int16) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def load_split(
    dataset: str,
    split: Split,
    *,
    channels: int = 1,
    size: int = 28,
    data_dir: str | os.PathLike[str] | None = None,
) -> LabelledImages:
    """One split of `dataset` (a spec's `dataset`: 'fashion-mnist', 'digits' or a folder root)
    as uint8 N x H x W x C images with its class names. Digits and folders are resized to `size`
    and converted to `channels` as they load; Fashion-MNIST comes as it is, 28 x 28 grey, and
    photos (ImageNet's stand-in, unlabelled: -1) at `PHOTO_SIZE`
    (`convserve.preprocess.from_pixels` adapts them to any spec, as it would an upload)."""
    if dataset == FASHION_MNIST:
        images = load_fashion_mnist(split, data_dir)
        return LabelledImages(images.images[..., None], images.labels, FASHION_MNIST_LABELS)
    if dataset == DIGITS:
        return load_digits(split, size=size)
    if dataset == SCENES:  # the test scenes, for parity and known answers (boxes aside)
        scenes = load_scenes(split, TEST_SCENES, data_dir)
        return LabelledImages(
            scenes.images[..., None], np.full(len(scenes), -1), FASHION_MNIST_LABELS
        )
    if dataset in (IMAGENET, IMPORTED):  # unlabelled real photos: parity and known answers
        photos = load_photos()
        return LabelledImages(photos, np.full(len(photos), -1, dtype=np.int64), ())
    return load_image_folder(dataset, split, channels=channels, size=size)


def input_spec_for(dataset: str, train: LabelledImages, channels: int, size: int) -> InputSpec:
    """The normalization a model trained on `train` uses: Fashion-MNIST's published statistics,
    else the training pixels' per-channel mean and std (grey statistics repeated for RGB)."""
    if dataset == FASHION_MNIST:
        mean, std = FASHION_MNIST_MEAN * channels, FASHION_MNIST_STD * channels
    else:
        pixels = train.images.astype(np.float64) / 255.0
        per_channel = pixels.reshape(-1, pixels.shape[-1])
        repeat = channels // pixels.shape[-1]
        mean = tuple(float(m) for m in per_channel.mean(0)) * repeat
        std = tuple(float(s) for s in per_channel.std(0)) * repeat
    return InputSpec(channels=channels, height=size, width=size, mean=mean, std=std)
