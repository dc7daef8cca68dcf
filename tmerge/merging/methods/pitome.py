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
import torch.nn.functional as F
from torch import Tensor

from ..base import BlockInput, MergeMethod, MergePlan, Option, bipartite_choice, block_constants, key_metric, lookup, prefixed, take_rows


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

    def constants(self, layer: int, num_tokens: int, r: int, num_prefix: int, *, device=None,
                  dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The prefix tokens and the one-hot slots of the B tokens: after [prefix, unmerged A] (bsm) or
        [prefix, protected] (default step)."""
        t = num_tokens - num_prefix
        first_b = num_prefix + ((t + 1) // 2 - r if self.uses_bsm(layer) else t - 2 * r)
        return {
            "prefix": torch.arange(num_prefix, device=device).view(-1, 1),
            "b_route": torch.eye(num_tokens - r, dtype=dtype, device=device)[first_b:],
        }

    def plan(self, block: BlockInput) -> MergePlan:
        consts = block_constants(self, block)
        p, r, bsz = block.num_prefix, block.r, block.x.shape[0]
        metric = key_metric(block.keys)
        metric = metric[:, p:] if p else metric  # non-prefix tokens only
        sim = metric @ metric.mT
        energy = F.elu(sim - self.margin(block.layer), alpha=float(self.config["alpha"])).mean(-1)
        order = energy.argsort(dim=-1, descending=True, stable=True)  # (B, T): tokens by energy rank
        tok = order + p if p else order
        if self.uses_bsm(block.layer):  # ToMe's matching on the sequence in energy order
            ranked = take_rows(metric, order.unsqueeze(-1))
            choice = bipartite_choice(ranked[:, ::2], ranked[:, 1::2], r)
            a_tok, b_tok = tok[:, ::2], tok[:, 1::2]
            kept, src, dest = a_tok.gather(1, choice.kept), a_tok.gather(1, choice.merged), choice.match
        else:  # the 2r highest-energy tokens alternate into A and B; each A joins its best B
            rank_a, rank_b = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2]
            cross = take_rows(sim, rank_a.unsqueeze(-1)).gather(2, rank_b.unsqueeze(1).expand(-1, r, -1))  # (B, r, r)
            dest = cross.argmax(dim=-1) if r else rank_a
            kept, b_tok, src = tok[:, 2 * r:], tok[:, 1 : 2 * r : 2], tok[:, : 2 * r : 2]
        keep = prefixed(consts, [kept.unsqueeze(-1), b_tok.unsqueeze(-1)], bsz)
        return MergePlan(keep=keep, src=src.unsqueeze(-1), route=lookup(consts["b_route"], dest),
                         num_tokens=block.x.shape[1])


class _NodePiToMe(PiToMe):
    """PiToMe at one block with the margin and step read from its node (not recomputed)."""

    def __init__(self, depth: int, *, alpha: float, margin_l: float, bsm: bool):
        super().__init__(depth, alpha=alpha)
        self._margin_l, self._bsm = margin_l, bsm

    def margin(self, layer: int) -> float:
        return self._margin_l

    def uses_bsm(self, layer: int) -> bool:
        return self._bsm
