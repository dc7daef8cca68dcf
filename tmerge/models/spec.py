"""Which model to load, as one value: what the command line's model flags (:data:`MODEL_FLAGS`) become."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from torch import nn

from ..config import Flag, flag_value, parse_key_values
from .default_model import DEFAULT_MODEL
from .loading import load_model, model_label

# the flags ModelSpec.from_cli takes, in the order commands list them
MODEL_FLAGS = (
    Flag("model", ("--model", "-m"), Optional[str], None,
         f"timm model name; default: the embedded DINOv2 ViT-S/14 ({DEFAULT_MODEL})"),
    Flag("model_kwargs", ("--model-kwargs",), Optional[str], None,
         "extra timm.create_model arguments, e.g. img_size=32,patch_size=8,depth=3"),
    Flag("checkpoint", ("--checkpoint",), Optional[str], None, "state dict (.pth/.pt/.safetensors, timm keys) for --model"),
    Flag("pretrained", ("--pretrained",), bool, False, "download the timm hub weights (needs internet)"),
)


@dataclass(frozen=True)
class ModelSpec:
    """A model to load (see :func:`tmerge.models.load_model`): ``name`` (a timm name; None: the
    embedded default, ``dinov2-s14``), extra ``timm.create_model`` ``kwargs``, a local state dict
    ``checkpoint`` or the hub weights (``pretrained``)."""

    name: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: str | os.PathLike | None = None
    pretrained: bool = False

    @classmethod
    def from_cli(cls, model: str | None = None, model_kwargs: str | None = None, checkpoint: str | None = None,
                 pretrained: bool = False) -> ModelSpec:
        """The values of the model flags (``--model-kwargs img_size=32,patch_size=8``)."""
        return cls(model, parse_key_values(model_kwargs, "--model-kwargs", split_commas=True), checkpoint, pretrained)

    @property
    def display_name(self) -> str:
        """The name as asked for (the default's alias when none was)."""
        return self.name or DEFAULT_MODEL

    @property
    def label(self) -> str:
        """Human-readable, for reports (:func:`tmerge.models.model_label`)."""
        return model_label(self.name, self.checkpoint)

    def load(self, seed: int | None = 0) -> nn.Module:
        """The model in eval mode (``seed``: see :func:`tmerge.models.load_model`)."""
        return load_model(self.name, checkpoint=self.checkpoint, pretrained=self.pretrained, seed=seed,
                          **dict(self.kwargs))

    def as_flags(self) -> list[str]:
        """The command-line flags that name this model."""
        flags = ["--model", self.name] if self.name else []
        if self.kwargs:
            flags += ["--model-kwargs", ",".join(f"{k}={flag_value(v)}" for k, v in self.kwargs.items())]
        if self.checkpoint:
            flags += ["--checkpoint", str(self.checkpoint)]
        return flags + (["--pretrained"] if self.pretrained else [])
