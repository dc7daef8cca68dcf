"""Folders of images: the files (with labels when the folder has the ImageFolder layout), and
image files decoded as 8-bit RGB with the meaning of their values kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import TmergeError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def image_folder(path: str | Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """The image files of a folder, with labels when it has the ImageFolder layout.

    Sub-folders that contain images (at any depth) are the classes, in sorted order; loose images
    beside them are then ignored. Without such sub-folders, the folder's own images, unlabelled.
    """
    root = Path(path)
    if not root.is_dir():
        raise TmergeError(f"{root} is not a folder of images")

    def images_in(folder: Path, recursive: bool) -> list[Path]:
        try:
            entries = folder.rglob("*") if recursive else folder.iterdir()
            return sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES
                          and not p.name.startswith(".") and p.is_file())
        except OSError as e:
            raise TmergeError(f"cannot list {folder}: {e}") from e

    try:
        subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise TmergeError(f"cannot list {root}: {e}") from e
    classes = [(d.name, images_in(d, recursive=True)) for d in subfolders]
    classes = [(name, files) for name, files in classes if files]
    if classes:
        files = [f for _name, class_files in classes for f in class_files]
        labels = [index for index, (_name, class_files) in enumerate(classes) for _ in class_files]
        return files, labels, [name for name, _files in classes]
    files = images_in(root, recursive=False)
    if not files:
        raise TmergeError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
    return files, None, None


# modes PIL converts to RGB without losing what the values mean (8 bits per channel, palette, CMYK, ...)
_CONVERTIBLE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def to_rgb(image, name: str = "image"):
    """``image`` (PIL) as 8-bit RGB with the meaning of its values kept. PIL's own ``convert("RGB")``
    clips 16-bit and float greyscale to 0..255, which turns a normal photo almost white; here 16-bit
    ("I;16*", or "I" with values up to 65535) is scaled from 0..65535 and float ("F") from 0..1.
    Anything else (32-bit integers, floats outside 0..1, unknown modes) is a TmergeError."""
    from PIL import Image

    mode = image.mode
    if mode in _CONVERTIBLE_MODES:
        return image.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        full_scale = 1.0 if mode == "F" else 65535.0
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= full_scale):
            kind = "float" if mode == "F" else "integer"
            raise TmergeError(f"{name}: {kind} greyscale values outside 0..{full_scale:g} (mode {mode}); "
                              "save it as an 8-bit or 16-bit image")
        grey = np.round(values * (255.0 / full_scale)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    raise TmergeError(f"{name}: image mode {mode} is not supported; save it as 8-bit RGB")


def open_image(path: Path):
    """An image file as 8-bit RGB (see :func:`to_rgb`); unreadable files are a TmergeError."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image, f"image {path}")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise TmergeError(f"cannot read image {path}: {e}") from e
