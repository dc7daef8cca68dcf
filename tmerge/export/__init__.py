"""Export merged models: :func:`export` (load, merge, export, verify; what ``tmerge export`` runs)
and :func:`export_onnx` (an already merged model) in :mod:`.api`; input checks (:mod:`.input_checks`);
the merge step while exporting and the graph it builds (:mod:`.instrument`); ONNX plumbing and
surgery (:mod:`.graph`); plugin merge nodes and their function bodies (:mod:`.plugin_nodes`); the
manifest (:mod:`.manifest`); parity with PyTorch (:mod:`.verify`); OpenVINO IR (:mod:`.openvino_ir`);
TensorRT engines (:mod:`.trt_engine`)."""

from __future__ import annotations

from .api import ExportResult, export, export_onnx
from .input_checks import FORMATS, GRAPH_FORMS
from .manifest import Manifest, read_manifest

__all__ = ["ExportResult", "FORMATS", "GRAPH_FORMS", "Manifest", "export",
           "export_onnx", "read_manifest"]
