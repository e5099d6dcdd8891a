"""Fashion-MNIST from the four standard IDX `.gz` files.

Torch-free (numpy only) so export verification and tests can read real images without torch.
The IDX reader is a dozen lines of numpy: no maintained package reads these files without also
downloading them.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

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
