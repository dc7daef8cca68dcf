"""Which input patches end up in each token: trace merges through the blocks and draw the groups.

Inside ``model.blocks.recording_slots()`` every merging block keeps its plan's slots: for each token
entering the block, the index of the token it becomes (shape (B, N_l); None for blocks with r = 0).
Composing them maps every input patch to a token after each block. Prefix tokens (class,
distillation, registers: ``model.num_prefix_tokens``) are not patches and are left out. Soft plans
(slots of shape (B, N, K), e.g. LTM) are drawn by their first candidate.

Drawing follows the ToMe paper's figures: every group is filled with the mean colour of its pixels
and outlined. matplotlib is imported lazily (extra ``report``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._io import existing_file, writable_file, write_files
from .._optional import pyplot, require
from ..data.folders import open_image
from ..data.preprocess import data_config, model_transform
from ..data.samples import SAMPLE_PHOTOS, sample_images
from ..errors import TmergeError
from ..patch import merge_info, merging_blocks


@torch.no_grad()
def patch_groups(model: nn.Module, images: torch.Tensor) -> list[np.ndarray]:
    """Token index (after each block) of every patch: a list over blocks of int arrays (B, P).

    Entry ``l`` says which of the tokens leaving block ``l`` holds each of the P input patches; the
    patches holding one index form one group. Works on any model patched by :func:`tmerge.apply`
    (and on an unpatched one: every patch is its own group).
    """
    blocks = merging_blocks(model)
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))
    num_patches = int(model.patch_embed.num_patches)
    batch = images.shape[0]
    identity = torch.arange(num_prefix, num_prefix + num_patches).expand(batch, -1)
    if blocks is None:
        return [identity.numpy().copy() for _ in range(len(model.blocks))]
    model.eval()
    with blocks.recording_slots():
        model(images)
        plans = list(blocks.last_slots)
    where = identity.clone()  # (B, P): index of the token holding each patch
    out = []
    for slots in plans:
        if slots is not None:
            if slots.dim() == 3:  # soft plan: first candidate
                slots = slots[..., 0]
            where = torch.gather(slots.to(where.device), 1, where)
        out.append(where.numpy().copy())
    return out


def unnormalize(image: torch.Tensor, mean, std) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) float in [0, 1]."""
    m = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    return (image * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


def render_groups(image: np.ndarray, groups: np.ndarray, grid: tuple[int, int], *, style: str = "mean",
                  scale: int = 2, seed: int = 0) -> np.ndarray:
    """An (H*scale, W*scale, 3) picture of the groups over ``image`` (H, W, 3 in [0, 1]).

    ``groups``: (P,) token index per patch, row-major over ``grid`` (rows, cols). ``style``: "mean"
    fills each group with the mean colour of its pixels (ToMe's figures); "random" tints the image
    with a random colour per group. Boundaries between groups are drawn in white.
    """
    gh, gw = grid
    h, w = image.shape[:2]
    ph, pw = h // gh, w // gw
    gmap = np.asarray(groups).reshape(gh, gw)
    pix = np.kron(gmap, np.ones((ph, pw), dtype=gmap.dtype))  # (gh*ph, gw*pw)
    img = image[: gh * ph, : gw * pw]
    if scale > 1:
        img = img.repeat(scale, 0).repeat(scale, 1)
        pix = pix.repeat(scale, 0).repeat(scale, 1)
    ids, inverse = np.unique(pix, return_inverse=True)
    inverse = inverse.reshape(pix.shape)
    flat = img.reshape(-1, 3)
    if style == "mean":
        sums = np.zeros((len(ids), 3))
        np.add.at(sums, inverse.reshape(-1), flat)
        counts = np.bincount(inverse.reshape(-1), minlength=len(ids))[:, None]
        out = (sums / np.maximum(counts, 1))[inverse]
    elif style == "random":
        colours = np.random.default_rng(seed).uniform(0.15, 1.0, size=(len(ids), 3))
        out = 0.45 * img + 0.55 * colours[inverse]
    else:
        raise TmergeError(f"unknown style {style!r}; use mean or random")
    edge = np.zeros(pix.shape, dtype=bool)
    edge[:, 1:] |= pix[:, 1:] != pix[:, :-1]
    edge[1:, :] |= pix[1:, :] != pix[:-1, :]
    out = out.copy()
    out[edge] = 1.0
    return out.astype(np.float32)


def load_image_for(model: nn.Module, path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """(normalised (1, 3, H, W) input, (H, W, 3) display image) for an image file, or the name of a
    bundled sample photo ("astronaut", "chelsea", ...)."""
    p = Path(path)
    if not p.exists() and str(path) in SAMPLE_PHOTOS:
        pil = dict(sample_images())[str(path)]
    else:
        require("PIL.Image")
        pil = open_image(existing_file(p, "image"))
    x = model_transform(model)(pil).unsqueeze(0)
    cfg = data_config(model)
    return x, unnormalize(x[0], cfg["mean"], cfg["std"])


def visualize(model: nn.Module, image_path: str | Path, out: str | Path, *, per_layer: bool = False,
              layers: list[int] | None = None, style: str = "mean", title: str | None = None) -> dict:
    """Draw the patch groups of ``model`` (patched) on an image and save a PNG. Returns a summary:
    {out, layers, groups (number per drawn layer), tokens}."""
    plt = pyplot()
    out = writable_file(out, "--out", (".png",))
    depth = len(model.blocks)
    info = merge_info(model)
    if layers is None:
        layers = [l for l, r in enumerate(info["r"]) if r > 0] if per_layer else [depth - 1]
        layers = layers or [depth - 1]
    bad = [l for l in layers if not -depth <= l < depth]
    if bad:
        raise TmergeError(f"--layers {bad} out of range: the model has {depth} blocks (0..{depth - 1})")
    layers = [l % depth for l in layers]
    x, display = load_image_for(model, image_path)
    groups = patch_groups(model, x)
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    panels = [("input", display)] + [
        (f"after block {l} ({len(np.unique(groups[l][0]))} patch tokens)", render_groups(display, groups[l][0], grid, style=style))
        for l in layers
    ]
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, pic) in zip(axes.flat, panels):
        ax.imshow(pic)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title or f"{info['method']} {info.get('schedule') or ''}".strip(), fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)
    write_files({out: png.getvalue()})
    return {"out": str(out), "layers": layers, "groups": [int(len(np.unique(groups[l][0]))) for l in layers],
            "tokens": info.get("tokens"), "num_patches": int(model.patch_embed.num_patches)}
