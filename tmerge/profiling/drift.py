"""How far a merged model's outputs move from the unmerged model's on the same inputs."""

from __future__ import annotations

import torch
from torch import Tensor


def output_drift(reference: Tensor, merged: Tensor, labels: Tensor | None = None, *, logits: bool = True) -> dict:
    """Drift of ``merged`` outputs from ``reference`` outputs (both (N, D), same inputs, same order).

    Always: cosine similarity (mean, min) and the mean cosine distance. When the outputs are class
    logits (``logits=True``): top-1 agreement, mean KL(reference || merged) of the softmax outputs,
    and with ``labels`` the top-1 accuracy of each and their delta (merged - reference).
    """
    reference, merged = reference.detach().float(), merged.detach().float()
    # rounding can put a cosine a hair outside [-1, 1] or a KL a hair below 0; reports hold true ranges
    cos = torch.nn.functional.cosine_similarity(reference, merged, dim=-1).clamp(-1.0, 1.0)
    out = {
        "n": int(reference.shape[0]),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "cosine_distance_mean": float((1 - cos).mean()),
        "max_abs_diff": float((reference - merged).abs().max()),
    }
    if logits:
        ref_logp = reference.log_softmax(-1)
        kl = (ref_logp.exp() * (ref_logp - merged.log_softmax(-1))).sum(-1).clamp_min(0.0)
        ref_top1, merged_top1 = reference.argmax(-1), merged.argmax(-1)
        out["agreement_top1"] = float((ref_top1 == merged_top1).float().mean())
        out["kl_mean"] = float(kl.mean())
        if labels is not None:
            acc_ref = float((ref_top1 == labels).float().mean())
            acc_merged = float((merged_top1 == labels).float().mean())
            out.update(accuracy_top1_reference=acc_ref, accuracy_top1_merged=acc_merged,
                       accuracy_top1_delta=acc_merged - acc_ref)
    return out


def knn_agreement(reference: Tensor, merged: Tensor, k: int = 1) -> float | None:
    """Share of images whose k nearest neighbours (cosine, among the other images) are the same set
    in the merged model's feature space as in the reference's: retrieval drift for headless models.
    None with fewer than k + 1 images."""
    n = reference.shape[0]
    if n < k + 1:
        return None

    def neighbours(features: Tensor) -> Tensor:
        f = torch.nn.functional.normalize(features.detach().float().flatten(1), dim=-1)
        sim = f @ f.T
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=-1).indices.sort(dim=-1).values

    return float((neighbours(reference) == neighbours(merged)).all(-1).float().mean())
