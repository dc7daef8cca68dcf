"""DTEM: ToMe matching on a learned, decoupled per-block embedding (Lee et al., NeurIPS 2024).

Inference is exactly ToMe's bipartite soft matching (same ops, same shapes, so both ONNX forms
export as for ToMe) with one change: the similarity metric of block ``l`` is
``normalize(embed_l(attn_input))`` — a small linear map C -> d_f applied to the same normalised input
that feeds the block's qkv projection — instead of the head-averaged keys. DTEM hands that embedding
to the merge step as its ``keys`` (one "head", see ``MergeMethod.merge_keys``), so the step, and the
exported ``tmerge::BipartiteMerge`` node of the plugin form, is ToMe's own. d_f = head_dim for widths
below 1024, else 2 * head_dim (option ``feat_dim`` overrides it).

Initialisation (in :meth:`DTEM.bind`, which :func:`tmerge.apply` calls): ``embed_l`` is the key
projection of block l averaged over heads (rows C..2C of ``attn.qkv``, reshaped to heads and
averaged), extra dims (d_f > head_dim) zero. Then ``embed_l(x) == mean_h k_h`` and an untrained DTEM
merges exactly like ToMe. This equality needs ``attn.k_norm`` to be the identity: with q/k norm
(e.g. ``qk_norm=True``) ToMe's metric is the mean of *normalised* keys, which no linear map equals;
DTEM then starts from the un-normalised key projection (close, not identical) and training adapts it.

Training (``method.train()``; the backbone stays frozen and in eval mode, see :mod:`tmerge.training`)
differentiates through the paper's soft assignment P (below: top-k candidates, r softmax rounds).
Two training-time merges use it (option ``relaxed``):

* ``relaxed=0`` (default), straight-through: the forward is exactly ToMe's hard merge on the learned
  metric (the inference forward, at its reduced cost: cheaper and no train/test gap); the merge
  weights are hard + P - stopgrad(P), so the gradient is the relaxation's at the hard solution. This
  is tmerge's choice; with few training images on a CPU it moved the embedding more reliably than
  the full relaxation.
* ``relaxed=1``, the paper's relaxation:

* the block holds all N tokens; the first ``n_l`` (the count the block has at inference, from the
  schedule) are "live", the rest are tokens earlier blocks merged away (near-zero size);
* on the live tokens, A/B = even/odd positions as in ToMe; each A token keeps its top-k (k=3) B
  candidates; scores / tau1 (0.1); r rounds of a softmax at temperature tau2 (0.1) over all
  (A, candidate) entries accumulate a soft k-hot assignment P, each A token being picked at most once
  through a log(1 - picked) penalty; rows of P are rescaled to sum to at most 1 (as the reference);
* soft merge with the shared primitive: each A token sends the share P_ab of its size to candidate b
  and keeps 1 - sum_b P_ab itself, i.e. x_b <- (s_b x_b + P^T (s_a x_a)) / (s_b + P^T s_a) and
  s_a <- s_a (1 - rowsum P) (kept >= 1e-4 s_a so that log-size attention masks stay finite). No
  token is dropped; proportional attention (log size) lets the near-zero-size tokens fade;
* token order afterwards is ToMe's hard order on the same metric ([prefix, unmerged A, B]) followed
  by the r A tokens ToMe would have merged, then the older faded tokens; so block l+1 matches among
  the same live set (and the same A/B parity) as at inference. (The reference sorts by size instead.)

The embedding reads a detached input, as in the reference implementation. Nothing in it depends on
r: trained with r drawn per step from a range (``tmerge train --r-range 4:16``, as the relaxation
allows any r), one embedding serves that whole range; the shipped adapter of the default model is
trained that way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import TmergeError
from ..base import (
    BipartiteChoice,
    BlockInput,
    MergePlan,
    Option,
    bipartite_choice,
    bipartite_sides,
    block_constants,
    candidate_destinations,
    lookup,
    tome_plan,
)
from .tome import ToMe

KEEP_EPS = 1e-4  # smallest share of its size an A token keeps during soft training merges
PICKED_EPS = 1e-20  # log(1 - picked) floor: -46 / tau2 outweighs any score gap (scores / tau1 <= 10)


class DTEM(ToMe):
    name = "dtem"
    summary = "ToMe matching on a learned per-block embedding (DTEM); train it with `tmerge train`"
    prop_attn_default = True
    options = {
        "feat_dim": Option(None, "embedding width d_f (default head_dim; 2*head_dim for width >= 1024)", int, 1, 65536),
        "topk": Option(3, "training: candidate B tokens per A token in the relaxation", int, 1, 4096),
        "tau1": Option(0.1, "training: temperature of the similarity scores", float, 0.0, low_open=True),
        "tau2": Option(0.1, "training: temperature of the soft top-r rounds", float, 0.0, low_open=True),
        "relaxed": Option(0, "training: 1 = the paper's relaxation (all tokens kept, soft sizes); "
                             "0 = straight-through on ToMe's hard merge", int, 0, 1),
    }

    def __init__(self, depth: int, **options) -> None:
        super().__init__(depth, **options)
        self.embed = nn.ModuleList()  # one nn.Linear(C, d_f) per block, built by bind()
        self.live_tokens: list[int] = []  # tokens each block holds at inference (the schedule)
        self.exact_init = True  # False when a block has q/k norm (see module docstring)

    # ------------------------------------------------------------------ binding to a model
    def bind(self, model: nn.Module) -> None:
        blocks = model.blocks
        self.train(model.training)  # a new module starts in training mode; follow the model's mode
        self.live_tokens = list(blocks.schedule.tokens)
        attn = blocks[0].attn
        width, head_dim = attn.qkv.in_features, attn.head_dim
        feat_dim = self.config["feat_dim"]
        feat_dim = (head_dim if width < 1024 else 2 * head_dim) if feat_dim is None else int(feat_dim)
        if feat_dim < head_dim:
            raise TmergeError(f"dtem feat_dim must be >= head_dim ({head_dim}) to start from ToMe, got {feat_dim}")
        self.exact_init = all(isinstance(blk.attn.k_norm, nn.Identity) for blk in blocks)
        if len(self.embed) == len(blocks) and all(
            e.in_features == width and e.out_features == feat_dim for e in self.embed
        ):
            return  # already bound (e.g. re-applied with a trained instance): keep what was learned
        self.embed = nn.ModuleList(key_projection_init(blk.attn, feat_dim) for blk in blocks)

    # ------------------------------------------------------------------ merging
    def merge_keys(self, layer: int, keys: Tensor, attn_input: Tensor) -> Tensor:
        """The learned embedding as a single "head" (B, 1, N, d_f): ToMe's metric on it (mean over
        heads, L2-normalise) is normalize(embed(attn_input)), and the exported merge is ToMe's."""
        if not len(self.embed):
            raise TmergeError("DTEM is not bound to a model: use tmerge.apply(model, MergeConfig.of('dtem', ...))")
        return self.embed[layer](attn_input.detach()).unsqueeze(1)

    def plan(self, block: BlockInput) -> MergePlan:
        if not self.training:
            return super().plan(block)
        return self.soft_plan(block) if self.config["relaxed"] else self.straight_through_plan(block)

    def _soft_assignment(self, choice: BipartiteChoice, r: int) -> tuple[Tensor, Tensor]:
        """The relaxation's soft k-hot choice P (B, n_a, k) of r (A token, candidate B) pairs, and the
        candidates (B, n_a, k) (candidate 0 = ToMe's match), over the unprotected A and B tokens."""
        k = min(int(self.config["topk"]), choice.scores.shape[2])
        cand_idx, cand_score = candidate_destinations(choice.scores, choice.best_b, k)
        return soft_top_r(cand_score / float(self.config["tau1"]), r, float(self.config["tau2"])), cand_idx

    def straight_through_plan(self, block: BlockInput) -> MergePlan:
        """Training merge (default): the forward is ToMe's hard merge on the learned metric (so the
        training forward is the inference forward, at its cost); the gradient flows as if the merge
        weights were the relaxation's soft assignment P (weights = hard + P - stopgrad(P)). Every A
        token keeps a share 1 - sum P of itself (value: 1 if it stays, 0 if it merges; a merged one sends
        that share to its ToMe slot) and sends k shares to its k candidates (weights P: one-hot on
        ToMe's match for the r merged tokens, 0 for the others)."""
        consts = block_constants(self, block)
        metric = self.similarity_metric(block)
        bsz, n, _ = metric.shape
        choice = bipartite_choice(*bipartite_sides(metric, block.num_prefix), block.r)
        hard_plan = tome_plan(consts, choice, n)
        assign, cand_idx = self._soft_assignment(choice, block.r)
        k = cand_idx.shape[2]
        merged = torch.zeros_like(assign[..., 0]).scatter(1, choice.merged, 1.0)
        hard = merged.unsqueeze(-1) * (torch.arange(k, device=metric.device) == 0).to(assign.dtype)
        weights = hard + (assign - assign.detach())  # (B, n_a, k); value: hard
        own = 1 - weights.sum(-1)
        keep_weight = _weights_by_part(block.num_prefix, own.gather(1, choice.kept), len(consts["b_tok"]))
        to_b = consts["b_route"]
        route = torch.cat([own.gather(1, choice.merged).unsqueeze(-1) * lookup(to_b, choice.match),
                           (weights.unsqueeze(-1) * lookup(to_b, cand_idx)).flatten(1, 2)], dim=1)
        every_a = consts["a_tok"].repeat_interleave(k, dim=0).expand(bsz, -1, -1)
        return MergePlan(keep=hard_plan.keep, src=torch.cat([hard_plan.src, every_a], dim=1), route=route,
                         num_tokens=n, keep_weight=keep_weight, hard=False)

    def trainable_layers(self) -> list[nn.Module]:
        return list(self.embed)

    def soft_plan(self, block: BlockInput) -> MergePlan:
        """The training-time relaxation (see the module docstring): keeps all N tokens."""
        metric = self.similarity_metric(block)  # ToMe's: normalize(mean over the one "head")
        bsz, n_all, _ = metric.shape
        n = self.live_tokens[block.layer] if self.live_tokens else n_all
        p, r = block.num_prefix, block.r
        consts = block.consts if block.consts is not None else self.constants(
            block.layer, n, r, p, device=metric.device, dtype=metric.dtype)
        choice = bipartite_choice(*bipartite_sides(metric[:, :n], p), r)  # ToMe's choice on the live tokens
        hard_plan = tome_plan(consts, choice, n)
        assign, cand_idx = self._soft_assignment(choice, r)  # (B, n_a, k), rows sum <= 1 - eps
        k = cand_idx.shape[2]
        own = 1 - assign.sum(-1)
        # slots: ToMe's n - r, then the r A tokens ToMe merges (fading here), then tokens faded earlier
        fading = choice.merged.sort(dim=-1).values
        faded = torch.arange(n, n_all, device=metric.device).view(-1, 1).expand(bsz, -1, -1)
        keep = torch.cat([hard_plan.keep, lookup(consts["a_tok"], fading), faded], dim=1)
        keep_weight = _weights_by_part(p, own.gather(1, choice.kept), len(consts["b_tok"]),
                                       own.gather(1, fading), n_all - n)
        to_b = F.pad(consts["b_route"], (0, n_all - (n - r)))[cand_idx]  # (B, n_a, k, n_all)
        every_a = consts["a_tok"].repeat_interleave(k, dim=0).expand(bsz, -1, -1)
        return MergePlan(keep=keep, src=every_a, route=(assign.unsqueeze(-1) * to_b).flatten(1, 2), num_tokens=n_all,
                         keep_weight=keep_weight, hard=False)


def key_projection_init(attn: nn.Module, feat_dim: int) -> nn.Linear:
    """nn.Linear(C, feat_dim) = the head-averaged key projection of ``attn`` (extra dims zero)."""
    qkv = attn.qkv
    heads, head_dim = attn.num_heads, attn.head_dim
    attn_dim = heads * head_dim
    width = qkv.in_features
    lin = nn.Linear(width, feat_dim, device=qkv.weight.device, dtype=qkv.weight.dtype)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        w_k = qkv.weight[attn_dim:2 * attn_dim].reshape(heads, head_dim, width).mean(0)
        lin.weight[:head_dim].copy_(w_k)
        if qkv.bias is not None:
            lin.bias[:head_dim].copy_(qkv.bias[attn_dim:2 * attn_dim].reshape(heads, head_dim).mean(0))
    return lin


def soft_top_r(logits: Tensor, r: int, tau: float) -> Tensor:
    """Soft k-hot choice of ``r`` (row, candidate) entries of ``logits`` (B, n_a, k).

    r rounds of a softmax over all entries at temperature ``tau``; after each round, rows already
    picked are penalised by log(1 - picked) so each row is chosen at most about once. Rows are then
    rescaled to sum to at most 1 - KEEP_EPS.
    """
    bsz = logits.shape[0]
    total = torch.zeros_like(logits)
    picked = logits.new_zeros(*logits.shape[:-1], 1)
    for _ in range(r):
        z = logits + torch.log((1 - picked).clamp_min(PICKED_EPS))
        q = torch.softmax((z / tau).reshape(bsz, -1), dim=-1).reshape_as(logits)
        total = total + q
        picked = picked + q.sum(-1, keepdim=True)
    rows = total.sum(-1, keepdim=True).detach()
    return total / rows.clamp_min(1.0) * (1 - KEEP_EPS)


def _weights_by_part(num_prefix: int, kept_a: Tensor, num_b: int, *more: Tensor | int) -> Tensor:
    """keep_weight (B, M, 1) of a plan laid out [prefix, kept A, B, *more]: 1 for the prefix, B and
    integer-sized parts, the given weights for the others."""
    bsz = kept_a.shape[0]
    parts = [kept_a.new_ones(bsz, num_prefix), kept_a, kept_a.new_ones(bsz, num_b)]
    parts += [kept_a.new_ones(bsz, m) if isinstance(m, int) else m for m in more]
    return torch.cat(parts, dim=1).unsqueeze(-1)
