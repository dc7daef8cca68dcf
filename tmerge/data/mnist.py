"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files, the MNIST format;
10 labelled classes of greyscale 28x28 images)."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

from ..errors import TmergeError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzipped."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # missing, unreadable, or a damaged gzip stream
        raise TmergeError(f"cannot read {path}: {e}") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise TmergeError(f"{path} is not an IDX file")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    if len(data) - offset != dtype.itemsize * math.prod(shape):
        raise TmergeError(f"{path} is truncated: header says {shape}, file has {len(data) - offset} data bytes")
    return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train": 60000, "test": 10000) as (uint8 (N, 28, 28), int64 (N,))."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise TmergeError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")

    def find(stem: str) -> Path:
        for candidate in (FASHION_MNIST_DIR / f"{stem}.gz", FASHION_MNIST_DIR / stem):
            if candidate.is_file():
                return candidate
        raise TmergeError(
            f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR / stem}.gz is missing): "
            f"apt-get install -y {FASHION_MNIST_PACKAGE}"
        )

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise TmergeError(f"Fashion-MNIST {split} files disagree: images {images.shape}, labels {labels.shape}")
    return images, labels
