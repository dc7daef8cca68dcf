"""The merge step used while exporting: records each layer's slots as extra graph outputs and, for
the plugin graph, routes each merge through the plugin node.

:class:`ExportStep` is a :class:`tmerge.patch.MergeStep` strategy, installed on the model's
``MergingBlocks`` with ``blocks.using(step)`` for the duration of one export; :class:`WithSlots`
wraps the model so the recorded slots become outputs ``tmerge_slots_<layer>``; :func:`build_graph`
exports the wrapped model in either graph form.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..merging import BlockInput, MergeMethod
from ..models.forward import input_shape
from ..patch import chosen_slots, eager_merge_step, merging_blocks
from ..plugins import spec as plugin_spec
from .graph import SLOTS_PREFIX, strip_slots, strip_wrapper_prefix, torch_onnx_export
from .plugin_nodes import MergeNode, attach_functions, call_merge_node, translation_table


class ExportStep:
    """Merge step for export. ``plugin``: each merge is one plugin node (its nodes are collected in
    ``nodes``); else the eager step. Every merge's slots are appended to ``slots``."""

    def __init__(self, *, plugin: bool, class_token: bool) -> None:
        self.plugin = plugin
        self.class_token = class_token
        self.slots: list[Tensor] = []
        self.nodes: list[MergeNode] = []

    def __call__(self, method: MergeMethod, block: BlockInput, form: str):
        if self.plugin:
            node = plugin_spec.node_spec(method, layer=block.layer, depth=block.depth, r=block.r,
                                         num_tokens=block.x.shape[1], num_prefix=block.num_prefix,
                                         class_token=self.class_token, merge_form=form)
            self.nodes.append(MergeNode(method, block.layer, block.depth, block.r, block.num_prefix, form, node))
            size = block.size if block.size is not None else block.x.new_ones(*block.x.shape[:2], 1)
            x, size, chosen = call_merge_node(node, block.x, size, block.keys)
        else:
            x, size, chosen = eager_merge_step(method, block, form)
        self.slots.append(chosen_slots(chosen))
        return x, size, chosen


class WithSlots(nn.Module):
    """The model's output followed by every merging layer's slots (the verification graph)."""

    def __init__(self, model: nn.Module, step: ExportStep):
        super().__init__()
        self.model = model
        self._step = step

    def forward(self, x):
        self._step.slots.clear()
        out = self.model(x)
        return (out, *self._step.slots)


def build_graph(model: nn.Module, *, graph: str = "portable", batch_size: int = 2, dynamic_batch: bool = True,
                opset: int = 18, with_slots: bool = True):
    """Export ``model`` to an ``onnx.ModelProto`` (input ``images``, output ``output`` and, with
    ``with_slots``, one ``tmerge_slots_<layer>`` int64 output per merging layer). Returns
    (proto, merged_layers)."""
    blocks = merging_blocks(model)
    merged_layers = [l for l, r in enumerate(blocks.schedule.r) if r > 0] if blocks is not None else []
    example = torch.randn(input_shape(model, batch_size), generator=torch.Generator().manual_seed(0))
    output_names = ["output"] + [f"{SLOTS_PREFIX}{l}" for l in merged_layers]
    plugin = graph == "plugin"
    step = ExportStep(plugin=plugin, class_token=getattr(model, "cls_token", None) is not None)
    using = blocks.using(step) if blocks is not None else contextlib.nullcontext()
    with torch.no_grad(), using:
        proto = torch_onnx_export(WithSlots(model, step).eval(), (example,), dynamic_batch=dynamic_batch,
                                  opset=opset, input_names=["images"], output_names=output_names,
                                  custom_table=translation_table() if plugin else None)
        strip_wrapper_prefix(proto)
        if plugin:
            proto = attach_functions(proto, model, step.nodes, dynamic_batch=dynamic_batch, opset=opset)
    if not with_slots:
        proto = strip_slots(proto)
    return proto, merged_layers
