"""Export merged models: ONNX (portable / plugin nodes, :mod:`.onnx`), verified against PyTorch
(:mod:`.verify`), and TensorRT engines (:mod:`.tensorrt`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import TmergeError
from .onnx import ExportResult, export_onnx

FORMATS = ("onnx", "trt")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def export(
    model_name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    method: str = "tome",
    r: Any = None,
    schedule: Any = None,
    keep_ratio: float | None = None,
    prop_attn: bool | None = None,
    method_options: dict | None = None,
    out: str | os.PathLike | None = None,
    ops: str | None = None,
    batch: int = 2,
    dynamic_batch: bool = False,
    opset: int = 18,
    format: str = "onnx",  # noqa: A002  (mirrors --format)
    fp16: bool = False,
    *,
    inflection: float | None = None,
    adapter: str | None = None,
    max_batch: int | None = None,
    atol: float = 1e-4,
    merge_form: str | None = None,
) -> ExportResult:
    """Load a model, merge it, export it and verify it; what ``tmerge export`` runs.

    ``merge_form`` (see :func:`tmerge.merging.ops.merge_tokens`) defaults to ``"scatter_nd"``
    (ScatterND(add) over token rows, the fastest in ONNX Runtime) for ONNX and to ``"scatter"``
    (ScatterElements(add), which TensorRT's parser supports with reduction) for TensorRT.
    ``ops`` defaults to "portable" for ONNX and "plugin" for TensorRT. ``format="onnx"`` writes ``out`` (+ ``out.json``). ``format="trt"`` exports the plugin ONNX
    beside ``out`` (same stem, ``.onnx``), then builds and checks a TensorRT engine at ``out``
    (needs TensorRT >= 10.9 and an NVIDIA GPU). Every input problem is a :class:`TmergeError`
    raised before anything is written; a failed parity check is a ``VerificationError``.
    """
    from .onnx import _require_onnx, check_opset, check_out_path, OPS_FORMS

    if format not in FORMATS:
        raise TmergeError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if ops is None:
        ops = "plugin" if format == "trt" else "portable"
    if ops not in OPS_FORMS:
        raise TmergeError(f"--ops must be one of {', '.join(OPS_FORMS)}, got {ops!r}")
    if out is None:
        raise TmergeError("--out is required")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise TmergeError(f"--batch must be a positive integer, got {batch!r}")
    _require_onnx()
    check_opset(opset)
    if format == "onnx":
        if fp16:
            raise TmergeError("--fp16 applies to --format trt (ONNX exports are verified in fp32)")
        out_path = check_out_path(out)
        onnx_path = out_path
    else:
        out_path = check_out_path(out, ENGINE_SUFFIXES)
        onnx_path = check_out_path(out_path.with_suffix(".onnx"))
        if ops != "plugin":
            raise TmergeError("--format trt builds from the plugin graph: use --ops plugin (the default with --format trt)")
        from .tensorrt import require_tensorrt

        require_tensorrt()
    if method != "none":
        from ..merging import registry

        registry.get(method)  # unknown method: fail before loading anything

    if merge_form is None:
        merge_form = "scatter" if format == "trt" else "scatter_nd"
    model = _build(model_name, checkpoint, pretrained, method, r, inflection, schedule, keep_ratio, prop_attn,
                   method_options, adapter, merge_form)
    from ..models import model_label

    label = model_label(model_name, checkpoint)
    extra = {"model_name": model_name or "dinov2-s14", "checkpoint": str(checkpoint) if checkpoint else None,
             "pretrained": bool(pretrained)}
    result = export_onnx(model, onnx_path, batch_size=batch, dynamic_batch=dynamic_batch or format == "trt",
                         opset=opset, ops=ops, atol=atol, model_name=label, extra_manifest=extra)
    if format == "trt":
        from .tensorrt import build_engine

        return build_engine(result, model, out_path, batch=batch, max_batch=max_batch, fp16=fp16)
    return result


def _build(model_name, checkpoint, pretrained, method, r, inflection, schedule, keep_ratio, prop_attn,
           method_options, adapter, merge_form="scatter_nd"):
    from ..cli.options import build_merged_model

    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        r, inflection = r
    options = [f"{k}={json.dumps(v)}" for k, v in (method_options or {}).items()]
    model = build_merged_model(model_name, None if checkpoint is None else str(checkpoint), pretrained, method,
                               r=r, inflection=inflection, schedule=schedule, keep_ratio=keep_ratio,
                               prop_attn=prop_attn, options=options, adapter=adapter,
                               **({} if method == "none" else {"merge_form": merge_form}))
    check_schedule_possible(model, model_name)
    return model


def check_schedule_possible(model, model_name: str | None = None) -> None:
    """An explicit schedule entry the model cannot do, or a constant r larger than the first
    block can merge, is an error; ToMe-style capping of late blocks (r=16 on 197 tokens) is kept
    and reported in the manifest."""
    from ..patch import merge_info

    info = merge_info(model)
    capped = info.get("capped") or []
    if not capped:
        return
    explicit = str(info.get("schedule") or "").startswith("list:")
    first = capped[0]
    if explicit or first["layer"] == 0:
        tokens = info["tokens"][first["layer"]]
        raise TmergeError(
            f"r={first['asked']} is impossible for {model_name or 'the model'} at block {first['layer']}: "
            f"{tokens} tokens allow at most {first['applied']}"
        )


__all__ = ["ExportResult", "FORMATS", "check_schedule_possible", "export", "export_onnx"]
