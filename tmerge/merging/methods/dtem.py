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
from torch import Tensor, nn

from ...errors import TmergeError
from ..base import BlockInput, MergePlan, Option, bipartite_match, candidate_destinations, interleave
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
            raise TmergeError("DTEM is not bound to a model: use tmerge.apply(model, 'dtem', ...)")
        return self.embed[layer](attn_input.detach()).unsqueeze(1)

    def plan(self, block: BlockInput) -> MergePlan:
        if not self.training:
            return super().plan(block)
        return self.soft_plan(block) if self.config["relaxed"] else self.straight_through_plan(block)

    def _soft_assignment(self, match, num_prefix: int, r: int) -> tuple[Tensor, Tensor]:
        """The relaxation's soft k-hot choice P (B, n_a, k) of r (A token, candidate B) pairs, and the
        candidates (B, n_a, k) (candidate 0 = ToMe's match)."""
        n_a, n_b = match.scores.shape[1:]
        prot_a, prot_b = (num_prefix + 1) // 2, num_prefix // 2
        k = min(int(self.config["topk"]), n_b - prot_b)
        cand_idx, cand_score = candidate_destinations(match.scores, match.best_b, k)
        logits = cand_score / float(self.config["tau1"])
        logits = logits.masked_fill((torch.arange(n_a, device=logits.device) < prot_a)[:, None], -1e4)
        return soft_top_r(logits, r, float(self.config["tau2"])), cand_idx

    def straight_through_plan(self, block: BlockInput) -> MergePlan:
        """Training merge (default): the forward is ToMe's hard merge on the learned metric (so the
        training forward is the inference forward, at its cost); the gradient flows as if the merge
        weights were the relaxation's soft assignment P (weights = hard + P - stopgrad(P)). Every A
        token keeps a row on its ToMe slot (weight 1 - sum P: 1 if it stays, 0 if it merges) and sends
        k extra rows (``MergePlan.sources``) to its k candidates (weights P: one-hot on ToMe's match
        for the r merged tokens, 0 for the others)."""
        metric = self.similarity_metric(block)
        bsz, n, _ = metric.shape
        match = bipartite_match(metric, block.r, num_protected=block.num_prefix)
        assign, cand_idx = self._soft_assignment(match, block.num_prefix, block.r)
        n_a, k = cand_idx.shape[1], cand_idx.shape[2]
        merged = torch.zeros_like(match.best_b, dtype=assign.dtype).scatter(1, match.merged_a, 1.0)
        hard = merged.unsqueeze(-1) * (torch.arange(k, device=metric.device) == 0).to(assign.dtype)
        weights = hard + (assign - assign.detach())  # (B, n_a, k); value: hard
        own = interleave(1 - weights.sum(-1, keepdim=True), torch.ones_like(metric[:, 1::2, :1]), n)
        b_slots = match.slots[:, 1::2]
        extra_slots = b_slots.gather(1, cand_idx.reshape(bsz, -1))
        sources = (2 * torch.arange(n_a, device=metric.device)).repeat_interleave(k).expand(bsz, -1)
        return MergePlan(slots=torch.cat([match.slots, extra_slots], dim=1), num_out=n - block.r,
                         weights=torch.cat([own, weights.reshape(bsz, -1, 1)], dim=1), sources=sources)

    def trainable_layers(self) -> list[nn.Module]:
        return list(self.embed)

    def soft_plan(self, block: BlockInput) -> MergePlan:
        """The training-time relaxation (see the module docstring): keeps all N tokens."""
        metric = self.similarity_metric(block)  # ToMe's: normalize(mean over the one "head")
        bsz, n_all, _ = metric.shape
        n = self.live_tokens[block.layer] if self.live_tokens else n_all
        p, r = block.num_prefix, block.r
        live = metric[:, :n]
        match = bipartite_match(live, r, num_protected=p)  # ToMe's choice and order on the live tokens
        hard = match.slots.detach()  # (B, n)
        n_a, n_b = match.scores.shape[1:]
        prot_a = (p + 1) // 2
        assign, cand_idx = self._soft_assignment(match, p, r)  # (B, n_a, k), rows sum <= 1 - eps
        k = cand_idx.shape[2]

        a_hard, b_hard = hard[:, ::2], hard[:, 1::2]
        first_b = p + (n_a - prot_a - r)  # ToMe puts B tokens from this slot on
        merged = a_hard >= first_b
        faded_slot = (n - r) + torch.cumsum(merged.long(), dim=1) - 1
        own_a = torch.where(merged, faded_slot, a_hard)
        cand_slots = b_hard.gather(1, cand_idx.reshape(bsz, -1)).reshape(bsz, n_a, k)
        slots_a = torch.cat([own_a.unsqueeze(-1), cand_slots], dim=-1)
        w_a = torch.cat([1 - assign.sum(-1, keepdim=True), assign], dim=-1)
        slots_b = b_hard.unsqueeze(-1).expand(bsz, n_b, k + 1)
        w_b = _self_weights(bsz, n_b, k + 1, w_a)
        slots = interleave(slots_a, slots_b, n)
        weights = interleave(w_a, w_b, n)
        if n < n_all:  # tokens faded in earlier blocks keep their place at the end
            tail = torch.arange(n, n_all, device=slots.device)
            slots = torch.cat([slots, tail.view(1, -1, 1).expand(bsz, -1, k + 1)], dim=1)
            weights = torch.cat([weights, _self_weights(bsz, n_all - n, k + 1, weights)], dim=1)
        return MergePlan(slots=slots, num_out=n_all, weights=weights)


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


def _self_weights(bsz: int, n: int, k: int, like: Tensor) -> Tensor:
    w = like.new_zeros(bsz, n, k)
    w[..., 0] = 1
    return w
