"""The runtime layer: registry, runners against PyTorch, and what export verification records."""

from __future__ import annotations

import json

import tmerge
from tests.helpers import tiny_vit
from tmerge import MergeConfig, runtime
from tmerge.errors import TmergeError

import numpy as np
import pytest
import torch


def test_registry_resolves_names_and_aliases():
    assert runtime.find_backend("ort").name == "onnxruntime"
    assert runtime.find_backend("OV").name == "openvino"
    assert runtime.find_backend("compile").name == "torch.compile"
    with pytest.raises(TmergeError, match="unknown backend 'tflite'"):
        runtime.find_backend("tflite")
    with pytest.raises(TmergeError, match="runs on cuda, not cpu"):
        runtime.check_backend("tensorrt", "cpu")
    with pytest.raises(TmergeError, match="threads must be a positive integer"):
        runtime.create("torch", tiny_vit(), threads=0)


@pytest.fixture(scope="module")
def merged_graph(tmp_path_factory):
    from tmerge.export import export_onnx

    model = tmerge.apply(tiny_vit(), MergeConfig.of("tome", r=4))
    path = tmp_path_factory.mktemp("graph") / "tome.onnx"
    return model, export_onnx(model, path, batch_size=2, dynamic_batch=True)


@pytest.mark.parametrize("backend", runtime.available_backends("cpu"))
def test_every_runtime_matches_pytorch(merged_graph, backend):
    model, result = merged_graph
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(images).numpy()
    source = model if runtime.find_backend(backend).takes == "torch" else result.path
    runner = runtime.create(backend, source, threads=2)
    out = runner.run(images)[0]
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
    info = runner.describe()
    assert info["backend"] == backend and info["device"] == "cpu" and info["threads"] == 2
    assert info["versions"]


@pytest.mark.skipif("openvino" not in runtime.available_backends("cpu"), reason="openvino not installed")
def test_openvino_runs_fp32_not_its_bf16_default(merged_graph):
    runner = runtime.create("openvino", merged_graph[1].path)
    assert runner.settings()["precision"] == "f32"


def test_export_records_every_runtime_thread_setting_and_run(merged_graph):
    _, result = merged_graph
    parity = json.loads(result.manifest_path.read_text())["parity"]
    from tmerge.export.verify import RUNS, claimed_runtimes

    claimed = claimed_runtimes()
    assert [(r["runtime"], r["device"]) for r in parity["runtimes"]] == claimed
    assert parity["runs_per_session"] == RUNS >= 20
    # per runtime: default threads and 2 threads, for the export batch and batch 1 (dynamic batch)
    assert len(parity["repeats"]) == len(claimed) * 2 * 2
    for record in parity["repeats"]:
        assert record["runs"] == RUNS and record["bit_identical"] and record["distinct_outputs"] == 1
        assert record["max_abs_diff"] <= parity["atol"]
    assert {r["threads"] for r in parity["repeats"]} == {"default", 2}
