"""The merge plugins against TensorRT's own plugin code, on CPU.

TensorRT's ``tensorrt.plugin`` layer is pure Python; the ``tensorrt-cu12-bindings`` wheels pinned in
``tensorrt_bindings_versions.txt`` (downloaded by install.sh) carry it. Each test loads one release's
layer on the stand-in core of :mod:`tests.plugins.tensorrt_standin`, registers tmerge's plugins
through it (TensorRT's signature checks run), then does what TensorRT's ONNX parser does with a real
plugin graph exported by tmerge: finds the creator by name / version / namespace, passes the node
attributes the plugin declares encoded as the parser encodes them (INT -> int32[1], FLOAT ->
float32[1], STRING -> bytes + NUL), asks for the JIT or AOT implementation from the node's ``aot``
attribute, and runs the plugin's type, shape, format and launch callbacks. Shapes must equal
:func:`tmerge.plugins.spec.output_shapes`. What this cannot check: an engine build and the merge
running inside TensorRT (that needs the TensorRT libraries and a GPU; see the ``trt``-marked tests).
"""

from __future__ import annotations

import sys
import types

import tmerge
from tests.helpers import tiny_vit
from tmerge.errors import TmergeError
from tmerge.plugins import spec
from tmerge.plugins import trt as trtdefs

import numpy as np
import pytest
import torch

BATCH = "B"


@pytest.fixture(scope="module")
def plugin_graphs(tmp_path_factory):
    """method -> (model, final plugin ONNX graph, as written), for the methods that have a merge plugin."""
    from tmerge.export import export_onnx

    out = {}
    for method in ("tome", "pitome"):
        model = tmerge.apply(tiny_vit("plain"), tmerge.MergeConfig.of(method, r=3)).eval()
        path = tmp_path_factory.mktemp("graphs") / f"{method}.onnx"
        result = export_onnx(model, path, graph="plugin", verify=False, merge_form="scatter")  # as --format trt
        out[method] = (model, result.model_proto)
    return out


# ----------------------------------------------------------------------------------------------
# what TensorRT's ONNX parser does with a plugin node (onnx-tensorrt: FallbackPluginImporter,
# loadFields / copyField, createPlugin in importerUtils.cpp)


def _field(trt, name: str, attribute):
    from onnx import AttributeProto

    if attribute.type == AttributeProto.INT:
        return trt.PluginField(name, np.array([attribute.i], np.int32), trt.PluginFieldType.INT32)
    if attribute.type == AttributeProto.FLOAT:
        return trt.PluginField(name, np.array([attribute.f], np.float32), trt.PluginFieldType.FLOAT32)
    if attribute.type == AttributeProto.STRING:
        return trt.PluginField(name, np.frombuffer(attribute.s + b"\0", np.int8), trt.PluginFieldType.CHAR)
    raise AssertionError(f"attribute {name} of type {attribute.type}")


def parse_plugin_node(trt, node, phase=None):
    """The plugin TensorRT's parser creates for ``node``: creator by (op type, plugin_version,
    plugin_namespace); only the creator's declared fields, from the node's attributes; the JIT or AOT
    implementation as the node's ``aot`` attribute says."""
    attrs = {a.name: a for a in node.attribute}
    version = attrs["plugin_version"].s.decode() if "plugin_version" in attrs else "1"
    namespace = attrs["plugin_namespace"].s.decode() if "plugin_namespace" in attrs else ""
    creator = trt.get_plugin_registry().get_creator(node.op_type, version, namespace)
    assert creator is not None, f"Plugin not found: {namespace}::{node.op_type} version {version}"
    fields = trt.PluginFieldCollection(_field(trt, f.name, attrs[f.name]) for f in creator.field_names
                                       if f.name in attrs)
    request = (trt.QuickPluginCreationRequest.STRICT_AOT if attrs["aot"].i else
               trt.QuickPluginCreationRequest.STRICT_JIT) if "aot" in attrs else trt.QuickPluginCreationRequest.UNKNOWN
    return creator.create_plugin(node.op_type, namespace, fields, phase or trt.TensorRTPhase.BUILD, request)


def _input_dims(trt, node_attrs: dict, model) -> list:
    """DimsExprs of x (B, N, C), size (B, N, 1), keys (B, H, N, D): batch symbolic, the rest constant."""
    builder = trt.IExprBuilder()
    n = node_attrs["num_tokens"]
    keys = model.blocks.method.merge_keys(0, torch.zeros(1, model.blocks[0].attn.num_heads, n,
                                                         model.blocks[0].attn.head_dim),
                                          torch.zeros(1, n, model.embed_dim)).shape
    batch = trt.IDimensionExpr(symbol=BATCH)
    shapes = [(n, model.embed_dim), (n, 1), tuple(keys[1:])]
    return [trt.DimsExprs([batch, *(builder.constant(d) for d in rest)]) for rest in shapes], builder


def _node_attrs(node) -> dict:
    from onnx import helper

    return spec.check_attrs(node.op_type, {a.name: helper.get_attribute_value(a) for a in node.attribute
                                           if a.name != "aot"})


def _plugin_nodes(proto) -> list:
    nodes = [n for n in proto.graph.node if n.domain == spec.DOMAIN]
    assert len({_node_attrs(n)["num_tokens"] for n in nodes}) == len(nodes) > 1  # one shape per layer
    return nodes


# ----------------------------------------------------------------------------------------------


def test_registration_passes_tensorrts_checks(trt_layer):
    trt, trtp = trt_layer
    registered = tmerge.plugins.register_tensorrt_plugins(aot=False)
    assert registered == {f"tmerge::{op}": False for op in spec.plugin_methods()}
    for op_type in spec.plugin_methods():
        assert hasattr(trtp.op.tmerge, op_type)
        creator = trt.get_plugin_registry().get_creator(op_type, spec.PLUGIN_VERSION, spec.PLUGIN_NAMESPACE)
        # the parser passes exactly these fields: the attributes the register function declares
        assert [f.name for f in creator.field_names] == list(trtdefs.trt_attributes(op_type))
    assert tmerge.plugins.register_tensorrt_plugins(aot=False) == registered  # again: no "already defined"


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_parser_attributes_create_plugins_with_the_spec_shapes(trt_layer, plugin_graphs, method):
    trt, _ = trt_layer
    tmerge.plugins.register_tensorrt_plugins(aot=False)
    model, proto = plugin_graphs[method]
    prepared = trtdefs.prepare_onnx_for_trt(proto, aot=False)
    for node in _plugin_nodes(prepared):
        want = _node_attrs(node)
        plugin = parse_plugin_node(trt, node)
        assert type(plugin).__name__ == "_TemplateJITPlugin"
        assert trtdefs.full_attrs(node.op_type, plugin.attrs) == want  # NUL stripped, arrays unwrapped
        fp32 = [trt.DataType.FLOAT] * 3
        assert plugin.get_output_data_types(fp32, [3, 3, 4]) == [trt.DataType.FLOAT] * 2
        dims, builder = _input_dims(trt, want, model)
        out = plugin.get_output_shapes(dims, [], builder)
        for batch in (1, 7):
            got = [tuple(d.evaluate(**{BATCH: batch}) for d in exprs) for exprs in out]
            inputs = [tuple(d.evaluate(**{BATCH: batch}) for d in exprs) for exprs in dims]
            assert got == spec.output_shapes(node.op_type, want, *inputs)
            assert got[0][1] == want["num_tokens"] - want["r"]

        # what the engine stores for the JIT plugin and re-creates it from when it is loaded
        fields = plugin.get_fields_to_serialize()
        reloaded = trt.get_plugin_registry().get_creator(node.op_type, "1", "tmerge").create_plugin(
            node.op_type, "tmerge", fields, trt.TensorRTPhase.RUNTIME, trt.QuickPluginCreationRequest.STRICT_JIT)
        assert trtdefs.full_attrs(node.op_type, reloaded.attrs) == want


def test_autotune_offers_all_fp32_or_all_fp16(trt_layer, plugin_graphs):
    trt, _ = trt_layer
    tmerge.plugins.register_tensorrt_plugins(aot=False)
    model, proto = plugin_graphs["tome"]
    node = _plugin_nodes(trtdefs.prepare_onnx_for_trt(proto, aot=False))[0]
    plugin = parse_plugin_node(trt, node)
    plugin.get_output_data_types([trt.DataType.FLOAT] * 3, [3, 3, 4])
    dims, builder = _input_dims(trt, _node_attrs(node), model)
    plugin.get_output_shapes(dims, [], builder)
    in_out = [trt.DynamicPluginTensorDesc(trt.PluginTensorDesc((2, 17, 48))) for _ in range(5)]
    combos = plugin.get_supported_format_combinations(in_out, 3)
    assert [(d.type, d.format) for d in combos] == (
        [(trt.DataType.FLOAT, trt.TensorFormat.LINEAR)] * 5 + [(trt.DataType.HALF, trt.TensorFormat.LINEAR)] * 5)


def test_aot_needs_the_kernel_module(trt_layer):
    assert not trtdefs.aot_kernel_available()
    with pytest.raises(TmergeError, match="ahead-of-time merge kernel"):
        tmerge.plugins.register_tensorrt_plugins(aot=True)


def test_aot_plugin_launch_through_tensorrt(trt_layer, plugin_graphs, monkeypatch):
    """The aot_impl signature and return types pass TensorRT's checks; the kernel itself is a
    placeholder here (the real one is GPU work, compiled by :data:`trtdefs.AOT_KERNEL_MODULE`)."""
    trt, trtp = trt_layer
    kernels = types.ModuleType(trtdefs.AOT_KERNEL_MODULE)
    asked = []

    def compile_merge_kernel(op_type, attrs, dtype):
        asked.append((op_type, attrs, dtype))
        return "merge_kernel", b"// ptx", {"grid": (lambda b: b, 1, 1), "block": (128, 1, 1), "shared_mem": 0}, ["B", 7]

    kernels.compile_merge_kernel = compile_merge_kernel
    monkeypatch.setitem(sys.modules, trtdefs.AOT_KERNEL_MODULE, kernels)
    monkeypatch.setattr(trtdefs, "aot_kernel_available", lambda: True)
    assert set(tmerge.plugins.register_tensorrt_plugins(aot=True).values()) == {True}

    model, proto = plugin_graphs["pitome"]
    node = _plugin_nodes(trtdefs.prepare_onnx_for_trt(proto, aot=True))[1]
    plugin = parse_plugin_node(trt, node)
    assert type(plugin).__name__ == "_TemplateAOTPlugin"
    plugin.get_output_data_types([trt.DataType.HALF] * 3, [3, 3, 4])
    dims, builder = _input_dims(trt, _node_attrs(node), model)
    plugin.get_output_shapes(dims, [], builder)
    plugin.set_tactic(0)
    in_out = [trt.DynamicPluginTensorDesc(trt.PluginTensorDesc((2, 17, 48), trt.DataType.HALF)) for _ in range(5)]
    launch = types.SimpleNamespace()

    class SymExprSetter(dict):
        nbSymExprs = 0

    extra = SymExprSetter()
    plugin.get_launch_params(dims, in_out, 3, launch, extra, builder)
    assert asked == [(node.op_type, _node_attrs(node), "float16")]
    assert launch.block_x.expr.get_constant_value() == 128
    assert launch.grid_x.expr.evaluate(**{BATCH: 5}) == 5
    assert extra.nbSymExprs == 2 and extra[0].expr.evaluate(**{BATCH: 3}) == 3
    assert plugin.get_kernel([d.desc for d in in_out[:3]], [d.desc for d in in_out[3:]]) == ("merge_kernel", b"// ptx")


def test_failed_registration_can_be_retried(trt_layer, monkeypatch):
    _, trtp = trt_layer
    impl = trtp.impl

    def failing(plugin_id):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(trtp, "impl", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        tmerge.plugins.register_tensorrt_plugins(aot=False)
    monkeypatch.setattr(trtp, "impl", impl)
    assert set(tmerge.plugins.register_tensorrt_plugins(aot=False).values()) == {False}



# ----------------------------------------------------------------------------------------------
# the engine build: what tmerge asks of TensorRT's builder, network, parser, config and profile


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_engine_build_calls_tensorrt_with_the_right_arguments(trt_layer, plugin_graphs, monkeypatch, fp16):
    from tmerge.export.trt_engine import build_serialized_engine
    from tmerge.runtime.tensorrt import TensorRTRunner

    trt, _ = trt_layer
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the stand-in needs no GPU to build
    trt.CALLS.clear()
    model, proto = plugin_graphs["tome"]
    engine, info = build_serialized_engine(proto, (2, 3, 32, 32), batch=2, max_batch=8, fp16=fp16, aot=False)

    (network_flags,) = [args for call, *args in trt.CALLS if call == "create_network"][0]
    assert network_flags == 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_JIT_PYTHON_PLUGINS)
    (record,) = [args[0] for call, *args in trt.CALLS if call == "build_serialized_network"]
    (name, shape), = record["inputs"]
    assert shape == [-1, 3, 32, 32]  # only the batch is dynamic
    assert record["profiles"] == [{name: [[1, 3, 32, 32], [2, 3, 32, 32], [8, 3, 32, 32]]}]
    assert ("TF32" in record["flags"]) is False and ("FP16" in record["flags"]) is fp16
    assert record["workspace"] == 4 << 30
    assert set(record["plugins"]) == {spec.OP_TYPES["tome"]}  # one plugin layer per merging block
    assert len(record["plugins"]) == sum(1 for r in tmerge.merge_info(model)["r"] if r)
    assert info["profile"] == {"min": (1, 3, 32, 32), "opt": (2, 3, 32, 32), "max": (8, 3, 32, 32)}
    assert info["tf32"] is False and info["fp16"] is fp16 and info["aot"] is False

    # the runtime side: the engine deserialises, its input accepts the profile's batches only
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    context = runtime.deserialize_cuda_engine(engine).create_execution_context()
    assert context.set_input_shape(name, (8, 3, 32, 32)) and not context.set_input_shape(name, (9, 3, 32, 32))
    assert TensorRTRunner(proto, engine=engine).serialized == engine


def test_unregistered_plugins_fail_the_parse_with_one_line(trt_layer, plugin_graphs, monkeypatch):
    from tmerge.errors import VerificationError
    from tmerge.export.trt_engine import build_serialized_engine

    trt, _ = trt_layer
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    registry = trt.get_plugin_registry()
    monkeypatch.setattr(registry, "get_creator", lambda name, version, namespace="": None)  # nothing registered
    with pytest.raises(VerificationError, match="could not parse the graph: no plugin creator for"):
        build_serialized_engine(plugin_graphs["tome"][1], (2, 3, 32, 32), batch=2, max_batch=8, fp16=False,
                                aot=False)
