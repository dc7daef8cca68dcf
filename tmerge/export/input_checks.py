"""Input checks of an export, all run before any work so that bad input writes nothing."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .._io import writable_file
from .._optional import require
from ..errors import TmergeError
from ..merging.ops import DEFAULT_FORM, check_form
from ..patch import merging_blocks
from ..plugins import spec as plugin_spec
from .manifest import manifest_path

MIN_OPSET = 18
GRAPH_FORMS = ("portable", "plugin")
FORMATS = ("onnx", "openvino", "trt")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def require_onnx():
    """onnx, onnxscript and onnxruntime (extra ``onnx``), or a one-line error."""
    return require("onnx", "onnxruntime", "onnxscript")


def check_opset(opset: int) -> int:
    onnx = require("onnx")
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TmergeError(f"--opset must be an integer, got {opset!r}")
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise TmergeError(
            f"opset {opset} is too old for this graph: the merge needs opset >= {MIN_OPSET} "
            "(ScatterElements with reduction, the dynamo exporter)"
        )
    if opset > newest:
        raise TmergeError(f"opset {opset} is newer than this onnx ({onnx.__version__}) knows: at most {newest}")
    return opset


def check_graph_form(graph: str) -> str:
    if graph not in GRAPH_FORMS:
        raise TmergeError(f"--graph must be one of {', '.join(GRAPH_FORMS)}, got {graph!r}")
    return graph


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise TmergeError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def merge_form_for(method: str, form: str | None = None, fmt: str = "onnx") -> str | None:
    """The merge form (:data:`tmerge.merging.ops.MERGE_FORMS`) an export of a ``method`` model merges
    with: ``form``, checked, or the format's default: "scatter" (ScatterElements(add), which
    TensorRT's parser supports with reduction) for ``trt``, else "gather" (no summing scatter: exact
    and bit-identical on every runtime and thread count). None for an unmerged model, which takes no form."""
    if method == "none":
        if form is not None:
            raise TmergeError("--merge-form applies to merged models; method 'none' merges nothing")
        return None
    if form is None:
        return "scatter" if fmt == "trt" else DEFAULT_FORM
    return check_form(form)


def check_batch(batch: int) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise TmergeError(f"--batch-size must be a positive integer, got {batch!r}")
    return batch


def check_atol(atol: float) -> float:
    if not atol > 0:
        raise TmergeError(f"atol must be > 0, got {atol!r}")
    return atol


def check_out_path(out: str | os.PathLike, suffixes: tuple[str, ...] = (".onnx",), what: str = "--out",
                   manifest: bool = True) -> Path:
    """Fail early (before any work) when ``out`` or, with ``manifest``, its manifest ``<out>.json``
    cannot be written; nothing is created. ``what`` names the option in messages."""
    path = writable_file(out, what, suffixes)
    if manifest:
        writable_file(manifest_path(path), f"the manifest of {what}")
    return path


def check_plugin_method(model: nn.Module) -> None:
    """The plugin graph needs a merge plugin for the model's method."""
    blocks = merging_blocks(model)
    if blocks is not None and blocks.method.name not in plugin_spec.OP_TYPES:
        raise TmergeError(f"method {blocks.method.name!r} has no merge plugin; use --graph portable")
