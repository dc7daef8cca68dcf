"""TensorRT engines from the plugin ONNX graph (see :mod:`tmerge.plugins.trt` for the plugins).

Flow (``tmerge export --format trt``): export + verify the plugin ONNX in ONNX Runtime (written
beside the engine), register the merge plugins, parse the graph with ``trt.OnnxParser``, build
with an optimisation profile over the batch range (min 1, opt ``batch``, max ``max_batch``), fp32
(TF32 off, so fp32 parity means fp32) or ``--fp16``, check the engine against the PyTorch model
on fixed inputs, then write engine + manifest atomically. The merge layers run the plugins' JIT
implementation (the PyTorch merge core, called back from TensorRT), so the engine runs only where
Python, PyTorch and tmerge are installed and the plugins registered; the manifest says so
(``tensorrt.python_plugins``).

Parity criteria: fp32 max abs diff <= atol (1e-4, same as ONNX); fp16 cannot meet that, so it is
judged by cosine similarity of outputs >= 0.999 and the max abs diff is reported. A near-tie in
the matching can move fp16 outputs further; no tolerance is loosened for it.

TensorRT cannot be installed on our build machines, so no engine has been built or run there.
What is checked without it: the plugin definitions pass TensorRT's own registration and plugin
creation code (its pure-Python ``tensorrt.plugin`` layer, run on CPU in CI against pinned 10.x
releases, attributes encoded as the ONNX parser encodes them), the shape logic, the graph
preparation and the reference merge the plugin runs; and this whole flow (build, parity run, files)
through a stand-in ``tensorrt`` module on CPU, with host memory in place of the CUDA device
(:data:`tmerge.runtime.tensorrt.DEVICE`). ``import tensorrt`` is lazy; without it the CLI exits 2
with :data:`tmerge.plugins.trt.TRT_MISSING`.

Supported: TensorRT 10.9 - 10.x. TensorRT 11 removed ``BuilderFlag.FP16`` and builds every network
strongly typed, so ``--fp16`` would need an fp16 graph (casts in the ONNX export) instead of a builder
flag; until that exists the ``trt`` extra pins ``tensorrt<11`` and :func:`tmerge.runtime.tensorrt.require_tensorrt` refuses 11.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import runtime
from .._io import write_files
from ..errors import TmergeError, VerificationError
from ..models.forward import input_shape as model_input_shape
from ..runtime import tensorrt as engines
from .manifest import ExportResult, manifest_bytes, manifest_path
from .verify import fixed_inputs

FP16_MIN_COSINE = 0.999


def build_serialized_engine(onnx_proto, input_shape, *, batch: int, max_batch: int | None, fp16: bool,
                            workspace_gb: float = 4.0):
    """Parse the plugin graph and build a serialized engine (bytes, build info) with the one engine
    builder, :func:`tmerge.runtime.tensorrt.build_engine`."""
    try:
        return engines.build_engine(onnx_proto, input_shape, batch=batch, max_batch=max_batch, fp16=fp16,
                                    workspace_gb=workspace_gb)
    except TmergeError as e:
        raise VerificationError(str(e)) from e


def run_engine(engine_bytes: bytes, images: torch.Tensor) -> np.ndarray:
    """Run a serialized engine on one batch (CUDA), returning the first output as numpy."""
    return runtime.create("tensorrt", None, device="cuda", engine=engine_bytes).run(images)[0]


def engine_parity(engine_bytes: bytes, model: nn.Module, input_shape, *, fp16: bool, atol: float = 1e-4,
                  batches=(1,)) -> dict:
    checks = []
    for batch in batches:
        images = fixed_inputs((batch, *input_shape[1:]), 0)
        with torch.no_grad():
            ref = model(images).numpy()
        out = run_engine(engine_bytes, images)
        diff = float(np.abs(out - ref).max())
        cos = _cosine_min(out, ref)
        checks.append({"batch": batch, "max_abs_diff": diff, "cosine_min": cos})
        if (not fp16 and diff > atol) or (fp16 and cos < FP16_MIN_COSINE):
            raise VerificationError(
                f"TensorRT engine parity failed at batch {batch}: max abs diff {diff:.3g} (fp32 limit {atol:g}), "
                f"min cosine {cos:.5f} (fp16 limit {FP16_MIN_COSINE})"
            )
    return {"precision": "fp16" if fp16 else "fp32", "atol": None if fp16 else atol,
            "fp16_min_cosine": FP16_MIN_COSINE if fp16 else None, "checks": checks}


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    num = (a2 * b2).sum(-1)
    den = np.linalg.norm(a2, axis=-1) * np.linalg.norm(b2, axis=-1) + 1e-12
    return float((num / den).min())


def export_engine(onnx_result, model: nn.Module, out_path: Path, *, batch: int, max_batch: int | None = None,
                 fp16: bool = False):
    """Build, check and write the engine for an :class:`~tmerge.export.ExportResult` of the
    plugin graph. Returns an ExportResult for the engine (manifest ``<engine>.json``)."""
    import tensorrt as trt

    input_shape = model_input_shape(model, batch)
    engine_bytes, build_info = build_serialized_engine(onnx_result.model_proto, input_shape, batch=batch,
                                                       max_batch=max_batch, fp16=fp16)
    lo, opt, hi = build_info["profile"]["min"], build_info["profile"]["opt"], build_info["profile"]["max"]
    parity = engine_parity(engine_bytes, model, input_shape, fp16=fp16, batches=sorted({lo[0], opt[0], hi[0]}))
    manifest = dict(onnx_result.manifest)
    manifest.update(
        format="trt", file=out_path.name, onnx_file=onnx_result.path.name, onnx_parity=onnx_result.parity,
        parity=parity, tensorrt={"version": trt.__version__, "fp16": fp16, **build_info,
                                 "device": engines.DEVICE.name()},
    )
    json_path = manifest_path(out_path)
    write_files({out_path: engine_bytes, json_path: manifest_bytes(manifest)})
    return ExportResult(path=out_path, manifest_path=json_path, manifest=manifest, parity=parity)
