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

from ..base import (
    BlockInput,
    MergeMethod,
    MergePlan,
    Option,
    alternating_constants,
    bipartite_choice,
    block_constants,
    key_metric,
    lookup,
    take_rows,
    tome_plan,
)


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
        """``margin`` (N, 1): the block's margin for every token, -inf for the prefix (so the prefix's
        energy is +inf: it ranks first, in order, and a rank below p is its own token). Then positions
        in the energy ranking. ``bsm``: ToMe's constants with A = positions p, p + 2, ... and B = p + 1,
        p + 3, ... Default step: ``cand`` (2r,) the candidates' positions, A's then B's; ``keep`` (M,)
        the output slots' positions [prefix, protected, B]; ``b_route`` the one-hot slots of the B tokens."""
        p = num_prefix
        kw = {"device": device}
        margin = torch.full((num_tokens, 1), self.margin(layer), dtype=dtype, **kw)
        margin[:p] = -math.inf
        if self.uses_bsm(layer):
            return {"margin": margin, **alternating_constants(num_tokens, r, p, p, p + 1, device=device, dtype=dtype)}
        a_pos, b_pos = torch.arange(p, p + 2 * r, 2, **kw), torch.arange(p + 1, p + 1 + 2 * r, 2, **kw)
        return {
            "margin": margin,
            "cand": torch.cat([a_pos, b_pos]),
            "keep": torch.cat([torch.arange(p, **kw), torch.arange(p + 2 * r, num_tokens, **kw), b_pos]),
            "b_route": torch.eye(num_tokens - r, dtype=dtype, **kw)[num_tokens - 2 * r:],
        }

    def plan(self, block: BlockInput) -> MergePlan:
        consts = block_constants(self, block)
        p, r, n = block.num_prefix, block.r, block.x.shape[1]
        metric = key_metric(block.keys)
        tokens = metric[:, p:] if p else metric  # the energy is a mean over the non-prefix tokens
        energy = F.elu(metric @ tokens.mT - consts["margin"], alpha=float(self.config["alpha"]))
        energy = energy.mean(-1, keepdim=True)  # (B, N, 1), +inf for the prefix
        order = energy.argsort(dim=1, descending=True, stable=True)  # (B, N, 1): tokens by energy rank
        if self.uses_bsm(block.layer):  # ToMe's step on the sequence in energy order
            ranked = take_rows(metric, order)
            ranked_plan = tome_plan(consts, bipartite_choice(ranked[:, p::2], ranked[:, p + 1::2], r), n)
            return MergePlan(keep=take_rows(order, ranked_plan.keep), src=take_rows(order, ranked_plan.src),
                             route=ranked_plan.route, num_tokens=n)
        # the 2r highest-energy tokens alternate into A and B; each A joins its best B
        cand = order.index_select(1, consts["cand"])  # (B, 2r, 1): A's, then B's
        if r:
            a_rows, b_rows = take_rows(metric, cand).split(r, dim=1)
            dest = (a_rows @ b_rows.mT).argmax(dim=-1)
        else:
            dest = cand[..., 0]
        return MergePlan(keep=order.index_select(1, consts["keep"]), src=cand[:, :r],
                         route=lookup(consts["b_route"], dest), num_tokens=n)


class _NodePiToMe(PiToMe):
    """PiToMe at one block with the margin and step read from its node (not recomputed)."""

    def __init__(self, depth: int, *, alpha: float, margin_l: float, bsm: bool):
        super().__init__(depth, alpha=alpha)
        self._margin_l, self._bsm = margin_l, bsm

    def margin(self, layer: int) -> float:
        return self._margin_l

    def uses_bsm(self, layer: int) -> bool:
        return self._bsm
