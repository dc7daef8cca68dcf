"""The plugin graph's merge nodes: one ``tmerge::<OpType>`` node per merging block, plus an ONNX
local function of the same name (one overload per layer) whose body is the portable merge.

In PyTorch the node is a ``torch.library.custom_op`` (``tmerge::merge_node``) that carries the node
spec (op type + attributes, as JSON); ``custom_translation_table`` turns it into the custom-domain
node. Its PyTorch implementation is :func:`tmerge.plugins.reference.reference_merge`: the merge a
plugin computes from the node's attributes alone. Each function body is the merge step of that
layer exported on its own (inputs x, size, keys; dynamic batch), i.e. exactly the portable subgraph.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import VerificationError
from ..merging import BlockInput, MergeMethod
from ..patch import eager_merge_step
from ..plugins import spec as plugin_spec
from ..plugins.reference import reference_merge
from .graph import torch_onnx_export


@dataclass(frozen=True)
class MergeNode:
    """One merge of the exported model: the method and block it came from and its plugin node."""

    method: MergeMethod
    layer: int
    depth: int
    r: int
    num_prefix: int
    merge_form: str
    node: plugin_spec.MergeNodeSpec

    def run(self, x, size, keys):
        """The portable merge of this block (the function body): (x_out, size_out, slots)."""
        block = BlockInput(layer=self.layer, depth=self.depth, r=self.r, num_prefix=self.num_prefix,
                           keys=keys, attn_input=x, x=x, size=size)
        x_out, size_out, plan = eager_merge_step(self.method, block, self.merge_form)
        return x_out, size_out, plan.slots


@functools.cache
def merge_node_op():
    """``tmerge::merge_node(x, size, keys, op_type, attrs_json) -> (x_out, size_out, slots)``."""

    @torch.library.custom_op("tmerge::merge_node", mutates_args=())
    def merge_node(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, op_type: str, attrs: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, out_size, slots = reference_merge(op_type, json.loads(attrs), x, size, keys, with_slots=True)
        return out.contiguous(), out_size.contiguous(), slots.clone()

    @merge_node.register_fake
    def _(x, size, keys, op_type, attrs):
        n_out = plugin_spec.MergeNodeSpec(op_type, json.loads(attrs)).num_out
        return (x.new_empty(x.shape[0], n_out, x.shape[2]), size.new_empty(x.shape[0], n_out, 1),
                x.new_empty(x.shape[0], x.shape[1], dtype=torch.long))

    return merge_node


def call_merge_node(node: plugin_spec.MergeNodeSpec, x, size, keys):
    return merge_node_op()(x, size, keys, node.op_type, json.dumps(node.attrs))


def _onnx_schema(op_type: str):
    from onnx.defs import OpSchema

    P = OpSchema.FormalParameter
    kinds = {int: OpSchema.AttrType.INT, float: OpSchema.AttrType.FLOAT, str: OpSchema.AttrType.STRING}
    return OpSchema(
        op_type, plugin_spec.DOMAIN, plugin_spec.DOMAIN_VERSION,
        doc=f"tmerge token merge ({op_type}); body: ONNX local function of the same name",
        inputs=[P("x", "T"), P("size", "T"), P("keys", "T")],
        outputs=[P("x_out", "T"), P("size_out", "T"), P("slots", "I")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("I", ["tensor(int64)"], "")],
        attributes=[OpSchema.Attribute(k, kinds[t], k) for k, t in plugin_spec.ATTRIBUTES[op_type].items()],
    )


def _translate_merge_node(x, size, keys, op_type, attrs):
    from onnxscript.values import Op, Opset

    opset = Opset(plugin_spec.DOMAIN, plugin_spec.DOMAIN_VERSION)
    return Op(opset, op_type, _onnx_schema(op_type))(x, size, keys, **json.loads(attrs))


def translation_table() -> dict:
    merge_node_op()  # registers torch.ops.tmerge.merge_node
    return {torch.ops.tmerge.merge_node.default: _translate_merge_node}


def attach_functions(proto, model: nn.Module, nodes: list[MergeNode], *, dynamic_batch: bool, opset: int):
    """Give every ``tmerge`` node its overload and a local function holding the portable body."""
    from onnx import helper

    by_layer = {n.layer: n for n in nodes}
    functions = _merge_functions([by_layer[l] for l in sorted(by_layer)], model, dynamic_batch=dynamic_batch,
                                 opset=opset)
    for node in proto.graph.node:
        if node.domain != plugin_spec.DOMAIN:
            continue
        layer = next(a.i for a in node.attribute if a.name == "layer")
        node.overload = by_layer[layer].node.overload
        node.name = f"blocks.{layer}.merge"
    del proto.functions[:]
    proto.functions.extend(functions)
    if proto.ir_version < 10:
        proto.ir_version = 10  # function overloads
    if not any(o.domain == plugin_spec.DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(plugin_spec.DOMAIN, plugin_spec.DOMAIN_VERSION))
    return proto


class _AllSteps(nn.Module):
    """Every layer's merge step side by side (inputs x_l, size_l, keys_l): one export for all bodies."""

    def __init__(self, nodes: list[MergeNode]):
        super().__init__()
        self.nodes = nodes

    def forward(self, *flat):
        outs = []
        for i, node in enumerate(self.nodes):
            outs += node.run(*flat[3 * i: 3 * i + 3])
        return tuple(outs)


def _merge_functions(nodes: list[MergeNode], model: nn.Module, *, dynamic_batch: bool, opset: int) -> list:
    """The portable body of each merge as an ONNX FunctionProto (domain tmerge, overload layerN).

    All layers are exported together (one torch.onnx.export, each layer with its own batch symbol
    so no layer's body depends on another's inputs), then split by reachability from each
    layer's outputs."""
    from onnx import helper

    c = model.embed_dim
    args, dyn, in_names, out_names = [], [], [], []
    for merge in nodes:
        l, n = merge.layer, merge.node.attrs["num_tokens"]
        attn = model.blocks[l].attn
        g = torch.Generator().manual_seed(l)
        x = torch.randn(2, n, c, generator=g)
        with torch.no_grad():  # the keys the node receives (DTEM: its learned embedding, one "head")
            keys = merge.method.merge_keys(l, torch.randn(2, attn.num_heads, n, attn.head_dim, generator=g), x)
        args += [x, torch.ones(2, n, 1), keys]
        in_names += [f"{name}_l{l}" for name in plugin_spec.INPUTS]
        out_names += [f"{name}_l{l}" for name in plugin_spec.VERIFY_OUTPUTS]
        batch = torch.export.Dim(f"batch_l{l}", min=1, max=4096)
        dyn += [{0: batch}] * 3 if dynamic_batch else [None] * 3
    body = torch_onnx_export(_AllSteps(nodes).eval(), tuple(args), dynamic_batch=dynamic_batch, opset=opset,
                             input_names=in_names, output_names=out_names, dynamic_shapes=(tuple(dyn),))
    producer = {o: node for node in body.graph.node for o in node.output}
    inits = {i.name: i for i in body.graph.initializer}
    opsets = [o for o in body.opset_import if o.domain != plugin_spec.DOMAIN]
    positions = {id(n): i for i, n in enumerate(body.graph.node)}
    functions = []
    for merge in nodes:
        l, spec = merge.layer, merge.node
        rename = {f"{name}_l{l}": name for name in (*plugin_spec.INPUTS, *plugin_spec.VERIFY_OUTPUTS)}
        seen, order, consts = set(), [], []
        stack = [f"{name}_l{l}" for name in plugin_spec.VERIFY_OUTPUTS]
        while stack:  # nodes reachable backwards from this layer's outputs
            value = stack.pop()
            if value in seen or not value:
                continue
            seen.add(value)
            if value in inits:
                consts.append(value)
            elif value in producer:
                node = producer[value]
                if id(node) not in {id(n) for n in order}:
                    order.append(node)
                    stack.extend(node.input)
            elif value not in rename:
                raise VerificationError(f"merge body of layer {l} depends on foreign value {value!r}")
        order.sort(key=lambda n: positions[id(n)])
        body_nodes = [helper.make_node("Constant", [], [rename.get(v, v)], value=inits[v])
                      for v in sorted(set(consts))]
        for node in order:
            copy = type(node)()
            copy.CopyFrom(node)
            del copy.metadata_props[:]
            for i, v in enumerate(copy.input):
                copy.input[i] = rename.get(v, v)
            for i, v in enumerate(copy.output):
                copy.output[i] = rename.get(v, v)
            body_nodes.append(copy)
        functions.append(helper.make_function(
            plugin_spec.DOMAIN, spec.op_type, list(plugin_spec.INPUTS), list(plugin_spec.VERIFY_OUTPUTS),
            body_nodes, opsets, attributes=list(plugin_spec.ATTRIBUTES[spec.op_type]),
            doc_string=f"portable body of {spec.op_type} at block {l}", overload=spec.overload,
        ))
    return functions


def describe_plugin_nodes(proto) -> list[dict]:
    """The merge nodes of a plugin graph: op type, overload, attributes."""
    from onnx import helper

    out = []
    for node in proto.graph.node:
        if node.domain == plugin_spec.DOMAIN:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            out.append({"name": node.name, "op_type": node.op_type, "overload": node.overload,
                        "attributes": {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}})
    return out
