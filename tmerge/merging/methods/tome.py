"""ToMe: bipartite soft matching on the attention keys (Bolya et al., 2023)."""

from __future__ import annotations

from torch import Tensor

from ..base import BlockInput, MergeMethod, MergePlan, bipartite_choice, bipartite_sides, block_constants, key_metric, tome_plan


class ToMe(MergeMethod):
    """A = even positions, B = odd; the r A tokens most similar to some B token merge into it.

    Prefix tokens (class, distillation, registers) never merge and come first in the output.
    """

    name = "tome"
    summary = "bipartite soft matching on head-averaged keys (ToMe)"
    prop_attn_default = True
    plugin_op = "BipartiteMerge"

    def similarity_metric(self, block: BlockInput) -> Tensor:
        return key_metric(block.keys)

    def plan(self, block: BlockInput) -> MergePlan:
        consts = block_constants(self, block)
        choice = bipartite_choice(*bipartite_sides(self.similarity_metric(block), block.num_prefix), block.r)
        return tome_plan(consts, choice, block.x.shape[1])
