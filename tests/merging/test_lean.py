"""The merge step is a hot path: a handful of batched ops per block, index constants built once per
schedule, no host work in the forward. Counted, not timed (see benchmarks/lean_counts.py)."""

from __future__ import annotations

import copy
from collections import Counter

import tmerge
from tests.helpers import tiny_vit
from tmerge import MergeConfig
from tmerge.profiling.counts import merging_layers, onnx_nodes_per_merging_block, ops_per_merging_block, top_level_ops

import pytest
import torch

UNTRAINED = {"adapter": None}  # learned methods run untrained here, on purpose

# ViT-B/16's token count (196 patches + class token) on a narrow, shallow model: the op count of a
# merge step depends on the token count's parity and the prefix, never on width or depth
VIT_B_TOKENS = dict(img_size=224, patch_size=16)
OPS_PER_BLOCK = {"tome": 30, "pitome": 45}  # top-level aten ops per merging block (eager, CPU)
NODES_PER_BLOCK = {"tome": 40, "pitome": 40}  # portable ONNX graph


@pytest.mark.parametrize("variant", ["plain", "registers", "distilled"])
@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_top_level_ops_per_merging_block(method, variant):
    model = tmerge.apply(tiny_vit(variant, **VIT_B_TOKENS), MergeConfig.of(method, r=16))
    counts = ops_per_merging_block(model, torch.randn(2, 3, 224, 224))
    assert counts["blocks"] == 3
    assert counts["per_block"] <= OPS_PER_BLOCK[method], counts["added"]


def test_the_forward_creates_no_index_tensor_and_reads_nothing_back():
    """Index constants come from buffers built once per schedule (a sort's own internal index range
    is not ours: only top-level ops count)."""
    model = tmerge.apply(tiny_vit("registers", **VIT_B_TOKENS), MergeConfig.of("pitome", r=16, prop_attn=True))
    ops = top_level_ops(model, torch.randn(2, 3, 224, 224))
    created = set(ops) & {"aten::arange", "aten::eye", "aten::lift_fresh", "aten::scalar_tensor", "aten::item",
                          "aten::_local_scalar_dense", "aten::nonzero", "aten::zeros", "aten::ones", "aten::full",
                          "aten::new_ones", "aten::to", "aten::_to_copy"}
    assert not created


@pytest.mark.parametrize("method", ["tome", "pitome", "dtem", "ltm"])
@pytest.mark.parametrize("variant", ["plain", "registers", "distilled", "avgpool"])
def test_merged_forward_runs_on_the_meta_device(method, variant):
    """No value is read back on the host: the whole forward runs without data."""
    model = tmerge.apply(tiny_vit(variant), MergeConfig.of(method, r=3, **UNTRAINED)).to("meta")
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, device="meta"))
    assert out.shape == (2, 10) and out.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["tome", "pitome", "dtem", "ltm"])
def test_no_host_sync_on_cuda(method):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tmerge.apply(tiny_vit("registers"), MergeConfig.of(method, r=3, **UNTRAINED)).cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        model(x)  # lazy initialisation outside the check
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_index_constants_are_buffers_built_once_outside_the_state_dict():
    base = tiny_vit("registers")
    keys = set(base.state_dict())
    model = tmerge.apply(copy.deepcopy(base), MergeConfig.of("tome", r=3))
    assert set(model.state_dict()) == keys
    blocks = model.blocks
    assert sorted(blocks.constants(0)) == ["a_tok", "b_route", "b_tok", "keep_fixed", "prefix"]
    first = blocks.constants(0)["b_route"]
    with blocks.unmerged(), torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert blocks.constants(0)["b_route"] is first  # unmerged() rebuilt nothing
    model.to(torch.float64)
    assert blocks.constants(0)["b_route"].dtype == torch.float64  # they follow model.to
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64))


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_portable_onnx_nodes_per_merging_block(method):
    pytest.importorskip("onnx")
    from tmerge.export.instrument import build_graph

    base = tiny_vit("plain", depth=4)
    model = tmerge.apply(copy.deepcopy(base), MergeConfig.of(method, r=2))
    merged, _ = build_graph(model, with_slots=False)
    unmerged, _ = build_graph(base, with_slots=False)
    counts = onnx_nodes_per_merging_block(merged, unmerged, len(merging_layers(model)))
    assert counts["per_block"] <= NODES_PER_BLOCK[method], counts["added"]


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_exported_merge_step_uses_the_single_node_forms(method):
    """The key metric exports as one product with a row of ones (the sum over the heads, no ReduceMean)
    and one LpNormalization, PiToMe's energy as a bare Elu, and the merge joins no size channel to the
    tokens (no Concat, no Split of them). PiToMe's prefix ranks first through its margin constant (the
    only Pad left places the kept A tokens of a "bsm" block, as in ToMe)."""
    pytest.importorskip("onnx")
    from tmerge.export.instrument import build_graph

    model = tmerge.apply(tiny_vit("plain", depth=4), MergeConfig.of(method, r=2))
    proto, _ = build_graph(model, with_slots=False)
    blocks = len(merging_layers(model))
    producer = {out: node for node in proto.graph.node for out in node.output}

    def in_merge(node):
        trace = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.stack_trace", "")
        return "merge_step(" in trace or (not trace and any(in_merge(producer[i]) for i in node.input if i in producer))

    merge_ops = Counter(node.op_type for node in proto.graph.node if in_merge(node))
    assert merge_ops["LpNormalization"] == blocks and merge_ops["ReduceMean"] == (blocks if method == "pitome" else 0)
    for node in proto.graph.node:  # LpNormalization <- Reshape <- MatMul(ones, Reshape(keys))
        if node.op_type == "LpNormalization":
            summed = producer[producer[node.input[0]].input[0]]
            assert summed.op_type == "MatMul" and producer[summed.input[1]].op_type == "Reshape"
    assert not merge_ops.keys() & {"ReduceL2", "Concat", "Unsqueeze", "Expand", "Shape", "Cast"}, merge_ops
    matching = blocks if method == "tome" else sum(model.blocks.method.uses_bsm(layer) for layer in merging_layers(model))
    assert merge_ops["Split"] == blocks and merge_ops["Pad"] == matching  # Split: the ranking's, or the candidates'
    if method == "pitome":
        assert merge_ops["Elu"] == blocks
        elu_inputs = {i for node in proto.graph.node if node.op_type == "Elu" for i in node.input}
        assert all(producer[i].op_type == "Sub" for i in elu_inputs)


@pytest.mark.parametrize("method", ["tome", "pitome", "dtem"])
def test_torch_compile_sees_each_merge_as_one_opaque_op(method):
    model = tmerge.apply(tiny_vit("plain"), MergeConfig.of(method, r=3, **UNTRAINED)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
        eager = model(x)
    assert explained.graph_break_count == 0
    targets = [str(node.target) for graph in explained.graphs for node in graph.graph.nodes]
    assert targets.count("tmerge.merge_step.default") == len(merging_layers(model))
    assert not {"aten.sort", "argsort", "<built-in method argsort"} & {t.split(" of ")[0] for t in targets}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
