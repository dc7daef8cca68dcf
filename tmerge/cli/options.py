"""Options shared by every command that builds a merged model, and the glue that builds it."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from ..errors import TmergeError

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="timm model name; default: the embedded DINOv2 ViT-S/14 (dinov2-s14)")]
CheckpointOpt = Annotated[Optional[str], typer.Option("--checkpoint", help="state dict (.pth/.pt/.safetensors, timm keys) for --model")]
PretrainedOpt = Annotated[bool, typer.Option("--pretrained", help="download the timm hub weights (needs internet)")]
MethodOpt = Annotated[str, typer.Option("--method", help="merging method: tome, pitome, dtem, ltm, none")]
ROpt = Annotated[Optional[int], typer.Option("--r", "-r", help="tokens merged per block (constant)")]
InflectionOpt = Annotated[Optional[float], typer.Option("--inflection", help="with --r: ToMe's linear ramp around r, in [-1, 1]")]
ScheduleOpt = Annotated[Optional[str], typer.Option("--schedule", help="explicit per-block r, e.g. 16,16,8")]
KeepRatioOpt = Annotated[Optional[float], typer.Option("--keep-ratio", help="PiToMe-style: each block keeps this share of its tokens")]
PropAttnOpt = Annotated[Optional[bool], typer.Option("--prop-attn/--no-prop-attn", help="proportional attention (default: the method's)")]
MethodOptionsOpt = Annotated[Optional[list[str]], typer.Option("--option", "-o", help="method option KEY=VALUE (see `tmerge methods`); repeatable")]
AdapterOpt = Annotated[Optional[str], typer.Option("--adapter", help="trained DTEM/LTM adapter (.safetensors) from `tmerge train`")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]


def parse_key_values(items: str | list[str] | None, what: str, *, split_commas: bool = False) -> dict[str, Any]:
    """``["margin=0.9", "bsm_layers=6"]`` -> {"margin": 0.9, "bsm_layers": 6} (JSON values, else strings).

    With ``split_commas`` each item may hold several pairs: "img_size=32,patch_size=8".
    """
    if isinstance(items, str):
        items = [items]
    pairs = [p for item in items or [] for p in (item.split(",") if split_commas else [item]) if p.strip()]
    options: dict[str, Any] = {}
    for item in pairs:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TmergeError(f"{what} takes KEY=VALUE, got {item!r}")
        if key.strip() in options:
            raise TmergeError(f"{what} {key.strip()} is given twice")
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
    return options


def parse_method_options(items: list[str] | None) -> dict[str, Any]:
    """``-o KEY=VALUE`` method options."""
    return parse_key_values(items, "--option")


def schedule_kwargs(r: int | None, inflection: float | None, schedule: str | None, keep_ratio: float | None) -> dict:
    """CLI schedule flags -> keyword arguments of :func:`tmerge.apply`."""
    if inflection is not None:
        if r is None:
            raise TmergeError("--inflection needs --r")
        return {"r": (r, float(inflection))}
    return {"r": r, "schedule": schedule, "keep_ratio": keep_ratio}


def build_merged_model(
    model: str | None,
    checkpoint: str | None,
    pretrained: bool,
    method: str,
    r: int | None = None,
    inflection: float | None = None,
    schedule: str | None = None,
    keep_ratio: float | None = None,
    prop_attn: bool | None = None,
    options: list[str] | None = None,
    adapter: str | None = None,
    model_kwargs: dict | None = None,
    **apply_kwargs: Any,
):
    """Load the model (``model_kwargs`` go to timm) and patch it in place; eval mode."""
    from ..models import load_model

    net = load_model(model, checkpoint=checkpoint, pretrained=pretrained, **(model_kwargs or {}))
    return patch_model(net, method, r, inflection, schedule, keep_ratio, prop_attn, options, adapter, **apply_kwargs)


def patch_model(net, method: str, r=None, inflection=None, schedule=None, keep_ratio=None, prop_attn=None,
                options: list[str] | None = None, adapter: str | None = None, **apply_kwargs: Any):
    """Apply the CLI's method/schedule/options (and a trained adapter) to an already loaded model."""
    from .. import apply

    apply(net, method, prop_attn=prop_attn, **schedule_kwargs(r, inflection, schedule, keep_ratio),
          **parse_method_options(options), **apply_kwargs)
    if adapter is not None:
        from ..training.adapters import load_adapter

        load_adapter(net, adapter)
    return net.eval()
