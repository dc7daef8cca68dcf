"""PiToMe: merge the low-"energy" (redundant) tokens first, protect the informative ones.

Energy of token i: E_i = mean_j ELU(cos(k_i, k_j) - margin), over the non-prefix tokens. Tokens are
ranked by E, highest first. Two steps, as in the reference DeiT patch:

* ``default``: the 2r highest-energy tokens are candidates, alternately A (ranks 0, 2, ...) and B
  (ranks 1, 3, ...); every A token merges into its most similar B token. The remaining tokens are
  protected. Output: [prefix, protected (energy order), B].
* ``bsm``: all tokens alternate into A and B in energy order, then ToMe's matching with edge ranking.
  Output: [prefix, unmerged A (energy order), B].

The reference uses ``bsm`` in the first ceil(L/2) blocks and ``default`` after; the margin falls
linearly with depth: m_l = m0 - m0 * l / L (m0 = 0.75 for DeiT, 0.9 / 0.95 for other families). The
reference timm patch does not use proportional attention, so that is the default here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..base import BlockInput, MergeMethod, MergePlan, Option, bipartite_slots, interleave, key_metric


class PiToMe(MergeMethod):
    name = "pitome"
    summary = "energy-score merging that protects informative tokens (PiToMe)"
    prop_attn_default = False
    plugin_op = "PiToMeMerge"
    plugin_attrs = {"margin": float, "alpha": float, "bsm": int}  # margin and step of the node's block
    options = {
        "margin": Option(0.75, "margin m0 of the first block; m_l = m0 - m0*l/L", float, -1.0, 1.0),
        "bsm_layers": Option(None, "number of leading blocks using the 'bsm' step (default ceil(L/2))", int, 0, "depth"),
        "alpha": Option(1.0, "ELU alpha of the energy score", float, 0.0, low_open=True),
    }

    def margin(self, layer: int) -> float:
        m0 = float(self.config["margin"])
        return m0 - m0 * layer / self.depth

    def uses_bsm(self, layer: int) -> bool:
        split = self.config["bsm_layers"]
        split = math.ceil(self.depth / 2) if split is None else int(split)
        return layer < split

    def plugin_attr_values(self, layer: int) -> dict:
        return {"margin": float(self.margin(layer)), "alpha": float(self.config["alpha"]),
                "bsm": int(self.uses_bsm(layer))}

    @classmethod
    def from_plugin_attrs(cls, attrs: dict) -> "PiToMe":
        return _NodePiToMe(attrs["depth"], alpha=attrs["alpha"], margin_l=attrs["margin"], bsm=bool(attrs["bsm"]))

    def plan(self, block: BlockInput) -> MergePlan:
        p, r = block.num_prefix, block.r
        metric = key_metric(block.keys)[:, p:]  # non-prefix tokens only
        sim = metric @ metric.transpose(1, 2)
        energy = torch.nn.functional.elu(sim - self.margin(block.layer), alpha=float(self.config["alpha"])).mean(-1)
        order = torch.sort(energy, dim=-1, descending=True, stable=True).indices  # (B, T)
        if self.uses_bsm(block.layer):
            ranked = metric.gather(1, order.unsqueeze(-1).expand_as(metric))
            slots_by_rank = bipartite_slots(ranked, r, num_protected=0, slot_offset=p)
        else:
            slots_by_rank = energy_step_slots(sim, order, r, p)
        slots = torch.empty_like(order).scatter(1, order, slots_by_rank)
        prefix = torch.arange(p, device=slots.device).expand(slots.shape[0], p)
        slots = torch.cat([prefix, slots], dim=1)
        return MergePlan(slots=slots, num_out=slots.shape[1] - r)


class _NodePiToMe(PiToMe):
    """PiToMe at one block with the margin and step read from its node (not recomputed)."""

    def __init__(self, depth: int, *, alpha: float, margin_l: float, bsm: bool):
        super().__init__(depth, alpha=alpha)
        self._margin_l, self._bsm = margin_l, bsm

    def margin(self, layer: int) -> float:
        return self._margin_l

    def uses_bsm(self, layer: int) -> bool:
        return self._bsm


def energy_step_slots(sim: Tensor, order: Tensor, r: int, slot_offset: int) -> Tensor:
    """Slots of the tokens by energy rank for PiToMe's default step (see module docstring)."""
    bsz, t = order.shape
    protected = slot_offset + torch.arange(t - 2 * r, device=order.device).expand(bsz, t - 2 * r)
    if r == 0:
        return protected
    a_idx, b_idx = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2]  # (B, r) each
    rows = sim.gather(1, a_idx.unsqueeze(-1).expand(bsz, r, t))
    cross = rows.gather(2, b_idx.unsqueeze(1).expand(bsz, r, r))
    best_b = cross.argmax(dim=-1)  # (B, r)
    b_first = slot_offset + (t - 2 * r)
    b_slots = b_first + torch.arange(r, device=order.device).expand(bsz, r)
    a_slots = b_first + best_b
    return torch.cat([interleave(a_slots, b_slots, 2 * r), protected], dim=1)
