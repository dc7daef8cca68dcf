"""Images as the model expects them: timm's eval transform for the model, seeded random views
(crop and flip) of a photo, and progress reporting while a set of images is prepared."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from torch import nn

from .. import _compat  # noqa: F401  (must precede the timm import)
from ..models.forward import input_shape


def data_config(model: nn.Module) -> dict:
    """timm's data config for ``model``, with the input size a fixed-size ViT was built for.

    timm takes the input size from the pretrained config, which does not follow an ``img_size``
    passed to create_model; a ViT without dynamic image size only runs at its own size.
    """
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    fixed_size = getattr(getattr(model, "patch_embed", None), "img_size", None) is not None
    if fixed_size and not getattr(model, "dynamic_img_size", False):
        config["input_size"] = input_shape(model)[1:]
    return config


def model_transform(model: nn.Module) -> Callable:
    """PIL image -> normalised (3, H, W) tensor, as the model's eval transform does it."""
    from timm.data import create_transform

    transform = create_transform(**data_config(model))
    return lambda image: transform(image.convert("RGB"))


def random_view(photo, rng: np.random.Generator):
    """A random crop of ``photo`` (PIL): position, area (30-100%) and aspect ratio (3:4 to 4:3) drawn
    from ``rng``, flipped left-right half the time."""
    from PIL import Image

    width, height = photo.size
    area = rng.uniform(0.3, 1.0) * width * height
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(width, max(1, round(math.sqrt(area * aspect))))
    h = min(height, max(1, round(math.sqrt(area / aspect))))
    left = int(rng.integers(0, width - w + 1))
    top = int(rng.integers(0, height - h + 1))
    view = photo.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return view


def report_progress(progress: Callable[[int, int], None] | None, done: int, total: int, every: int = 64) -> None:
    """Call ``progress(done, total)`` every ``every`` images and at the end."""
    if progress is not None and (done % every == 0 or done == total):
        progress(done, total)
