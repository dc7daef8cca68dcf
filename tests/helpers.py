"""Helpers shared by the tests: tiny random-init ViTs. ``import tmerge`` first (before timm)."""

from __future__ import annotations

import tmerge  # (before timm)
from tmerge import MergeConfig

import numpy as np
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


# ---------------------------------------------------------------------------------------------
# export tests: 2 blocks, 1000 classes; the same model by name for the CLI's --model-kwargs

EXPORT_ARCH = "vit_tiny_patch16_224"
# timm kwargs of the tiny export model, as the CLI's --model-kwargs takes them
TINY_EXPORT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
EXPORT_MODEL_KWARGS = ",".join(f"{k}={v}" for k, v in TINY_EXPORT.items())


def tiny_export_model(variant: str = "plain", method: str = "tome", seed: int = 0, **apply_kwargs) -> torch.nn.Module:
    model = tiny_vit(variant, seed=seed, depth=2, num_classes=1000)
    if method != "none":
        tmerge.apply(model, MergeConfig.of(method, **({"r": 3} | apply_kwargs)))
    return model


def run_ort(path, images: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": images.numpy()})[0]


def parse_merge_flags(flags: list[str]) -> tmerge.MergeConfig:
    """``flags`` through the command line's own parser and merge option group: the MergeConfig a
    command receives."""
    from tmerge.cli.options import merge_options

    import typer

    app = typer.Typer()
    seen = {}

    @app.command()
    @merge_options()
    def command(merge: tmerge.MergeConfig) -> None:
        seen["merge"] = merge

    typer.main.get_command(app).main(list(flags), standalone_mode=False)
    return seen["merge"]
