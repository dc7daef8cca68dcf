"""What the merge step costs, counted rather than timed: top-level PyTorch ops and ONNX nodes per
merging block. Every op is a kernel launch on a GPU and a node in an exported graph, so these counts
are the machine-independent proxy for the merge step's overhead (wall time on shared machines is noise)."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from ..patch import merging_blocks, unmerged


def top_level_ops(model: nn.Module, images: torch.Tensor) -> Counter:
    """Top-level ``aten::`` ops (not nested in another aten op) of one forward, by name."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(images)  # warm-up outside the count
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(images)
    counts: Counter = Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return counts


def merging_layers(model: nn.Module) -> list[int]:
    blocks = merging_blocks(model)
    return [] if blocks is None else [layer for layer, r in enumerate(blocks.schedule.r) if r > 0]


def ops_per_merging_block(model: nn.Module, images: torch.Tensor) -> dict:
    """Top-level ops the merging adds per merging block (same model run unmerged for the baseline):
    ``{"per_block": float, "merged": int, "unmerged": int, "blocks": int, "added": {op: per block}}``."""
    merged = top_level_ops(model, images)
    with unmerged(model):
        base = top_level_ops(model, images)
    blocks = len(merging_layers(model))
    added = merged.copy()
    added.subtract(base)
    total_m, total_u = sum(merged.values()), sum(base.values())
    return {"per_block": (total_m - total_u) / max(blocks, 1), "merged": total_m, "unmerged": total_u,
            "blocks": blocks, "added": {k: v / max(blocks, 1) for k, v in sorted(added.items()) if v}}


def onnx_nodes_per_merging_block(merged_proto, unmerged_proto, blocks: int) -> dict:
    """Nodes the merging adds per merging block to an exported graph: ``{"per_block", "merged",
    "unmerged", "added": {op type: per block}}``."""
    merged = Counter(node.op_type for node in merged_proto.graph.node)
    base = Counter(node.op_type for node in unmerged_proto.graph.node)
    added = merged.copy()
    added.subtract(base)
    total_m, total_u = sum(merged.values()), sum(base.values())
    return {"per_block": (total_m - total_u) / max(blocks, 1), "merged": total_m, "unmerged": total_u,
            "added": {k: v / max(blocks, 1) for k, v in sorted(added.items()) if v}}
