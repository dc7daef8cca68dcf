"""Options shared by the commands, and their parsing into the library's typed values
(:class:`~tmerge.models.merged.MergeConfig`, keyword dicts, lists)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from ..errors import TmergeError
from ..models import DEFAULT_MODEL
from ..models.merged import MergeConfig
from ..runtime import find_backend

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help=f"timm model name; default: the embedded DINOv2 ViT-S/14 ({DEFAULT_MODEL})")]
ModelKwargsOpt = Annotated[Optional[str], typer.Option(
    "--model-kwargs", help="extra timm.create_model arguments, e.g. img_size=32,patch_size=8,depth=3")]
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
MergeFormOpt = Annotated[Optional[str], typer.Option(
    "--merge-form", help="ops the exported graph merges with: gather (default for onnx/openvino: exact and "
                         "deterministic on every runtime), scatter (ScatterElements, default for trt) or onehot "
                         "(one-hot matmul)")]
# measuring (profile, sweep)
BackendsOpt = Annotated[str, typer.Option("--backends", "--backend", help="comma list of torch, torch.compile, onnxruntime, openvino, tensorrt (aliases: eager, compile, ort, ov, trt)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda")]
BatchSizesOpt = Annotated[str, typer.Option("--batch-sizes", help="comma list of batch sizes, e.g. 1,8,32")]
WarmupOpt = Annotated[int, typer.Option("--warmup", help="untimed runs of each model before timing")]
ItersOpt = Annotated[int, typer.Option("--iters", help="timed runs of each model (interleaved)")]
ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", help="torch threads and ONNX Runtime intra-op threads (default: torch's, recorded)")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch backend: time torch.compile'd models")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", help="torch backends and drift: fp32, or fp16 / bf16 autocast (weights stay fp32)")]
CudaGraphsOpt = Annotated[bool, typer.Option(
    "--cuda-graphs/--no-cuda-graphs", help="torch backends on CUDA: capture each batch once and replay it")]
DataOpt = Annotated[str, typer.Option("--data", help="images: 'samples', 'fashion-mnist[:split]' or an ImageFolder dir")]
NumImagesOpt = Annotated[Optional[int], typer.Option("--num-images", help="images to load (default: the source's default)")]
NoDriftOpt = Annotated[bool, typer.Option("--no-drift", help="skip the drift measurement")]


def parse_int_list(text: str, what: str) -> list[int]:
    """"1,8,32" -> [1, 8, 32]; empty entries, non-integers and values below 1 are errors."""
    parts = [v.strip() for v in text.split(",")]
    try:
        values = [int(v) for v in parts]
    except ValueError:
        raise TmergeError(f"{what} takes a comma list of integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise TmergeError(f"{what} takes positive integers, got {text!r}")
    return values


def parse_float_list(text: str, what: str) -> list[float]:
    """"0.9,0.8" -> [0.9, 0.8]; empty entries and non-numbers are errors."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise TmergeError(f"{what} takes a comma list of numbers, got {text!r}") from None
    return values


def parse_backends(text: str) -> list[str]:
    """Registered backend names (aliases resolved, see :mod:`tmerge.runtime`); empty entries are errors."""
    return list(dict.fromkeys(find_backend(b).name for b in text.split(",")))


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


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """``--model-kwargs img_size=32,patch_size=8`` -> {"img_size": 32, "patch_size": 8}."""
    return parse_key_values(text, "--model-kwargs", split_commas=True)


def merge_config(method: str, r: int | None = None, inflection: float | None = None, schedule: str | None = None,
                 keep_ratio: float | None = None, prop_attn: bool | None = None, option: list[str] | None = None,
                 adapter: str | None = None, merge_form: str | None = None) -> MergeConfig:
    """The merge flags of a command as a :class:`MergeConfig`."""
    return MergeConfig(method=method, r=r, inflection=inflection, schedule=schedule, keep_ratio=keep_ratio,
                       prop_attn=prop_attn, options=parse_method_options(option), adapter=adapter,
                       merge_form=merge_form)
