"""``tmerge export --format trt`` and ``tmerge profile --backends tensorrt`` end to end on CPU.

TensorRT is the stand-in of :mod:`tests.plugins.tensorrt_standin` (with TensorRT's own
``tensorrt.plugin`` layer of each pinned release) and the CUDA device is its host-memory
``HostDevice``: everything else is tmerge's code as shipped. The stand-in records each call, and
its execution context computes the parsed graph from the memory at the addresses it was given and
writes the outputs at theirs, so a wrong shape, profile, flag, plugin, address or stream shows up
either in the recorded calls or in the parity tmerge checks.
"""

from __future__ import annotations

import base64
import json

from tests.helpers import EXPORT_ARCH, EXPORT_MODEL_KWARGS
from tmerge.cli import main
from tmerge.export.manifest import manifest_path
from tmerge.plugins import spec
from tmerge.runtime import tensorrt as engines

import pytest

from .conftest import VERSIONS

pytest.importorskip("onnxruntime")

ARGS = ["--model", EXPORT_ARCH, "--model-kwargs", EXPORT_MODEL_KWARGS, "--r", "3"]
IMAGES = (3, 32, 32)


@pytest.fixture
def trt(trt_layer, monkeypatch):
    """The stand-in tensorrt module, its calls cleared, with the engine I/O in host memory
    (the profile test, whose graphs have no plugins, runs on the newest pinned release only)."""
    trt, _ = trt_layer
    monkeypatch.setattr(engines, "DEVICE", trt.HostDevice())
    trt.CALLS.clear()
    return trt


def calls(trt, name: str) -> list[tuple]:
    return [tuple(args) for call, *args in trt.CALLS if call == name]


def check_runs(trt, batches: list[int], outputs: int = 1) -> None:
    """Each forward: the input and every output given an address, then execute_async_v3 on the
    runner's own stream with the batch's input shape, then that stream synchronised."""
    runs = [i for i, (call, *_) in enumerate(trt.CALLS) if call == "execute_async_v3"]
    assert [trt.CALLS[i][2]["images"] for i in runs] == [(b, *IMAGES) for b in batches]
    for i in runs:
        assert trt.CALLS[i][1] == trt.HostDevice.STREAM != 0  # not the default stream
        assert trt.CALLS[i + 1] == ("synchronize", trt.HostDevice.STREAM)
    addressed = {name for name, _ in calls(trt, "set_tensor_address")}
    assert "images" in addressed and len(addressed) == 1 + outputs


def test_export_trt_builds_checks_and_writes_the_engine(trt, tmp_path, capsys):
    out = tmp_path / "tiny.engine"
    rc = main(["export", *ARGS, "--format", "trt", "--batch-size", "2", "--max-batch", "4", "--out", str(out),
               "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err

    # the build: a plugin graph (no network flags: its nodes ask for the JIT plugin), the batch range
    # as the profile, TF32 off
    (flags,) = calls(trt, "create_network")
    assert flags == (0,)
    ((record,),) = calls(trt, "build_serialized_network")
    assert record["inputs"] == [["images", [-1, *IMAGES]]]
    assert record["profiles"] == [{"images": [[1, *IMAGES], [2, *IMAGES], [4, *IMAGES]]}]
    assert record["flags"] == [] and record["workspace"] == 4 << 30
    # every merging block is one plugin layer, resolved by the parser to the registered creator
    op = spec.OP_TYPES["tome"]
    assert record["plugins"] == [op, op] and record["plugin_classes"] == ["_TemplateJITPlugin"]
    assert trt.get_plugin_registry().get_creator(op, spec.PLUGIN_VERSION, spec.PLUGIN_NAMESPACE) is not None

    # the parity check ran the engine at min / opt / max batch
    check_runs(trt, [1, 2, 4])

    # the files: the engine as built, its manifest, the plugin ONNX it was built from
    engine = json.loads(out.read_bytes())
    assert {k: v for k, v in engine.items() if k != "onnx"} == record
    onnx_path = out.with_suffix(".onnx")
    assert base64.b64decode(engine["onnx"]) != onnx_path.read_bytes()  # local functions dropped for TensorRT
    manifest = json.loads(manifest_path(out).read_text())
    assert json.loads(captured.out)["manifest_path"] == str(manifest_path(out))
    assert manifest["format"] == "trt" and manifest["file"] == out.name and manifest["onnx_file"] == onnx_path.name
    assert manifest["tensorrt"]["version"] == trt.__version__ and manifest["tensorrt"]["device"] == "stand-in (host memory)"
    assert manifest["tensorrt"]["profile"] == {"min": [1, *IMAGES], "opt": [2, *IMAGES], "max": [4, *IMAGES]}
    assert manifest["tensorrt"]["tf32"] is False and manifest["tensorrt"]["fp16"] is False
    assert manifest["tensorrt"]["python_plugins"] is True  # the engine needs Python + tmerge to run
    parity = manifest["parity"]
    assert parity["precision"] == "fp32" and [c["batch"] for c in parity["checks"]] == [1, 2, 4]
    assert all(c["max_abs_diff"] <= parity["atol"] for c in parity["checks"])


@pytest.mark.parametrize("trt_layer", VERSIONS[-1:], ids=[f"trt{VERSIONS[-1]}"], indirect=True)
def test_profile_tensorrt_runs_engines_through_execution_contexts(trt, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    rc = main(["profile", *ARGS, "--backends", "tensorrt", "--device", "cuda", "--batch-sizes", "3",
               "--warmup", "1", "--iters", "4", "--no-drift", "--out", str(report_path)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err

    # one engine per model (merged, unmerged), from the portable graphs: no plugins, default flags
    assert calls(trt, "create_network") == [(0,), (0,)]
    records = [r for (r,) in calls(trt, "build_serialized_network")]
    assert [r["plugins"] for r in records] == [[], []]
    assert all(r["profiles"] == [{"images": [[1, *IMAGES], [3, *IMAGES], [12, *IMAGES]]}] for r in records)
    assert all(r["flags"] == [] for r in records)
    # per engine: the memory probe's forward (nothing to read for tensorrt), one warm-up, four timed
    check_runs(trt, [3] * 2 * (1 + 1 + 4))

    report = json.loads(report_path.read_text())
    (entry,) = report["latency"]
    assert entry["backend"] == "tensorrt" and entry["device"] == "cuda" and entry["batch_size"] == 3
    described = entry["runtime"]
    assert described["versions"] == {"tensorrt": trt.__version__} and described["gpu"] == "stand-in (host memory)"
    assert described["precision"] == "fp32 (TF32 off)" and described["profile"]["opt"] == [3, *IMAGES]
    assert described["python_plugins"] is False  # portable graphs: TensorRT's own layers only
    assert entry["merged"]["p50_ms"] > 0 and entry["unmerged"]["p50_ms"] > 0


@pytest.mark.parametrize("trt_layer", VERSIONS[-1:], ids=[f"trt{VERSIONS[-1]}"], indirect=True)
def test_export_trt_engine_that_fails_parity_writes_nothing(trt, tmp_path, capsys, monkeypatch):
    """An engine whose plugin layers compute something else: exit 1, one error line, and the files
    already at the output paths are left as they were."""

    def off_by_one(*args):
        return tuple(a + 1 for a in trt_plugin_outputs(*args))

    trt_plugin_outputs = trt.plugin_layer_outputs
    monkeypatch.setattr(trt, "plugin_layer_outputs", off_by_one)
    out = tmp_path / "tiny.engine"
    old = {out: b"old engine", manifest_path(out): b"{}"}
    for path, data in old.items():
        path.write_bytes(data)
    rc = main(["export", *ARGS, "--format", "trt", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("error:") == 1 and "TensorRT engine parity failed at batch 1" in err
    assert calls(trt, "execute_async_v3")  # the engine did run
    assert {path: path.read_bytes() for path in old} == old
