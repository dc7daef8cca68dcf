"""LTM: a learned soft merging mask on ToMe's destinations (after "Learnable Token Merging", Wang et al.).

The paper replaces each block by one whose *mask module* produces a soft merging mask M (N x N')
with merged tokens X' = normalise(M)^T X, N' = N - r, trained to reduce a variational upper bound of
an information-bottleneck (IB) loss. The public code holds only that loss and no mask module, so
tmerge makes the following choices (each one the paper leaves open):

1. **Destinations.** N' = N - r tokens: exactly the tokens ToMe keeps (prefix, unmerged A, all B),
   in ToMe's output order, chosen by ToMe's bipartite matching on the head-averaged keys. Only the r
   tokens ToMe merges are spread by the mask; every other token goes to its own slot with weight 1.
   The mask is therefore sparse (k non-zeros per merged row), which keeps shapes static and the
   graph as cheap as ToMe's.
2. **Candidates.** Each merged A token may send its mass to its top-k (k = 3, option ``topk``) B
   tokens by ToMe's similarity; candidate 0 is ToMe's own match (its argmax).
3. **Mask module** (one per block): a bilinear scorer on layer-normalised token features (the
   tokens after the attention residual, the ones being merged): h_j = <W_q LN(x_a), W_k LN(x_bj)> /
   sqrt(d) + w_s * sim(a, b_j) with d = 32 (option ``mask_dim``), w_s initialised to 1/0.1. The merge
   weights are a gated mixture ``w = (1 - g) * onehot(ToMe's match) + g * softmax(h)`` with a learned
   per-block gate g in [0, 1] (clamped), initialised to 0, so an untrained LTM equals ToMe exactly
   and the first gradient step already moves g. While g is 0 the scorer would get no gradient, so a
   value-free term 0.05 * (softmax(h) - stopgrad(softmax(h))) lets it learn which spreading would help
   (a straight-through-style estimator); the gate alone decides how much of it is used.
4. **Normalisation of M.** Size-weighted, like every tmerge merge: token a sends share w_aj of its
   size s_a to destination j; destination x_j = sum(share * x) / sum(share) (the shared primitive
   with (B, N, K) slots and weights), so sizes are conserved and proportional attention stays valid.
5. **Training** (see :mod:`tmerge.training`): backbone frozen; loss = distillation (KL to the unmerged
   model's logits, or 1 - cosine to its features for headless backbones) + lambda * IB term
   (lambda = 0.1, ``--ib-weight``). The IB term is the cluster-level cross-entropy of the paper's code:
   K = 16 k-means centroids of the unmerged model's (L2-normalised) output features on the training
   images; phi(f) = softmax(-||f - c_k||^2 / t) with t = 0.1; pseudo-labels y = the unmerged model's
   argmax for classifiers, its k-means cluster for headless backbones; Q[k, y] = the batch mean of phi
   over samples with label y; loss = -mean_i sum_k phi_k(f_i) log Q[k, y_i].
6. **Same at training and inference**: the destinations are hard (ToMe's), only the weights are
   soft, so there is no train/test relaxation gap and the exported graph is the trained model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ...errors import TmergeError
from ..base import BlockInput, MergePlan, Option, bipartite_slots, key_metric
from .dtem import interleave_k
from .tome import ToMe


SCORER_GRAD = 0.05  # the scorer learns as if the gate were at least this open (value unchanged)


class MaskModule(nn.Module):
    """Scores a merged token against its k candidate destinations; returns soft weights (B, n, k)."""

    def __init__(self, width: int, dim: int, sim_scale: float = 10.0) -> None:
        super().__init__()
        self.query = nn.Linear(width, dim, bias=False)
        self.key = nn.Linear(width, dim, bias=False)
        nn.init.normal_(self.query.weight, std=width ** -0.5)
        nn.init.normal_(self.key.weight, std=width ** -0.5)
        self.sim_scale = nn.Parameter(torch.tensor(float(sim_scale)))
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x_a: Tensor, x_cand: Tensor, sim: Tensor) -> Tensor:
        """x_a (B, n, C), x_cand (B, n, k, C), sim (B, n, k) -> weights (B, n, k), rows sum to 1."""
        width = x_a.shape[-1]
        q = self.query(F.layer_norm(x_a, (width,)))  # (B, n, d)
        kk = self.key(F.layer_norm(x_cand, (width,)))  # (B, n, k, d)
        h = (kk @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(q.shape[-1]) + self.sim_scale * sim
        soft = torch.softmax(h, dim=-1)
        hard = torch.zeros_like(soft)
        hard[..., 0] = 1
        g = self.gate.clamp(0.0, 1.0)
        # The last term is zero in value; it gives the scorer a gradient while the gate is (near) 0.
        return (1 - g) * hard + g * soft + SCORER_GRAD * (soft - soft.detach())


class LTM(ToMe):
    name = "ltm"
    summary = "learned soft merging mask over ToMe's kept tokens (LTM-style); train it with `tmerge train`"
    prop_attn_default = True
    plugin_op = None  # soft weights: not ToMe's node
    options = {
        "topk": Option(3, "candidate destinations per merged token", int, 1, 4096),
        "mask_dim": Option(32, "width of the mask module's bilinear projection", int, 1, 65536),
    }

    def __init__(self, depth: int, **options) -> None:
        super().__init__(depth, **options)
        self.masks = nn.ModuleList()  # one MaskModule per block, built by bind()

    def bind(self, model: nn.Module) -> None:
        blocks = model.blocks
        self.train(model.training)
        width = blocks[0].attn.qkv.in_features
        dim = int(self.config["mask_dim"])
        if len(self.masks) == len(blocks) and all(m.query.in_features == width for m in self.masks):
            return  # already bound: keep what was learned
        param = blocks[0].attn.qkv.weight
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # the mask init does not depend on (or disturb) the caller's RNG
        try:
            masks = [MaskModule(width, dim) for _ in blocks]
        finally:
            torch.random.set_rng_state(torch_state)
        self.masks = nn.ModuleList(masks).to(device=param.device, dtype=param.dtype)

    def plan(self, block: BlockInput) -> MergePlan:
        if not len(self.masks):
            raise TmergeError("LTM is not bound to a model: use tmerge.apply(model, 'ltm', ...)")
        metric = key_metric(block.keys)
        bsz, n, _ = metric.shape
        p, r = block.num_prefix, block.r
        slots = bipartite_slots(metric, r, num_protected=p, slot_offset=0)
        a, b = metric[:, ::2], metric[:, 1::2]
        n_a, n_b = a.shape[1], b.shape[1]
        prot_a, prot_b = (p + 1) // 2, p // 2
        k = max(1, min(int(self.config["topk"]), n_b - prot_b))

        scores = a @ b.transpose(1, 2)
        if prot_b:
            scores = scores.masked_fill(torch.arange(n_b, device=scores.device) < prot_b, -torch.inf)
        cand_score, cand_idx = scores.topk(k, dim=-1)  # (B, n_a, k)
        best = scores.argmax(dim=-1)  # ToMe's own match (argmax: identical tie-breaking)
        cand_idx = torch.cat([best.unsqueeze(-1), cand_idx[..., 1:]], dim=-1)
        cand_score = scores.gather(2, cand_idx)

        x = block.x
        width = x.shape[-1]
        x_a, x_b = x[:, ::2], x[:, 1::2]
        x_cand = x_b.gather(1, cand_idx.reshape(bsz, -1, 1).expand(-1, -1, width)).reshape(bsz, n_a, k, width)
        weights_a = self.masks[block.layer](x_a, x_cand, cand_score)  # (B, n_a, k)

        a_slots, b_slots = slots[:, ::2], slots[:, 1::2]
        first_b = p + (n_a - prot_a - r)
        merged = (a_slots >= first_b).unsqueeze(-1)  # (B, n_a, 1)
        cand_slots = b_slots.gather(1, cand_idx.reshape(bsz, -1)).reshape(bsz, n_a, k)
        own = torch.zeros_like(weights_a)
        own[..., 0] = 1
        slots_a = torch.where(merged, cand_slots, a_slots.unsqueeze(-1).expand(-1, -1, k))
        w_a = torch.where(merged, weights_a, own)
        slots_b = b_slots.unsqueeze(-1).expand(-1, -1, k)
        w_b = own[:, :1].expand(bsz, n_b, k)
        full_slots = interleave_k(slots_a, slots_b, n)
        full_weights = interleave_k(w_a, w_b, n)
        return MergePlan(slots=full_slots, num_out=n - r, weights=full_weights)

