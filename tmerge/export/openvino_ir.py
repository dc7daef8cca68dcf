"""OpenVINO IR (``.xml`` + ``.bin``) from the verified ONNX graph, verified again as IR.

Flow (``tmerge export --format openvino --out m.xml``): export and verify the portable ONNX graph
(ONNX Runtime and OpenVINO, see :mod:`.verify`; written beside the IR as ``m.onnx``), read it with
OpenVINO's ONNX frontend, save it as IR with f32 weights (``compress_to_fp16=False``: the IR is the verified fp32
model), run the IR in OpenVINO with f32 inference precision the way deployments do (default threads
and 2 threads, ``RUNS`` runs per session, bit-identical and within atol of PyTorch), then write
``m.xml``, ``m.bin`` and the manifest ``m.xml.json`` atomically.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from torch import nn

from .. import runtime
from .._io import write_files
from ..errors import VerificationError
from ..models.forward import input_shape as model_input_shape
from ..runtime.openvino import read_model
from .manifest import ExportResult, manifest_bytes, manifest_path
from .verify import RUNS, THREADS, fixed_inputs, repeat_check, repeat_message, torch_reference

IR_SUFFIXES = (".xml",)


def export_ir(onnx_result: ExportResult, model: nn.Module, out_path: Path, *, atol: float = 1e-4,
              precision: str = "f32") -> ExportResult:
    """Convert the verified portable ONNX export ``onnx_result`` of ``model`` to an IR at ``out_path``
    (+ ``.bin`` and ``.json``), verify the IR and write it; an ExportResult for the IR."""
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="tmerge-ir-") as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(read_model(onnx_result.model_proto), str(xml), compress_to_fp16=False)
        files = {"xml": xml.read_bytes(), "bin": xml.with_suffix(".bin").read_bytes()}
        repeats, settings = [], []
        for threads in THREADS:
            runner = runtime.create("openvino", str(xml), threads=threads, precision=precision)
            settings.append(runner.settings())
            for check in _verified_inputs(onnx_result.parity):
                images = fixed_inputs(model_input_shape(model, check["batch"]), check["seed"])
                record = repeat_check(runner, images, torch_reference(model, images)[0].numpy(), runs=RUNS, atol=atol)
                record.update(runtime="openvino", device="cpu", batch=check["batch"], seed=check["seed"], file="ir")
                repeats.append(record)
                if not record["bit_identical"] or record["max_abs_diff"] > atol:
                    raise VerificationError("OpenVINO IR: " + repeat_message(record, atol))
    bin_path = out_path.with_suffix(".bin")
    manifest = dict(onnx_result.manifest)
    manifest.update(
        format="openvino", file=out_path.name, weights_file=bin_path.name, onnx_parity=onnx_result.parity,
        parity={"atol": atol, "dtype": "float32", "verified": True, "runs_per_session": RUNS, "repeats": repeats,
                "max_abs_diff": max(r["max_abs_diff"] for r in repeats)},
        openvino={"version": ov.get_version(), "precision_hint": precision, "weights": "f32 (compress_to_fp16=False)",
                  "converted_from": "the verified portable ONNX graph", "threads": settings},
    )
    manifest.pop("file_sha256", None)
    manifest.pop("file_bytes", None)
    json_path = manifest_path(out_path)
    write_files({bin_path: files["bin"], out_path: files["xml"], json_path: manifest_bytes(manifest)})
    return ExportResult(path=out_path, manifest_path=json_path, manifest=manifest, parity=manifest["parity"])


def _verified_inputs(parity: dict) -> list[dict]:
    """Per batch, the fixed input OpenVINO verified on the ONNX graph (a near-tie-free one)."""
    chosen: dict[int, dict] = {}
    for check in parity["checks"]:
        if check["runtime"] == "openvino" and check["verdict"].startswith("ok"):
            chosen.setdefault(check["batch"], check)
    if not chosen:
        raise VerificationError("OpenVINO did not verify the ONNX graph (is openvino installed?)")
    return list(chosen.values())
