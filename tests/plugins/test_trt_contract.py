"""The merge plugins against TensorRT's own plugin code, on CPU.

TensorRT's ``tensorrt.plugin`` layer is pure Python; the ``tensorrt-cu12-bindings`` wheels pinned in
``tensorrt_bindings_versions.txt`` (downloaded by install.sh) carry it. Each test loads one release's
layer on the stand-in core of :mod:`tests.plugins.tensorrt_standin`, registers tmerge's plugins
through it (TensorRT's signature checks run), then does what TensorRT's ONNX parser does with a real
plugin graph exported by tmerge (:func:`tests.plugins.tensorrt_standin.parse_plugin_node`): finds
the creator by name / version / namespace, passes the node attributes the plugin declares encoded as
the parser encodes them (INT -> int32[1], FLOAT -> float32[1], STRING -> bytes + NUL), asks for the
implementation the node's ``aot`` attribute names (the JIT one), and runs the plugin's type, shape
and format callbacks. Shapes must equal :func:`tmerge.plugins.spec.output_shapes`. What this
cannot check: an engine build and the merge running inside TensorRT (that needs the TensorRT
libraries and a GPU; see the ``trt``-marked tests).
"""

from __future__ import annotations

import tmerge
from tests.helpers import tiny_vit
from tmerge.plugins import spec
from tmerge.plugins import trt as trtdefs

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
    registered = tmerge.plugins.register_tensorrt_plugins()
    assert registered == [f"tmerge::{op}" for op in spec.plugin_methods()]
    for op_type in spec.plugin_methods():
        assert hasattr(trtp.op.tmerge, op_type)
        creator = trt.get_plugin_registry().get_creator(op_type, spec.PLUGIN_VERSION, spec.PLUGIN_NAMESPACE)
        # the parser passes exactly these fields: the attributes the register function declares
        assert [f.name for f in creator.field_names] == list(trtdefs.trt_attributes(op_type))
    assert tmerge.plugins.register_tensorrt_plugins() == registered  # again: no "already defined"


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_parser_attributes_create_plugins_with_the_spec_shapes(trt_layer, plugin_graphs, method):
    trt, _ = trt_layer
    tmerge.plugins.register_tensorrt_plugins()
    model, proto = plugin_graphs[method]
    prepared = trtdefs.prepare_onnx_for_trt(proto)
    for node in _plugin_nodes(prepared):
        want = _node_attrs(node)
        plugin = trt.parse_plugin_node(node)
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
    tmerge.plugins.register_tensorrt_plugins()
    model, proto = plugin_graphs["tome"]
    node = _plugin_nodes(trtdefs.prepare_onnx_for_trt(proto))[0]
    plugin = trt.parse_plugin_node(node)
    plugin.get_output_data_types([trt.DataType.FLOAT] * 3, [3, 3, 4])
    dims, builder = _input_dims(trt, _node_attrs(node), model)
    plugin.get_output_shapes(dims, [], builder)
    in_out = [trt.DynamicPluginTensorDesc(trt.PluginTensorDesc((2, 17, 48))) for _ in range(5)]
    combos = plugin.get_supported_format_combinations(in_out, 3)
    assert [(d.type, d.format) for d in combos] == (
        [(trt.DataType.FLOAT, trt.TensorFormat.LINEAR)] * 5 + [(trt.DataType.HALF, trt.TensorFormat.LINEAR)] * 5)


def test_the_parser_gets_the_jit_implementation(trt_layer, plugin_graphs):
    """The prepared nodes (aot=0) ask TensorRT strictly for the JIT implementation. A node without
    the attribute gets it too, whatever the network's preference flag: it is the plugin's only
    implementation. Asking for an ahead-of-time one fails: none is registered."""
    from onnx import helper

    trt, _ = trt_layer
    tmerge.plugins.register_tensorrt_plugins()
    node = _plugin_nodes(trtdefs.prepare_onnx_for_trt(plugin_graphs["pitome"][1]))[0]
    assert [a.i for a in node.attribute if a.name == "aot"] == [0]
    assert type(trt.parse_plugin_node(node)).__name__ == "_TemplateJITPlugin"
    bare = type(node)()
    bare.CopyFrom(node)
    del bare.attribute[[a.name for a in bare.attribute].index("aot")]
    for flag in (None, trt.NetworkDefinitionCreationFlag.PREFER_JIT_PYTHON_PLUGINS,
                 trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS):
        plugin = trt.parse_plugin_node(bare, 0 if flag is None else 1 << int(flag))
        assert type(plugin).__name__ == "_TemplateJITPlugin"
    bare.attribute.append(helper.make_attribute("aot", 1))
    with pytest.raises(ValueError, match="AOT implementation requested, but not defined"):
        trt.parse_plugin_node(bare)


def test_failed_registration_can_be_retried(trt_layer, monkeypatch):
    _, trtp = trt_layer
    impl = trtp.impl

    def failing(plugin_id):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(trtp, "impl", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        tmerge.plugins.register_tensorrt_plugins()
    monkeypatch.setattr(trtp, "impl", impl)
    assert tmerge.plugins.register_tensorrt_plugins() == [f"tmerge::{op}" for op in spec.plugin_methods()]



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
    engine, info = build_serialized_engine(proto, (2, 3, 32, 32), batch=2, max_batch=8, fp16=fp16)

    (network_flags,) = [args for call, *args in trt.CALLS if call == "create_network"][0]
    assert network_flags == 0  # no plugin preference: the nodes ask for the JIT implementation (aot=0)
    (record,) = [args[0] for call, *args in trt.CALLS if call == "build_serialized_network"]
    (name, shape), = record["inputs"]
    assert shape == [-1, 3, 32, 32]  # only the batch is dynamic
    assert record["profiles"] == [{name: [[1, 3, 32, 32], [2, 3, 32, 32], [8, 3, 32, 32]]}]
    assert ("TF32" in record["flags"]) is False and ("FP16" in record["flags"]) is fp16
    assert record["workspace"] == 4 << 30
    assert set(record["plugins"]) == {spec.OP_TYPES["tome"]}  # one plugin layer per merging block
    assert len(record["plugins"]) == sum(1 for r in tmerge.merge_info(model)["r"] if r)
    assert record["plugin_classes"] == ["_TemplateJITPlugin"]  # created by TensorRT's plugin layer
    assert info["profile"] == {"min": (1, 3, 32, 32), "opt": (2, 3, 32, 32), "max": (8, 3, 32, 32)}
    assert info["tf32"] is False and info["fp16"] is fp16 and info["python_plugins"] is True

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
        build_serialized_engine(plugin_graphs["tome"][1], (2, 3, 32, 32), batch=2, max_batch=8, fp16=False)
