"""Options shared by the commands, and their parsing into the library's typed values
(:class:`~tmerge.config.MergeConfig`, :class:`~tmerge.models.spec.ModelSpec`, lists).

The merge flags and the model flags are option groups: :func:`merge_options` / :func:`model_options`
replace a command's ``merge: MergeConfig`` / ``model: ModelSpec`` parameter by the flags of
:data:`~tmerge.config.MERGE_FLAGS` / :data:`~tmerge.models.spec.MODEL_FLAGS` and hand the command
the value built from them.
"""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Any, Callable, Optional

import typer

from ..config import MERGE_FLAGS, Flag, MergeConfig
from ..errors import TmergeError
from ..models.spec import MODEL_FLAGS, ModelSpec
from ..runtime import find_backend

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
DataOpt = Annotated[str, typer.Option("--data", help="images: 'samples', 'fashion-mnist[:split]', 'corpus:train|tune|eval' or an ImageFolder dir")]
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


def _option_group(param: str, flags: tuple[Flag, ...], build: Callable[..., Any], *, skip: tuple[str, ...] = (),
                  overrides: dict[str, tuple[Any, str]] | None = None):
    """A decorator: the command's parameter ``param`` becomes ``flags`` (less ``skip``; ``overrides``:
    flag -> (default, help)) and is handed ``build(**their values)``."""
    chosen = [f for f in flags if f.param not in skip]

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        names = set(signature.parameters) - {param}
        clash = names & {f.param for f in chosen}
        if param not in signature.parameters or clash:
            raise TypeError(f"{command.__name__}: needs a parameter {param!r} and none named {sorted(clash)}")
        group = []
        for f in chosen:
            default, text = (overrides or {}).get(f.param, (f.default, f.help))
            group.append(inspect.Parameter(f.param, inspect.Parameter.KEYWORD_ONLY, default=default,
                                           annotation=Annotated[f.type, typer.Option(*f.names, help=text)]))
        params = []
        for p in signature.parameters.values():
            params += group if p.name == param else [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)]

        @functools.wraps(command)
        def run(**kwargs):
            values = {f.param: kwargs.pop(f.param) for f in chosen}
            return command(**kwargs, **{param: build(**values)})

        del run.__wrapped__  # typer reads the signature below, not the command's
        run.__signature__ = signature.replace(parameters=params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


def merge_options(*, adapter: bool = True, method: tuple[str, str] | None = None):
    """The merge flags (``--method --r --inflection --schedule --keep-ratio --prop-attn -o --adapter``)
    in place of the command's ``merge: MergeConfig`` parameter. ``adapter=False`` leaves out
    ``--adapter``; ``method``: another (default, help) for ``--method``."""
    return _option_group("merge", MERGE_FLAGS, MergeConfig.from_cli, skip=() if adapter else ("adapter",),
                         overrides={"method": method} if method else None)


def model_options(*, pretrained: bool = True):
    """The model flags (``--model --model-kwargs --checkpoint --pretrained``) in place of the
    command's ``model: ModelSpec`` parameter; ``pretrained=False`` leaves out ``--pretrained``."""
    return _option_group("model", MODEL_FLAGS, ModelSpec.from_cli, skip=() if pretrained else ("pretrained",))
