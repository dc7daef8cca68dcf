"""Sample photos: scikit-image's bundled pictures, and any number of seeded random views of them
(so a handful of real photos gives many distinct, unlabelled inputs)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .._optional import missing_extra
from ..errors import TmergeError
from .preprocess import model_transform, random_view, report_progress

if TYPE_CHECKING:
    from PIL import Image

SAMPLE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "stereo_motorcycle",
)
# more bundled scikit-image pictures (mostly greyscale), for training data only
EXTRA_PHOTOS = ("camera", "coins", "moon", "page", "text", "clock", "horse", "grass", "gravel", "brick", "cell",
                "colorwheel")
# beyond this many views of a handful of photos, more views add time, not information
MAX_SAMPLE_VIEWS = 4096


def sample_images(names: Sequence[str] = SAMPLE_PHOTOS) -> list[tuple[str, Image.Image]]:
    """scikit-image's bundled photos (default: the colour ones) as (name, RGB PIL image), in order."""
    return list(_load_sample_images(tuple(names)))


@functools.lru_cache(maxsize=2)
def _load_sample_images(names: tuple[str, ...]) -> tuple[tuple[str, Image.Image], ...]:
    try:
        import skimage.data
        from PIL import Image
    except ImportError as e:
        raise missing_extra("scikit-image", "data") from e
    photos = []
    for name in names:
        array = getattr(skimage.data, name)()
        if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
            array = array[0]
        photos.append((name, Image.fromarray(array).convert("RGB")))
    return tuple(photos)


def sample_views(n: int, model: nn.Module, seed: int = 0, photos: Sequence[str] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Tensor:
    """``n`` views of the sample photos as a (n, 3, H, W) batch for ``model``; the same for a seed.

    ``photos`` restricts the views to those sample photos (by name), e.g. to hold some out.

    View i is a :func:`~tmerge.data.preprocess.random_view` of photo i mod P (so every photo is
    used), then the model's transform.
    """
    if n < 1:
        raise TmergeError(f"the number of sample views must be at least 1, got {n}")
    if n > MAX_SAMPLE_VIEWS:
        raise TmergeError(f"{n} views of the sample photos asked for; at most {MAX_SAMPLE_VIEWS} (crops of a few "
                          "photos): use fashion-mnist or a folder of images for more")
    known = (*SAMPLE_PHOTOS, *EXTRA_PHOTOS)
    chosen = [image for name, image in sample_images(known if photos is not None else SAMPLE_PHOTOS)
              if photos is None or name in photos]
    if not chosen:
        raise TmergeError(f"none of the sample photos {list(photos or [])} exists; have {list(known)}")
    transform = model_transform(model)
    rng = np.random.default_rng(seed)
    views = []
    for i in range(n):
        views.append(transform(random_view(chosen[i % len(chosen)], rng)))
        report_progress(progress, i + 1, n)
    return torch.stack(views)
