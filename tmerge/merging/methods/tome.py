"""ToMe: bipartite soft matching on the attention keys (Bolya et al., 2023)."""

from __future__ import annotations

from ..base import BlockInput, MergeMethod, MergePlan, bipartite_slots, key_metric


class ToMe(MergeMethod):
    """A = even positions, B = odd; the r A tokens most similar to some B token merge into it.

    Prefix tokens (class, distillation, registers) never merge and come first in the output.
    """

    name = "tome"
    summary = "bipartite soft matching on head-averaged keys (ToMe)"
    prop_attn_default = True
    plugin_op = "BipartiteMerge"

    def similarity_metric(self, block: BlockInput):
        return key_metric(block.keys)

    def plan(self, block: BlockInput) -> MergePlan:
        metric = self.similarity_metric(block)
        slots = bipartite_slots(metric, block.r, num_protected=block.num_prefix, slot_offset=0)
        return MergePlan(slots=slots, num_out=metric.shape[1] - block.r)
