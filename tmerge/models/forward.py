"""Facts about a loaded timm ViT that every layer needs: its input shape and its forward up to the
pooled pre-logits features (what a classifier head, a linear probe or a distillation loss reads)."""

from __future__ import annotations

from torch import Tensor, nn

DEFAULT_IMG_SIZE = 224  # timm's ViT input size; also the embedded default model's (its ONNX graph's)


def input_shape(model: nn.Module, batch: int = 1) -> tuple[int, int, int, int]:
    """(batch, channels, height, width) the model was built for."""
    patch_embed = model.patch_embed
    size = patch_embed.img_size
    if size is None:
        size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE))[1:])
    channels = getattr(patch_embed.proj, "in_channels", 3)
    return (batch, int(channels), int(size[0]), int(size[1]))


def has_classifier(model: nn.Module) -> bool:
    """Class logits (``num_classes > 0``); else the model's output is its feature vector."""
    return int(getattr(model, "num_classes", 0) or 0) > 0


def forward_with_features(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(output, pooled pre-logits features) of one forward; output = logits, or the features of a
    headless model."""
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    if not has_classifier(model):
        return features, features
    return model.head(model.head_drop(features)), features
