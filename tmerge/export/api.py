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

from torch import nn

from .. import runtime
from .._io import check_distinct, write_files
from ..config import MergeConfig
from ..errors import TmergeError, VerificationError, first_line
from ..models import check_batch_fits
from ..models.merged import build_merged_model
from ..models.spec import ModelSpec
from ..patch import merge_info, using_merge_form
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
    merge_form_for,
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
    merge_form: str | None = None,
) -> ExportResult:
    """Export a patched (or plain) timm ViT in eval mode to ONNX, verify it in ONNX Runtime against
    PyTorch, and write ``out_path`` plus the manifest ``<out_path>.json`` atomically.

    ``merge_form``: the ops the graph merges with (see :func:`tmerge.merging.ops.merge_tokens` and
    :func:`~tmerge.export.input_checks.merge_form_for`; default "gather"); the PyTorch side of the parity
    check merges with the same ops. ``model_name`` labels the model in the manifest; ``source``
    (``model_name``, ``checkpoint``, ``pretrained``, ``model_kwargs``) records how to rebuild it.
    Raises :class:`TmergeError` (bad input, nothing done) or :class:`VerificationError` (the graph
    does not match PyTorch; nothing written).
    """
    onnx = require_onnx()
    path = check_out_path(out_path)
    check_opset(opset)
    check_graph_form(graph)
    check_batch(batch_size)
    check_atol(atol)
    merge_form = merge_form_for(merge_info(model)["method"], merge_form)
    if graph == "plugin":
        check_plugin_method(model)
    model.eval()
    with using_merge_form(model, merge_form):
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
                              merge_form=merge_form, **(source or {}))
    data = final.SerializeToString()
    manifest.file_sha256 = hashlib.sha256(data).hexdigest()
    manifest.file_bytes = len(data)
    json_path = manifest_path(path)
    write_files({path: data, json_path: manifest_bytes(manifest)})
    return ExportResult(path=path, manifest_path=json_path, manifest=manifest.as_dict(), parity=parity,
                        model_proto=final)


def export(
    merge: MergeConfig,
    *,
    model: ModelSpec | None = None,
    out: str | os.PathLike | None = None,
    graph: str | None = None,
    batch: int = 2,
    dynamic_batch: bool = True,
    opset: int = 18,
    format: str = "onnx",  # noqa: A002  (mirrors --format)
    fp16: bool = False,
    max_batch: int | None = None,
    atol: float = 1e-4,
    merge_form: str | None = None,
) -> ExportResult:
    """Load ``model`` (default: the embedded default model), merge it as ``merge`` says, export it and
    verify it; what ``tmerge export`` runs.

    ``merge_form`` (see :func:`tmerge.merging.ops.merge_tokens`) defaults to ``"gather"`` (no summing
    scatter: exact and bit-identical on every runtime and thread count) for ONNX and OpenVINO and to
    ``"scatter"`` (ScatterElements(add), which TensorRT's parser supports with reduction) for
    TensorRT. ``graph`` defaults to "portable" for ONNX and "plugin" for TensorRT.
    ``format="onnx"`` writes ``out`` (+ ``out.json``).
    ``format="openvino"`` exports and verifies the portable ONNX beside ``out`` (same stem,
    ``.onnx``), converts it to an OpenVINO IR ``out`` (.xml + .bin, f32) and verifies that again.
    ``format="trt"`` exports the plugin ONNX beside ``out`` (same stem, ``.onnx``), then builds and
    checks a TensorRT engine at ``out`` (needs TensorRT >= 10.9 and an NVIDIA GPU). Every input
    problem is a :class:`TmergeError` raised before anything is written; a failed parity check is a
    ``VerificationError``.
    """
    model = model or ModelSpec()
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
    merge_form = merge_form_for(merge.method, merge_form, format)
    check_distinct({"--out": out_path, "the ONNX file": onnx_path, "the manifest": manifest_path(out_path),
                    "the ONNX manifest": manifest_path(onnx_path)},
                   {"--checkpoint": model.checkpoint, "--adapter": merge.adapter_path})
    if merge.adapter_path is not None:  # absolute: the manifest is read from wherever the export is used
        merge = dataclasses.replace(merge, adapter=str(Path(merge.adapter_path).resolve()))
    net = build_merged_model(model, merge)
    check_batch_fits(net, batch, "--batch-size")
    # absolute paths: the manifest is read from wherever the export is used, not where it was made
    source = {"model_name": model.display_name,
              "checkpoint": str(Path(model.checkpoint).resolve()) if model.checkpoint else None,
              "pretrained": bool(model.pretrained), "model_kwargs": dict(model.kwargs) or None}
    with using_merge_form(net, merge_form):  # the engine and IR checks compare with the same merge ops
        result = export_onnx(net, onnx_path, batch_size=batch, dynamic_batch=dynamic_batch or format == "trt",
                             opset=opset, graph=graph, atol=atol, model_name=model.label, source=source,
                             merge_form=merge_form)
        if format == "trt":
            return export_engine(result, net, out_path, batch=batch, max_batch=max_batch, fp16=fp16)
        if format == "openvino":
            return export_ir(result, net, out_path, atol=atol)
    return result
