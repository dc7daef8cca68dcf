"""Merge plugins without TensorRT: node specs, attribute mapping, shape logic, the reference merge
a plugin runs, the graph preparation for TensorRT's parser, and the missing-TensorRT errors."""

from __future__ import annotations

import dataclasses
import math

import tmerge
from tmerge import MergeConfig
from tmerge.errors import TmergeError
from tmerge.patch import eager_merge_step
from tmerge.plugins import spec
from tmerge.plugins import trt as trtdefs
from tmerge.plugins.reference import method_from_attrs, reference_merge

import numpy as np
import pytest
import timm
import torch

TINY = dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3)


def _model(method: str, depth: int = 4, arch: str = "vit_tiny_patch16_224", **kw):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, depth=depth, **TINY, **kw).eval()
    return tmerge.apply(model, MergeConfig.of(method, r=3))


def _block_inputs(model):
    """Real per-block inputs of the merge (x, size, keys), captured from a forward."""
    captured = []

    def spy(method, block, form):
        if block.size is None:  # the first merge: all ones (a plugin node always has a size input)
            block = dataclasses.replace(block, size=block.x.new_ones(*block.x.shape[:2], 1))
        captured.append(block)
        return eager_merge_step(method, block, form)

    with torch.no_grad(), model.blocks.using(spy):
        model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    return captured


def _spec_for(model, block):
    return spec.node_spec(model.blocks.method, layer=block.layer, depth=block.depth, r=block.r,
                          num_tokens=block.x.shape[1], num_prefix=block.num_prefix,
                          class_token=model.cls_token is not None)


@pytest.mark.parametrize("method,arch,kw", [
    ("tome", "vit_tiny_patch16_224", {}),
    ("pitome", "vit_tiny_patch16_224", {}),
    ("tome", "deit_tiny_distilled_patch16_224", {}),
    ("pitome", "vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False}),
])
def test_reference_merge_from_attributes_equals_the_model(method, arch, kw):
    """What the plugin computes from the node attributes alone = what the model does."""
    model = _model(method, arch=arch, **kw)
    blocks = _block_inputs(model)
    assert len(blocks) == 4
    for block in blocks:
        node = _spec_for(model, block)
        x, size, slots = reference_merge(node.op_type, node.attrs, block.x, block.size, block.keys, with_slots=True)
        want_x, want_size, want_plan = eager_merge_step(model.blocks.method, block)
        assert torch.equal(slots, want_plan.slots)
        assert torch.allclose(x, want_x, atol=0, rtol=0) and torch.equal(size, want_size)
        shapes = spec.output_shapes(node.op_type, node.attrs, tuple(block.x.shape), tuple(block.size.shape),
                                    tuple(block.keys.shape), with_slots=True)
        assert shapes == [tuple(x.shape), tuple(size.shape), tuple(slots.shape)]


def test_pitome_attrs_carry_the_layer_margin_and_step():
    model = _model("pitome", depth=4)
    specs = [_spec_for(model, b) for b in _block_inputs(model)]
    assert [s.attrs["bsm"] for s in specs] == [1, 1, 0, 0]  # ceil(L/2) bsm blocks first
    assert [s.attrs["margin"] for s in specs] == pytest.approx([0.75 - 0.75 * l / 4 for l in range(4)])
    fixed = method_from_attrs("PiToMeMerge", specs[2].attrs)
    assert fixed.margin(0) == pytest.approx(specs[2].attrs["margin"]) and not fixed.uses_bsm(0)
    assert set(specs[0].attrs) == set(spec.ATTRIBUTES["PiToMeMerge"])


def test_node_spec_and_attribute_checks():
    model = _model("tome", depth=2)
    node = spec.node_spec(model.blocks.method, layer=1, depth=2, r=3, num_tokens=14, num_prefix=1, class_token=True)
    assert node.op_type == "BipartiteMerge" and node.overload == "layer1" and node.num_out == 11
    assert node.attrs["plugin_namespace"] == "tmerge" and node.attrs["plugin_version"] == "1"
    assert spec.check_attrs("BipartiteMerge", {**node.attrs, "merge_form": b"scatter"})["merge_form"] == "scatter"
    # as TensorRT's ONNX parser hands them over: numbers as one-element arrays, strings with a NUL
    parsed = spec.check_attrs("BipartiteMerge", {**node.attrs, "merge_form": "scatter\x00", "r": np.array([3], np.int32)})
    assert parsed == {**node.attrs, "merge_form": "scatter"} and type(parsed["r"]) is int
    with pytest.raises(TmergeError, match="one"):
        spec.check_attrs("BipartiteMerge", {**node.attrs, "r": np.array([3, 4], np.int32)})
    with pytest.raises(TmergeError, match="impossible"):
        spec.node_spec(model.blocks.method, layer=0, depth=2, r=9, num_tokens=17, num_prefix=1, class_token=True)
    with pytest.raises(TmergeError, match="missing"):
        spec.check_attrs("BipartiteMerge", {k: v for k, v in node.attrs.items() if k != "r"})
    with pytest.raises(TmergeError, match="unexpected"):
        spec.check_attrs("BipartiteMerge", {**node.attrs, "margin": 0.5})
    with pytest.raises(TmergeError, match="plugin"):
        spec.check_attrs("BipartiteMerge", {**node.attrs, "plugin_version": "2"})
    with pytest.raises(TmergeError, match="unknown merge op"):
        spec.check_attrs("Foo", node.attrs)

    class Other:
        name = "dtem-like"

    with pytest.raises(TmergeError, match="no merge plugin"):
        spec.node_spec(Other(), layer=0, depth=2, r=1, num_tokens=17, num_prefix=1, class_token=True)


def test_a_plugin_method_is_declared_in_its_own_class(monkeypatch):
    """plugin_op / plugin_attrs / plugin_attr_values / from_plugin_attrs are the whole contract."""
    from tmerge.merging import registry
    from tmerge.merging.methods.tome import ToMe

    class Strided(ToMe):
        name = "strided"
        plugin_op = "StridedMerge"
        plugin_attrs = {"stride": int}

        def plugin_attr_values(self, layer):
            return {"stride": 2}

    registry.available()
    monkeypatch.setitem(registry._METHODS, "strided", Strided)
    assert spec.op_types() == {"tome": "BipartiteMerge", "pitome": "PiToMeMerge", "dtem": "BipartiteMerge",
                               "strided": "StridedMerge"}  # LTM (soft weights) has no plugin
    assert spec.plugin_methods()["BipartiteMerge"] is ToMe  # DTEM inherits ToMe's node
    assert list(spec.attributes("StridedMerge"))[-1] == "stride"
    assert list(trtdefs.trt_attributes("StridedMerge"))[-1] == "stride"
    node = spec.node_spec(Strided(2), layer=0, depth=2, r=3, num_tokens=17, num_prefix=1, class_token=True)
    assert node.op_type == "StridedMerge" and node.attrs["stride"] == 2
    assert type(method_from_attrs("StridedMerge", node.attrs)) is Strided


class _Sym:
    """Stand-in for a TensorRT shape expression: records arithmetic symbolically."""

    def __init__(self, text):
        self.text = text

    def __sub__(self, other):
        return _Sym(f"({self.text} - {other})")

    def __eq__(self, other):
        return isinstance(other, _Sym) and other.text == self.text

    def __repr__(self):
        return self.text


def test_trt_shape_logic_with_symbolic_dims():
    attrs = {"r": 4, "num_tokens": 17, "num_prefix": 1, "class_token": 1, "layer": 0, "depth": 2,
             "merge_form": "scatter"}
    b = _Sym("B")
    x_out, size_out = trtdefs.output_dims("BipartiteMerge", attrs, (b, 17, 48), (b, 17, 1), (b, 3, 17, 16))
    assert x_out == (b, 13, 48) and size_out == (b, 13, 1)
    n = _Sym("N")  # a symbolic token count passes through as N - r
    x_out, _ = trtdefs.output_dims("BipartiteMerge", attrs, (b, n, 48), (b, n, 1), (b, 3, n, 16))
    assert x_out[1] == _Sym("(N - 4)")
    with pytest.raises(TmergeError, match="tokens"):
        trtdefs.output_dims("BipartiteMerge", attrs, (b, 16, 48), (b, 16, 1), (b, 3, 16, 16))
    # the parser forwards only the attributes the plugin declares (not plugin_namespace / _version / aot)
    full = trtdefs.full_attrs("BipartiteMerge", attrs)
    assert full["plugin_namespace"] == "tmerge" and full["plugin_version"] == "1"
    assert trtdefs.type_combinations() == "FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16"
    assert trtdefs.plugin_id("PiToMeMerge") == "tmerge::PiToMeMerge"
    assert list(trtdefs.trt_attributes("PiToMeMerge")) == ["r", "num_tokens", "num_prefix", "class_token", "layer",
                                                             "depth", "merge_form", "margin", "alpha", "bsm"]


def test_prepare_onnx_for_trt_asks_for_the_jit_plugin_and_drops_the_functions():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("BipartiteMerge", ["x", "s", "k"], ["y", "t"], domain="tmerge", r=1,
                            plugin_namespace="tmerge", plugin_version="1", aot=1)
    fn = helper.make_function("tmerge", "BipartiteMerge", ["x", "size", "keys"], ["x_out", "size_out"],
                              [helper.make_node("Identity", ["x"], ["x_out"]),
                               helper.make_node("Identity", ["size"], ["size_out"])],
                              [helper.make_opsetid("", 18)], attributes=["r", "plugin_namespace", "plugin_version"])
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None)  # noqa: E731
    graph = helper.make_graph([node], "g", [vi("x"), vi("s"), vi("k")], [vi("y"), vi("t")])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("tmerge", 1)],
                              functions=[fn])
    prepared = trtdefs.prepare_onnx_for_trt(model)
    attrs = [(a.name, helper.get_attribute_value(a)) for a in prepared.graph.node[0].attribute]
    assert ("plugin_namespace", b"tmerge") in attrs
    assert [v for k, v in attrs if k == "aot"] == [0]  # one aot attribute, 0: the JIT implementation
    assert len(prepared.functions) == 0  # the parser would key every layer's body by op type alone
    assert len(model.functions) == 1  # the input is not modified
    assert [a.i for a in model.graph.node[0].attribute if a.name == "aot"] == [1]
    again = trtdefs.prepare_onnx_for_trt(prepared)
    assert [a.i for a in again.graph.node[0].attribute if a.name == "aot"] == [0]
    plain = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [vi("x")],
                                                [vi("y")]))
    with pytest.raises(TmergeError, match="--graph plugin"):
        trtdefs.prepare_onnx_for_trt(plain)


def test_profile_shapes():
    from tmerge.runtime.tensorrt import profile_shapes

    assert profile_shapes((2, 3, 224, 224), 8, None) == ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    assert profile_shapes((2, 3, 32, 32), 4, 16)[2] == (16, 3, 32, 32)
    assert profile_shapes((2, 3, 32, 32), 4, 2)[2] == (4, 3, 32, 32)  # max never below opt


def _has_trt() -> bool:
    try:
        import tensorrt  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.mark.skipif(_has_trt(), reason="TensorRT is installed")
def test_without_tensorrt_errors_say_what_to_install():
    from tmerge.plugins.trt import TRT_MISSING
    from tmerge.runtime.tensorrt import require_tensorrt

    for call in (require_tensorrt, trtdefs.register_tensorrt_plugins):
        with pytest.raises(TmergeError) as info:
            call()
        assert str(info.value) == TRT_MISSING
        assert info.value.exit_code == 2


@pytest.mark.trt
@pytest.mark.skipif(not _has_trt() or not torch.cuda.is_available(), reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("method", ["tome", "pitome"])
@pytest.mark.parametrize("fp16", [False, True])
def test_trt_engine_end_to_end(tmp_path, method, fp16):  # pragma: no cover - not run on the build machines
    from tmerge.export import export_onnx
    from tmerge.export.trt_engine import export_engine

    model = _model(method, depth=2)
    result = export_onnx(model, tmp_path / "m.onnx", graph="plugin", dynamic_batch=True)
    engine = export_engine(result, model, tmp_path / "m.engine", batch=2, max_batch=8, fp16=fp16)
    assert engine.path.is_file() and engine.manifest["format"] == "trt"
    assert all(c["cosine_min"] > 0.999 for c in engine.parity["checks"])


def test_sort_translation_is_stable_topk():
    """PiToMe's stable sort becomes TopK, whose sorted output breaks ties by the lower index."""
    ort = pytest.importorskip("onnxruntime")
    import numpy as np
    from onnx import TensorProto, helper

    x = np.array([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5]], dtype=np.float32)
    k = helper.make_tensor("k", TensorProto.INT64, [1], [x.shape[1]])
    graph = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, largest=1, sorted=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("i", TensorProto.INT64, None)], initializer=[k])
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
                                .SerializeToString(), providers=["CPUExecutionProvider"])
    (idx,) = sess.run(None, {"x": x})
    want = torch.sort(torch.from_numpy(x), dim=-1, descending=True, stable=True).indices.numpy()
    assert (idx == want).all()
    assert math.isfinite(float(x.sum()))
