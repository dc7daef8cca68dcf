"""sha256 digests that identify files and weights in manifests and cache keys."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ..patch import METHOD_ATTR


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """sha256 of the model's state dict: names, dtypes, shapes and bytes, in sorted key order.

    Identifies the weights in manifests and cache keys. Hash the unmerged model: learned merge
    modules that :func:`tmerge.apply` attaches add their own state-dict entries.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def backbone_sha256(model: nn.Module) -> str:
    """:func:`weights_sha256` of the model without its attached merge method
    (:func:`tmerge.patch.merge_method`, whose learned parameters DTEM/LTM add to the state dict)."""
    method = model._modules.pop(METHOD_ATTR, None)
    try:
        return weights_sha256(model)
    finally:
        if method is not None:
            model._modules[METHOD_ATTR] = method
