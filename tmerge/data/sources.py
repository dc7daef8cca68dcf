"""The one entry point to image sources: :func:`load_images` turns "samples", "fashion-mnist",
"fashion-mnist:test", "corpus:<split>" or a folder into a preprocessed batch for the model (with labels
when the source has them)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import TmergeError
from ..models.memory import check_images_fit
from .corpus import SPLITS, corpus_entries, corpus_views
from .folders import image_folder, open_image
from .mnist import FASHION_MNIST_CLASSES, fashion_mnist
from .preprocess import model_transform, report_progress
from .samples import sample_views

DEFAULT_COUNT = {"samples": 16, "fashion-mnist": 1000}  # a folder defaults to all of its images


class ImageSet(NamedTuple):
    images: Tensor  # (N, 3, H, W) float, preprocessed for the model
    labels: Tensor | None  # (N,) int64 class indices
    class_names: list[str] | None


def load_images(source: str | Path, model: nn.Module, n: int | None = None, seed: int = 0,
                progress: Callable[[int, int], None] | None = None) -> ImageSet:
    """``n`` images from ``source`` preprocessed for ``model``: (images, labels or None, class names or None).
    ``progress(done, total)`` is called as images are prepared.

    ``source``: "samples", "fashion-mnist" (train split), "fashion-mnist:test", "corpus:train|tune|eval"
    (the photo corpus, :mod:`tmerge.data.corpus`: training photos as one seeded random crop each, as
    adapters are trained; tune and eval photos whole, through the eval transform), or
    a folder. ``n`` None: 16 sample views, 1000 Fashion-MNIST images, or every image of a corpus split
    or folder. A subset of a dataset or folder is a seeded random choice (kept in source order); the
    same seed, the same set.
    """
    text = str(source)
    if not is_named_source(text) and not Path(text).exists():
        if "/" in text or text.startswith((".", "~")):  # meant as a folder
            raise TmergeError(f"image folder {text} does not exist")
        raise TmergeError(
            f"unknown image source {text!r}: use 'samples', 'fashion-mnist', 'fashion-mnist:test', "
            f"'corpus:{'|'.join(SPLITS)}' or an existing folder"
        )
    if n is not None:
        check_images_fit(n, model)
    if text == "samples":
        return ImageSet(sample_views(_default(n, DEFAULT_COUNT["samples"]), model, seed, progress=progress), None, None)
    if text == "fashion-mnist" or text.startswith("fashion-mnist:"):
        split = text.partition(":")[2] or "train"
        pixels, labels = fashion_mnist(split)
        chosen = _subset(len(labels), _default(n, DEFAULT_COUNT["fashion-mnist"]), seed, f"Fashion-MNIST {split}")
        from PIL import Image

        transform = model_transform(model)
        images = torch.stack([_prepared(transform(Image.fromarray(pixels[i])), progress, k + 1, len(chosen))
                              for k, i in enumerate(chosen)])
        return ImageSet(images, torch.from_numpy(labels[chosen]), list(FASHION_MNIST_CLASSES))
    if text.startswith("corpus:"):
        split = text.partition(":")[2]
        entries = corpus_entries(split)
        chosen = _subset(len(entries), _default(n, len(entries)), seed, f"the corpus' {split} split")
        return ImageSet(corpus_views([entries[i] for i in chosen], model, seed=seed, crop=split == "train"), None, None)
    files, labels, class_names = image_folder(text)
    chosen = _subset(len(files), _default(n, len(files)), seed, text)
    transform = model_transform(model)
    images = torch.stack([_prepared(transform(open_image(files[i])), progress, k + 1, len(chosen))
                          for k, i in enumerate(chosen)])
    label_tensor = torch.tensor([labels[i] for i in chosen], dtype=torch.int64) if labels is not None else None
    return ImageSet(images, label_tensor, class_names)


def _prepared(image: Tensor, progress: Callable[[int, int], None] | None, done: int, total: int) -> Tensor:
    report_progress(progress, done, total)
    return image


def _default(n: int | None, default: int) -> int:
    return default if n is None else n


def is_named_source(text: str) -> bool:
    """A source known by name (not a folder)."""
    return text in ("samples", "fashion-mnist") or text.startswith(("fashion-mnist:", "corpus:"))


def _subset(available: int, n: int, seed: int, what: str) -> np.ndarray:
    if n < 1:
        raise TmergeError(f"the number of images must be at least 1, got {n}")
    if n > available:
        raise TmergeError(f"{what} has {available} images, asked for {n}")
    if n == available:
        return np.arange(available)
    return np.sort(np.random.default_rng(seed).choice(available, size=n, replace=False))
