"""Helpers shared by the tests: tiny random-init ViTs. ``import tmerge`` first (before timm)."""

from __future__ import annotations

import tmerge  # noqa: F401  (before timm)
import timm
import torch

TINY = dict(pretrained=False, img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3, num_classes=10)

# name -> extra timm kwargs for the tiny variants every core test runs on
TINY_VARIANTS = {
    "plain": ("vit_tiny_patch16_224", {}),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "layerscale": ("vit_tiny_patch16_224", {"init_values": 0.1, "qk_norm": True}),
    "avgpool": ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False, "fc_norm": True}),
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 4}),
}


def tiny_vit(variant: str = "plain", seed: int = 0, **overrides) -> torch.nn.Module:
    """A random-init 3-block ViT on 32x32 inputs (16 patches): fast enough for every test."""
    name, extra = TINY_VARIANTS[variant]
    torch.manual_seed(seed)
    return timm.create_model(name, **{**TINY, **extra, **overrides}).eval()
