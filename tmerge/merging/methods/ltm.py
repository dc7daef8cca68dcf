"""LTM: a learned soft merging mask on ToMe's destinations (after "Learnable Token Merging", Wang et al.).

The paper replaces each block by one whose *mask module* produces a soft merging mask M (N x N')
with merged tokens X' = normalise(M)^T X, N' = N - r, trained to reduce a variational upper bound of
an information-bottleneck (IB) loss. The public code holds only that loss and no mask module, so
tmerge makes the following choices (each one the paper leaves open):

1. **Destinations.** N' = N - r tokens: exactly the tokens ToMe keeps (prefix, unmerged A, all B),
   in ToMe's output order, chosen by ToMe's bipartite matching on the head-averaged keys. Only the r
   tokens ToMe merges are spread by the mask; every other token goes to its own slot with weight 1.
   The mask is therefore sparse (k non-zeros per merged row), which keeps shapes static and the
   graph as cheap as ToMe's: every token takes ToMe's hard path (one slot), the r merged tokens send
   weight w_0 there, and r (k - 1) extra rows (copies of the merged tokens, ``MergePlan.sources``)
   carry the other k - 1 shares. The mask module scores only those r tokens.
2. **Candidates.** Each merged A token may send its mass to its top-k (k = 3, option ``topk``) B
   tokens by ToMe's similarity; candidate 0 is ToMe's own match (its argmax).
3. **Mask module** (one per block): a bilinear scorer on layer-normalised token features (the
   tokens after the attention residual, the ones being merged): h_j = <W_q LN(x_a), W_k LN(x_bj)> /
   sqrt(d) + w_s * sim(a, b_j) with d = 32 (option ``mask_dim``), w_s initialised to 1/0.1. The merge
   weights are a gated mixture ``w = (1 - g) * onehot(ToMe's match) + g * softmax(h)`` with a learned
   per-block gate g in [0, 1] (clamped), initialised to 0, so an untrained LTM equals ToMe exactly
   and the first gradient step already moves g. In training the clamp passes its gradient through
   (straight-through): with a plain clamp, a gate the first steps push below 0 (the scorer is still
   random then) never gets a gradient again and LTM stays ToMe for good. While g is 0 the scorer
   would get no gradient, so a value-free term 0.05 * (softmax(h) - stopgrad(softmax(h))) lets it
   learn which spreading would help (a straight-through-style estimator); the gate alone decides how
   much of it is used.
4. **Normalisation of M.** Size-weighted, like every tmerge merge: token a sends share w_aj of its
   size s_a to destination j; destination x_j = sum(share * x) / sum(share) (the shared primitive
   with (B, N, K) slots and weights), so sizes are conserved and proportional attention stays valid.
5. **Training** (see :mod:`tmerge.training`, which calls this file's training hooks): backbone
   frozen; loss = distillation (KL to the unmerged model's logits, or 1 - cosine to its features for
   headless backbones) + lambda * IB term (lambda = 0.1, ``--ib-weight``). Nothing in the mask depends
   on r, so one mask trained with r sampled per step serves a range of r. The IB term is the cluster-level cross-entropy of the paper's code:
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
from ..base import (
    BlockInput,
    MergePlan,
    Option,
    bipartite_choice,
    bipartite_sides,
    block_constants,
    candidate_destinations,
    key_metric,
    lookup,
    take_rows,
    tome_plan,
)
from .tome import ToMe

SCORER_GRAD = 0.05  # the scorer learns as if the gate were at least this open (value unchanged)
IB_CLUSTERS = 16
IB_TEMPERATURE = 0.1


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
        hard = (torch.arange(sim.shape[-1], device=sim.device) == 0).to(soft.dtype)  # ToMe's choice
        g = self.gate.clamp(0.0, 1.0)
        if self.training:  # the gradient passes the clamp: a gate pushed below 0 early can reopen later
            g = self.gate + (g - self.gate).detach()
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
        self._ib: tuple[Tensor, Tensor, int, float] | None = None  # centroids, labels, #labels, weight

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
            raise TmergeError("LTM is not bound to a model: use tmerge.apply(model, MergeConfig.of('ltm', ...))")
        consts = block_constants(self, block)
        x = block.x
        bsz, n, width = x.shape
        choice = bipartite_choice(*bipartite_sides(key_metric(block.keys), block.num_prefix), block.r)
        tome = tome_plan(consts, choice, n)
        n_b = choice.scores.shape[2]
        k = max(1, min(int(self.config["topk"]), n_b))
        # only the r tokens ToMe merges are spread, over their k best B tokens
        rows = choice.scores.gather(1, choice.merged.unsqueeze(-1).expand(-1, -1, n_b))
        cand_idx, cand_score = candidate_destinations(rows, choice.match, k)  # (B, r, k)
        x_cand = take_rows(x, lookup(consts["b_tok"], cand_idx.flatten(1))).view(bsz, -1, k, width)
        weights = self.masks[block.layer](take_rows(x, tome.src), x_cand, cand_score)  # (B, r, k)
        # one row per (candidate, merged token), candidate-major: the first r rows are ToMe's own merges
        route = weights.mT.unsqueeze(-1) * lookup(consts["b_route"], cand_idx.mT)  # (B, k, r, M)
        return MergePlan(keep=tome.keep, src=tome.src.repeat(1, k, 1), route=route.flatten(1, 2), num_tokens=n,
                         hard=False)

    # ---- training hooks -------------------------------------------------------------------
    def trainable_layers(self) -> list[nn.Module]:
        return list(self.masks)

    def prepare_training(self, outputs: Tensor, features: Tensor, *, headless: bool, seed: int,
                         extra_loss_weight: float) -> None:
        """The IB term's centroids and pseudo-labels from the unmerged model (module docstring, 5)."""
        self._ib = None
        if extra_loss_weight <= 0:
            return
        centroids = kmeans(features, IB_CLUSTERS, seed=seed)
        if headless:
            labels = torch.cdist(F.normalize(features.float(), dim=-1), centroids).argmin(1)
            num_labels = centroids.shape[0]
        else:
            labels, num_labels = outputs.argmax(-1), outputs.shape[-1]
        device = next(self.parameters()).device
        self._ib = (centroids.to(device), labels, num_labels, extra_loss_weight)

    def extra_loss(self, features: Tensor, index: Tensor) -> Tensor | None:
        if self._ib is None:
            return None
        centroids, labels, num_labels, weight = self._ib
        return weight * ib_loss(features, labels[index].to(features.device), centroids, num_labels)


def kmeans(features: Tensor, k: int, seed: int = 0, iters: int = 25) -> Tensor:
    """Plain Lloyd k-means (k-means++ init, seeded) on L2-normalised features; returns (k, D)."""
    x = F.normalize(features.float(), dim=-1)
    k = min(k, x.shape[0])
    gen = torch.Generator().manual_seed(seed)
    centroids = [x[torch.randint(x.shape[0], (1,), generator=gen)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centroids)).pow(2).min(1).values
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        centroids.append(x[torch.multinomial(probs, 1, generator=gen)].squeeze(0))
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0)
    return c


def cluster_assign(features: Tensor, centroids: Tensor, temperature: float = IB_TEMPERATURE) -> Tensor:
    """phi(f) = softmax(-||f_hat - c_k||^2 / t) (N, K) on L2-normalised features."""
    d2 = torch.cdist(F.normalize(features.float(), dim=-1), centroids).pow(2)
    return torch.softmax(-d2 / temperature, dim=-1)


def ib_loss(features: Tensor, labels: Tensor, centroids: Tensor, num_labels: int) -> Tensor:
    """Cluster-level cross-entropy: -mean_i sum_k phi_ik log Q[k, y_i], Q[:, y] = mean phi over label y."""
    phi = cluster_assign(features, centroids)  # (B, K)
    onehot = F.one_hot(labels, num_labels).to(phi.dtype)  # (B, L)
    q = (phi.T @ onehot) / onehot.sum(0).clamp_min(1)  # (K, L)
    return -(phi * torch.log(q[:, labels].T + 1e-8)).sum(-1).mean()
