"""ONNX graph plumbing: ``torch.onnx.export`` (dynamo, opset >= 18, only the batch dimension
dynamic) with a light optimisation pass, and the surgery that turns the verification graph
(with per-layer slot outputs) into the deployable one."""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
from torch import nn

from ..errors import TmergeError, VerificationError, first_line
from ..plugins import spec as plugin_spec

SLOTS_PREFIX = "tmerge_slots_"


def _light_optimize(proto):
    """Constant folding, identity transposes (``index_put`` leaves them; runtimes copy the tensor),
    dead-code and common-subexpression elimination (the full onnxscript optimizer's pattern
    rewriter costs seconds per export for nothing we need)."""
    import onnx_ir as ir
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass, IdentityEliminationPass, RemoveUnusedNodesPass
    from onnxscript import optimizer, rewriter
    from onnxscript.rewriter.rules.common import no_op_transpose_rule

    model = ir.from_proto(proto)
    optimizer.fold_constants(model)
    rewriter.rewrite(model, pattern_rewrite_rules=[no_op_transpose_rule])
    IdentityEliminationPass()(model)
    RemoveUnusedNodesPass()(model)
    CommonSubexpressionEliminationPass()(model)
    RemoveUnusedNodesPass()(model)
    return ir.to_proto(model)


def _sort_translation(self, *args, stable=None, dim=-1, descending=False):
    """aten.sort.stable (PiToMe's energy ranking) as ONNX TopK over the whole axis: TopK's sorted
    output breaks ties by the lower index first, i.e. a stable sort, ascending or descending."""
    from onnxscript import opset18 as op

    if args:  # positional (dim, descending) if ever given
        dim = args[0] if len(args) > 0 else dim
        descending = args[1] if len(args) > 1 else descending
    rank = len(self.shape)
    axis = dim % rank
    size = self.shape[axis]
    if isinstance(size, int):
        k = op.Constant(value_ints=[size])
    else:
        k = op.Slice(op.Shape(self), op.Constant(value_ints=[axis]), op.Constant(value_ints=[axis + 1]))
    values, indices = op.TopK(self, k, axis=axis, largest=1 if descending else 0, sorted=1)
    return values, indices


def _take_rows_translation(rows, index):
    """``tmerge::take_rows`` (a gather of whole rows per batch item) as one GatherND with batch_dims=1:
    no index broadcast to every channel."""
    from onnxscript import opset18 as op

    return op.GatherND(rows, index, batch_dims=1)


def _key_metric_translation(keys):
    """``tmerge::key_metric`` (see :func:`tmerge.merging.base.key_metric`): the keys (B, H, N, D) as
    (B, H, N * D), a row of H ones times that (their sum over the heads), back to (B, N, D), and one
    LpNormalization node."""
    from onnxscript import opset18 as op

    heads, dim = keys.shape[1], keys.shape[3]
    flat = op.Reshape(keys, op.Constant(value_ints=[0, heads, -1]))
    ones = op.CastLike(op.Constant(value_floats=[1.0] * heads), keys)
    summed = op.MatMul(op.Reshape(ones, op.Constant(value_ints=[1, heads])), flat)
    return op.LpNormalization(op.Reshape(summed, op.Constant(value_ints=[0, -1, dim])), axis=-1, p=2)


def _elu_translation(self, alpha=1.0, scale=1.0, input_scale=1.0):
    """aten.elu (PiToMe's energy) as one Elu node: the default translation multiplies by ``scale`` and
    ``input_scale`` around it even when they are 1 (two nodes that change no bit)."""
    from onnxscript import opset18 as op

    if input_scale != 1.0:
        self = op.Mul(self, op.CastLike(input_scale, self))
    out = op.Elu(self, alpha=float(alpha))
    return out if scale == 1.0 else op.Mul(out, op.CastLike(scale, out))


def torch_onnx_export(module: nn.Module, args: tuple, *, dynamic_batch: bool, opset: int,
                      input_names: list[str], output_names: list[str], custom_table: dict | None = None,
                      dynamic_shapes=None):
    """``module(*args)`` as an inlined, lightly optimised ``onnx.ModelProto``."""
    import onnx

    if dynamic_shapes is None and dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = tuple({0: batch} for _ in args)
    if not dynamic_batch:
        dynamic_shapes = None
    table = {torch.ops.aten.sort.stable: _sort_translation, torch.ops.tmerge.take_rows.default: _take_rows_translation,
             torch.ops.tmerge.key_metric.default: _key_metric_translation, torch.ops.aten.elu.default: _elu_translation,
             **(custom_table or {})}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                input_names=input_names, output_names=output_names, optimize=False, verbose=False,
                custom_translation_table=table, report=False, verify=False,
            )
        except TmergeError:
            raise
        except Exception as e:  # torch.export / onnx conversion failure
            raise VerificationError(f"torch.onnx.export failed: {first_line(e)}") from e
    proto = program.model_proto
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    return _light_optimize(proto)


def strip_wrapper_prefix(proto, prefix: str = "model.") -> None:
    """Initializers keep the model's state-dict names (``head.bias``, not ``model.head.bias``)."""
    names = {i.name for i in proto.graph.initializer}
    taken = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input} | names
    rename = {n: n[len(prefix):] for n in names if n.startswith(prefix) and n[len(prefix):] not in taken}
    if not rename:
        return
    for init in proto.graph.initializer:
        init.name = rename.get(init.name, init.name)
    for node in proto.graph.node:
        for i, v in enumerate(node.input):
            if v in rename:
                node.input[i] = rename[v]
    for vi in proto.graph.value_info:
        vi.name = rename.get(vi.name, vi.name)


def strip_slots(proto):
    """The deployable graph: drop the per-layer slot outputs (graph and plugin nodes/functions)."""
    import onnx

    proto_out = onnx.ModelProto()
    proto_out.CopyFrom(proto)
    keep = [o for o in proto_out.graph.output if not o.name.startswith(SLOTS_PREFIX)]
    del proto_out.graph.output[:]
    proto_out.graph.output.extend(keep)
    for node in proto_out.graph.node:
        if node.domain == plugin_spec.DOMAIN and len(node.output) > len(plugin_spec.OUTPUTS):
            del node.output[len(plugin_spec.OUTPUTS):]
    for fn in proto_out.functions:
        if fn.domain == plugin_spec.DOMAIN and len(fn.output) > len(plugin_spec.OUTPUTS):
            del fn.output[len(plugin_spec.OUTPUTS):]
    _prune(proto_out.graph)
    return proto_out


def _prune(graph) -> None:
    """Remove nodes whose outputs nobody needs (backwards from the graph outputs)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    vi = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(vi)
