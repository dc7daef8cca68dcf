"""Memory estimates: a one-line error before a forward (or a batch of images) that cannot fit."""

from __future__ import annotations

from torch import nn

from ..errors import TmergeError
from .forward import DEFAULT_IMG_SIZE


def check_batch_fits(model: nn.Module, batch_size: int, what: str = "--batch-sizes") -> None:
    """A one-line error when a forward at ``batch_size`` cannot fit in the memory available now.

    Estimate per image: the input, the activations a block keeps alive (about 16 token-width
    tensors: qkv, attention output, residuals, the 4x MLP hidden layer) and the attention matrix.
    """
    pe = model.patch_embed
    h, w = pe.img_size if getattr(pe, "img_size", None) is not None else (DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE)
    tokens = pe.num_patches + int(getattr(model, "num_prefix_tokens", 0))
    width = int(getattr(model, "embed_dim", 768))
    heads = int(getattr(model.blocks[0].attn, "num_heads", 1)) if len(model.blocks) else 1
    per_image = 4 * (3 * h * w + 16 * tokens * width + 2 * heads * tokens * tokens)
    need = batch_size * per_image
    available = available_memory()
    if available is not None and need > available:
        raise TmergeError(f"{what} {batch_size} needs about {need / 2**30:.1f} GiB for one forward of this model; "
                          f"{available / 2**30:.1f} GiB of memory is available")


def check_images_fit(n: int, model: nn.Module) -> None:
    """A one-line error when ``n`` preprocessed images cannot fit in the memory available now."""
    if n < 1:
        raise TmergeError(f"the number of images must be at least 1, got {n}")
    pe = getattr(model, "patch_embed", None)
    h, w = getattr(pe, "img_size", None) or (DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE)
    need = n * 3 * h * w * 4
    available = available_memory()
    if available is not None and need > available:
        raise TmergeError(f"{n} images of {h}x{w} need about {need / 2**30:.1f} GiB; "
                          f"{available / 2**30:.1f} GiB of memory is available")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
