"""ONNX export, graph side: both graph forms, ToMe and PiToMe, tiny model variants, dynamic batch,
and the manifest. The exports are session fixtures (``conftest.py``), so each graph is built once."""

from __future__ import annotations

import json

from tests.helpers import run_ort

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")

MERGE_OPS = {"TopK", "ArgMax", "ScatterElements", "GatherElements", "CumSum"}


FORMS_METHODS = [("portable", "tome"), ("plugin", "tome"), ("portable", "pitome"), ("plugin", "pitome")]


@pytest.mark.parametrize("form,method", FORMS_METHODS)
def test_forms_check_and_run_with_dynamic_batch(exported, form, method):
    model, result = exported(form, method)
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    for batch in (1, 5):  # exported at 2
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = model(images).numpy()
        out = run_ort(result.path, images)
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= 1e-4
    assert result.parity["verified"] and result.parity["max_abs_diff"] <= 1e-4
    assert not any(p.name.endswith(".tmp") for p in result.path.parent.iterdir())


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_portable_graph_is_standard_ops_static_but_batch(exported, method):
    _, result = exported("portable", method)
    proto = onnx.load(str(result.path))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert not proto.functions
    ops = {n.op_type for n in proto.graph.node}
    assert {"TopK", "GatherElements", "MatMul"} <= ops
    assert not ops & {"ScatterElements", "ScatterND"}  # the default merge form sums without a scatter
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    for vi in [*inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch"
        assert all(d.HasField("dim_value") for d in dims[1:])
    assert [o.name for o in proto.graph.output] == ["output"]  # slot outputs stripped


@pytest.mark.parametrize("method,op_type", [("tome", "BipartiteMerge"), ("pitome", "PiToMeMerge")])
def test_plugin_graph_nodes_and_functions(exported, method, op_type):
    model, result = exported("plugin", method)
    proto = onnx.load(str(result.path))
    merges = [n for n in proto.graph.node if n.domain == "tmerge"]
    assert [n.op_type for n in merges] == [op_type, op_type]
    assert any(o.domain == "tmerge" for o in proto.opset_import)
    assert proto.ir_version >= 10
    # no standard merge ops left in the main graph: they live in the functions
    assert not ({n.op_type for n in proto.graph.node} & {"TopK", "ScatterElements", "ArgMax"})
    funcs = {(f.domain, f.name, f.overload): f for f in proto.functions}
    tokens = model.blocks.schedule.tokens
    for layer, node in enumerate(merges):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"tmerge" and attrs["plugin_version"] == b"1"
        assert attrs["r"] == 3 and attrs["num_tokens"] == tokens[layer] and attrs["num_prefix"] == 1
        assert attrs["class_token"] == 1 and attrs["layer"] == layer
        assert list(node.input)[1:] and len(node.input) == 3 and len(node.output) == 2
        fn = funcs[("tmerge", op_type, f"layer{layer}")]
        assert node.overload == f"layer{layer}"
        assert list(fn.input) == ["x", "size", "keys"] and list(fn.output) == ["x_out", "size_out"]
        assert set(attrs) <= set(fn.attribute)
        assert MERGE_OPS & {n.op_type for n in fn.node}
        if method == "pitome":
            assert attrs["margin"] == pytest.approx(model.blocks.method.margin(layer))
            assert attrs["bsm"] == int(model.blocks.method.uses_bsm(layer))
    assert result.manifest["plugin_nodes"][0]["op_type"] == op_type


def test_manifest(exported):
    model, result = exported("portable", "tome")
    manifest = json.loads(result.manifest_path.read_text())
    assert result.manifest_path == result.path.with_name(result.path.name + ".json")
    assert manifest["model"] == "tiny-plain"
    assert len(manifest["weights_sha256"]) == 64 == len(manifest["merged_weights_sha256"])
    assert manifest["method"] == "tome" and manifest["schedule"] == "r=3"
    assert [l["r"] for l in manifest["layers"]] == [3, 3]
    assert manifest["tokens"] == [17, 14, 11]
    assert manifest["layers"][1] == {"layer": 1, "r": 3, "tokens_in": 14, "tokens_out": 11}
    flops = manifest["flops"]
    assert 0 < flops["merged_per_image"] < flops["unmerged_per_image"]
    assert flops["ratio"] == pytest.approx(flops["merged_per_image"] / flops["unmerged_per_image"])
    assert manifest["parity"]["max_abs_diff"] <= 1e-4 and manifest["parity"]["atol"] == 1e-4
    assert manifest["opset"] == 18 and manifest["dynamic_batch"] is True
    for pkg in ("torch", "timm", "onnx", "onnxruntime"):
        assert manifest["versions"][pkg]
    assert manifest["file_sha256"]
    # per-layer indices were compared, not only outputs
    assert all(c["slot_mismatch"] == {} for c in manifest["parity"]["checks"])


@pytest.mark.parametrize("variant,method,form", [  # avg-pool: see the CLI test
    ("distilled", "tome", "plugin"),
    ("layerscale", "pitome", "portable"),
])
def test_model_variants(exported, variant, method, form):
    model, result = exported(form, method, variant)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(images).numpy()
    assert np.abs(run_ort(result.path, images) - ref).max() <= 1e-4
    prefix = {"distilled": 2, "layerscale": 1}[variant]
    assert model.blocks.num_prefix == prefix
    if form == "plugin":
        proto = onnx.load(str(result.path))
        node = next(n for n in proto.graph.node if n.domain == "tmerge")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_prefix"] == prefix


def test_export_leaves_the_eager_merge_step(exported):
    from tmerge.patch import eager_merge_step

    model, _ = exported("plugin", "tome")
    assert model.blocks.merge_step is eager_merge_step and not model.blocks._keys


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_r_at_its_cap_exports_without_zero_size_tensors(method, tmp_path):
    """With r at its cap every A token merges; a zero-size tensor left in the graph made OpenVINO's
    compiler die with a floating-point exception, so the export runs in a child process."""
    import subprocess
    import sys

    code = f"""
import tmerge, onnx
from tests.helpers import tiny_vit
from tmerge.export import export_onnx
model = tmerge.apply(tiny_vit("plain"), tmerge.MergeConfig.of("{method}", r=8))  # 17 tokens: 8 is the cap of block 0
result = export_onnx(model, r"{tmp_path / 'capped.onnx'}", batch_size=2, dynamic_batch=False)
graph = onnx.shape_inference.infer_shapes(onnx.load(str(result.path)))
dims = [d.dim_value for v in graph.graph.value_info for d in v.type.tensor_type.shape.dim if d.HasField("dim_value")]
assert 0 not in dims, "zero-size tensor in the graph"
print(sorted({{r["runtime"] for r in result.parity["runtimes"]}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
