"""OpenVINO as a first-class target: IR export verified like every export, profiled through the runner."""

from __future__ import annotations

import copy
import json

import tmerge
from tests.helpers import tiny_vit
from tmerge import MergeConfig, runtime

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif("openvino" not in runtime.available_backends("cpu"), reason="openvino not installed")


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    from tmerge.export import export_onnx
    from tmerge.export.openvino_ir import export_ir

    unmerged = tiny_vit()
    merged = tmerge.apply(copy.deepcopy(unmerged), MergeConfig.of("tome", r=4))
    out = tmp_path_factory.mktemp("ir") / "m.xml"
    onnx_result = export_onnx(merged, out.with_suffix(".onnx"), batch_size=2, dynamic_batch=True, model_name="tiny")
    return merged, unmerged, export_ir(onnx_result, merged, out)


def test_ir_export_writes_xml_bin_and_a_verified_manifest(ir):
    merged, _, result = ir
    out = result.path
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.bin", "m.onnx", "m.onnx.json", "m.xml", "m.xml.json"]
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["format"] == "openvino" and manifest["weights_file"] == "m.bin"
    assert manifest["openvino"]["precision_hint"] == "f32"
    assert manifest["onnx_parity"]["verified"] and manifest["parity"]["verified"]
    repeats = manifest["parity"]["repeats"]
    assert {r["threads"] for r in repeats} == {"default", 2} and {r["batch"] for r in repeats} == {1, 2}
    assert all(r["bit_identical"] and r["runs"] >= 20 and r["max_abs_diff"] <= 1e-4 for r in repeats)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = merged(images).numpy()
    np.testing.assert_allclose(runtime.create("openvino", out).run(images)[0], expected, atol=1e-4, rtol=0)


def test_profile_times_the_ir_in_openvino(ir):
    from tmerge.profiling.profile import ProfileConfig, profile_pair

    merged, unmerged, result = ir
    config = ProfileConfig(backends=["ov"], batch_sizes=[2], warmup=1, iters=3, data=None, memory=False,
                           onnx_merged=str(result.path), threads=2)
    report = profile_pair(merged, unmerged, config, model_name="tiny")
    (entry,) = report["latency"]
    assert entry["backend"] == "openvino" and entry["runtime"]["precision"] == "f32"
    assert entry["runtime"]["threads_in_effect"] == 2 and entry["ratio_p50"] > 0


def test_cli_refuses_a_non_xml_ir_path(tmp_path, capsys):
    from tmerge.cli import main

    rc = main(["export", "--format", "openvino", "--out", str(tmp_path / "m.onnx")])
    assert rc == 2 and "should end in .xml" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
