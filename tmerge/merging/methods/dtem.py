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
uses the continuous relaxation of the paper, so the embedding gets gradients:

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

The embedding reads a detached input, as in the reference implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import TmergeError
from ..base import BlockInput, MergePlan, Option, bipartite_slots
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
        return self.soft_plan(block)

    def soft_plan(self, block: BlockInput) -> MergePlan:
        """The training-time relaxation (see the module docstring): keeps all N tokens."""
        metric = self.similarity_metric(block)  # ToMe's: normalize(mean over the one "head")
        bsz, n_all, _ = metric.shape
        n = self.live_tokens[block.layer] if self.live_tokens else n_all
        p, r = block.num_prefix, block.r
        live = metric[:, :n]
        hard = bipartite_slots(live.detach(), r, num_protected=p, slot_offset=0)  # ToMe's order, (B, n)
        a, b = live[:, ::2], live[:, 1::2]
        n_a, n_b = a.shape[1], b.shape[1]
        prot_a, prot_b = (p + 1) // 2, p // 2
        k = min(int(self.config["topk"]), n_b - prot_b)

        scores = a @ b.transpose(1, 2)
        if prot_b:
            scores = scores.masked_fill(torch.arange(n_b, device=scores.device) < prot_b, -torch.inf)
        cand_score, cand_idx = scores.topk(k, dim=-1)  # (B, n_a, k)
        logits = cand_score / float(self.config["tau1"])
        logits = logits.masked_fill((torch.arange(n_a, device=logits.device) < prot_a)[:, None], -1e4)
        assign = soft_top_r(logits, r, float(self.config["tau2"]))  # (B, n_a, k), rows sum <= 1 - eps

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
        slots = interleave_k(slots_a, slots_b, n)
        weights = interleave_k(w_a, w_b, n)
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


def interleave_k(even: Tensor, odd: Tensor, n: int) -> Tensor:
    """(B, n_even, K) and (B, n_odd, K) back into sequence order (B, n, K)."""
    if odd.shape[1] < even.shape[1]:
        odd = torch.cat([odd, odd[:, :1]], dim=1)
    bsz, _, k = even.shape
    return torch.stack([even, odd], dim=2).reshape(bsz, -1, k)[:, :n]
