"""Export a (merged) timm ViT: ONNX in a portable or a plugin graph form, verified against PyTorch
before it is written, plus its manifest; optionally a TensorRT engine built from the plugin graph.

* ``graph="portable"``: standard ONNX ops only (TopK, ArgMax, GatherElements, ScatterElements /
  ScatterND (add), CumSum, ...): runs in any ONNX runtime.
* ``graph="plugin"``: every merge is a single node ``tmerge::BipartiteMerge`` (ToMe, DTEM) or
  ``tmerge::PiToMeMerge`` carrying ``plugin_namespace="tmerge"``, ``plugin_version="1"``, ``r`` and
  the method's parameters (see :mod:`tmerge.plugins.spec`), plus an ONNX local function of the same
  name whose body is the portable merge (:mod:`.plugin_nodes`).

Verification (:mod:`.verify`) runs a graph that also outputs every layer's slots (where each token
went; :mod:`.instrument`), compares outputs and chosen indices with PyTorch, then strips the slot
outputs (:mod:`.graph`) and checks the final graph once more before it is written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Any

from torch import nn

from .. import runtime
from .._io import check_distinct, write_files
from ..errors import TmergeError, VerificationError, first_line
from ..models import DEFAULT_MODEL, check_batch_fits
from ..models import model_label as label_of
from ..models.merged import MergeConfig, build_merged_model
from ..runtime.tensorrt import require_tensorrt
from .graph import strip_slots
from .input_checks import (
    ENGINE_SUFFIXES,
    check_atol,
    check_batch,
    check_format,
    check_graph_form,
    check_opset,
    check_out_path,
    check_plugin_method,
    require_onnx,
)
from .instrument import build_graph
from .manifest import ExportResult, build_manifest, manifest_bytes, manifest_path
from .openvino_ir import IR_SUFFIXES, export_ir
from .trt_engine import export_engine
from .verify import VERIFIED_RUNTIMES, verify_graph


def export_onnx(
    model: nn.Module,
    out_path: str | os.PathLike,
    *,
    batch_size: int = 2,
    dynamic_batch: bool = True,
    opset: int = 18,
    graph: str = "portable",
    verify: bool = True,
    atol: float = 1e-4,
    model_name: str | None = None,
    source: dict | None = None,
) -> ExportResult:
    """Export a patched (or plain) timm ViT in eval mode to ONNX, verify it in ONNX Runtime against
    PyTorch, and write ``out_path`` plus the manifest ``<out_path>.json`` atomically.

    ``model_name`` labels the model in the manifest; ``source`` (``model_name``, ``checkpoint``,
    ``pretrained``, ``adapter``, ``model_kwargs``) records how to rebuild it. Raises :class:`TmergeError` (bad input,
    nothing done) or :class:`VerificationError` (the graph does not match PyTorch; nothing written).
    """
    onnx = require_onnx()
    path = check_out_path(out_path)
    check_opset(opset)
    check_graph_form(graph)
    check_batch(batch_size)
    check_atol(atol)
    if graph == "plugin":
        check_plugin_method(model)
    model.eval()
    t0 = time.perf_counter()
    proto, merged_layers = build_graph(model, graph=graph, batch_size=batch_size, dynamic_batch=dynamic_batch,
                                       opset=opset, with_slots=True)
    export_s = time.perf_counter() - t0
    final = strip_slots(proto)
    try:
        onnx.checker.check_model(final, full_check=True)
    except Exception as e:
        raise VerificationError(f"the exported graph fails onnx.checker: {first_line(e)}") from e
    if verify:
        parity = verify_graph(model, proto, final, merged_layers=merged_layers, batch_size=batch_size,
                              dynamic_batch=dynamic_batch, atol=atol,
                              runtimes=("onnxruntime",) if graph == "plugin" else VERIFIED_RUNTIMES)
    else:
        parity = {"verified": False}
    parity["export_seconds"] = round(export_s, 2)
    manifest = build_manifest(model, model_label=model_name, graph=graph, opset=opset, batch_size=batch_size,
                              dynamic_batch=dynamic_batch, parity=parity, proto=final, path=path,
                              **(source or {}))
    data = final.SerializeToString()
    manifest.file_sha256 = hashlib.sha256(data).hexdigest()
    manifest.file_bytes = len(data)
    json_path = manifest_path(path)
    write_files({path: data, json_path: manifest_bytes(manifest)})
    return ExportResult(path=path, manifest_path=json_path, manifest=manifest.as_dict(), parity=parity,
                        model_proto=final)


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
    graph: str | None = None,
    batch: int = 2,
    dynamic_batch: bool = True,
    opset: int = 18,
    format: str = "onnx",  # noqa: A002  (mirrors --format)
    fp16: bool = False,
    *,
    inflection: float | None = None,
    adapter: str | None = None,
    max_batch: int | None = None,
    atol: float = 1e-4,
    merge_form: str | None = None,
    merge: MergeConfig | None = None,
    model_kwargs: dict | None = None,
) -> ExportResult:
    """Load a model, merge it, export it and verify it; what ``tmerge export`` runs.

    The merge is ``merge`` when given, else built from ``method``, ``r`` (an int or an
    ``(r, inflection)`` pair), ``inflection``, ``schedule``, ``keep_ratio``, ``prop_attn``,
    ``method_options``, ``adapter`` and ``merge_form``; ``model_kwargs`` go to ``timm.create_model``. ``merge_form`` (see
    :func:`tmerge.merging.ops.merge_tokens`) defaults to ``"gather"`` (no summing scatter: exact and
    bit-identical on every runtime and thread count) for ONNX and OpenVINO and to ``"scatter"`` (ScatterElements(add), which
    TensorRT's parser supports with reduction) for TensorRT. ``graph`` defaults to "portable" for
    ONNX and "plugin" for TensorRT. ``format="onnx"`` writes ``out`` (+ ``out.json``).
    ``format="openvino"`` exports and verifies the portable ONNX beside ``out`` (same stem,
    ``.onnx``), converts it to an OpenVINO IR ``out`` (.xml + .bin, f32) and verifies that again.
    ``format="trt"`` exports the plugin ONNX beside ``out`` (same stem, ``.onnx``), then builds and
    checks a TensorRT engine at ``out`` (needs TensorRT >= 10.9 and an NVIDIA GPU). Every input
    problem is a :class:`TmergeError` raised before anything is written; a failed parity check is a
    ``VerificationError``.
    """
    check_format(format)
    graph = check_graph_form(graph or ("plugin" if format == "trt" else "portable"))
    if out is None:
        raise TmergeError("--out is required")
    check_batch(batch)
    require_onnx()
    check_opset(opset)
    if format in ("onnx", "openvino") and fp16:
        raise TmergeError(f"--fp16 applies to --format trt ({format} exports are verified in fp32)")
    if format == "onnx":
        out_path = onnx_path = check_out_path(out)
    elif format == "openvino":
        out_path = check_out_path(out, IR_SUFFIXES)
        check_out_path(out_path.with_suffix(".bin"), (".bin",), manifest=False)
        onnx_path = check_out_path(out_path.with_suffix(".onnx"))
        if graph != "portable":
            raise TmergeError("--format openvino converts the portable graph: use --graph portable (the default)")
        runtime.check_backend("openvino")
    else:
        out_path = check_out_path(out, ENGINE_SUFFIXES)
        onnx_path = check_out_path(out_path.with_suffix(".onnx"))
        if graph != "plugin":
            raise TmergeError("--format trt builds from the plugin graph: use --graph plugin (the default with "
                              "--format trt)")
        require_tensorrt()
    if merge is None:
        if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
            r, inflection = r
        merge = MergeConfig(method=method, r=r, inflection=inflection, schedule=schedule, keep_ratio=keep_ratio,
                            prop_attn=prop_attn, options=dict(method_options or {}), adapter=adapter,
                            merge_form=merge_form)
    if merge.merge_form is None:
        merge = dataclasses.replace(merge, merge_form="scatter" if format == "trt" else "gather")
    check_distinct({"--out": out_path, "the ONNX file": onnx_path, "the manifest": manifest_path(out_path),
                    "the ONNX manifest": manifest_path(onnx_path)},
                   {"--checkpoint": checkpoint, "--adapter": merge.adapter})
    model = build_merged_model(model_name, merge.check(), checkpoint=None if checkpoint is None else str(checkpoint),
                               pretrained=pretrained, model_kwargs=model_kwargs)
    check_batch_fits(model, batch, "--batch-size")
    # absolute paths: the manifest is read from wherever the export is used, not where it was made
    source = {"model_name": model_name or DEFAULT_MODEL,
              "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
              "pretrained": bool(pretrained), "adapter": str(Path(merge.adapter).resolve()) if merge.adapter else None,
              "model_kwargs": model_kwargs or None}
    result = export_onnx(model, onnx_path, batch_size=batch, dynamic_batch=dynamic_batch or format == "trt",
                         opset=opset, graph=graph, atol=atol, model_name=label_of(model_name, checkpoint),
                         source=source)
    if format == "trt":
        return export_engine(result, model, out_path, batch=batch, max_batch=max_batch, fp16=fp16)
    if format == "openvino":
        return export_ir(result, model, out_path, atol=atol)
    return result
