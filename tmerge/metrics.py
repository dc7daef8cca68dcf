"""Drift metrics: how far a merged model's outputs move from the unmerged model's on the same
inputs. Shared by training (held-out drift, distillation targets) and profiling (reports, tuning)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .models.forward import forward_with_features, has_classifier
from .patch import merge_method


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


@torch.no_grad()
def model_outputs(model: nn.Module, images, batch_size: int = 32, device=None) -> tuple[Tensor, Tensor]:
    """(outputs, pooled pre-logits features) of ``model`` on ``images`` in float32, ``batch_size`` at
    a time; outputs are the logits, or the features when headless. ``images``: a (N, 3, H, W) tensor
    or any object with ``len()`` whose ``[index_tensor]`` gives such a batch. With ``device`` each
    batch runs there and the results are gathered on the CPU; without, they stay where the model ran."""
    outs, feats = [], []
    for index in torch.arange(len(images)).split(batch_size):
        batch = images[index]
        o, f = forward_with_features(model, batch if device is None else batch.to(device))
        outs.append(o.float() if device is None else o.float().cpu())
        feats.append(f.float() if device is None else f.float().cpu())
    return torch.cat(outs), torch.cat(feats)


@torch.no_grad()
def merged_drift(model: nn.Module, images, reference: Tensor, *, logits: bool, batch_size: int, device) -> dict:
    """:func:`output_drift` of a merged ``model`` on ``images`` from ``reference`` (the unmerged
    outputs), with the merge method in eval mode (the hard merge) whatever its mode was."""
    method = merge_method(model)
    was_training = method.training
    method.eval()
    try:
        merged, _ = model_outputs(model, images, batch_size, device)
    finally:
        method.train(was_training)
    return output_drift(reference, merged, logits=logits)


def drift_between(merged: nn.Module, unmerged: nn.Module, images: Tensor, labels: Tensor | None = None,
                  class_names: list[str] | None = None, *, reference: tuple[Tensor, Tensor] | None = None) -> dict:
    """Drift of the merged model from the unmerged one on ``images`` (metrics that do not apply: None).

    ``reference``: the unmerged model's :func:`model_outputs` on ``images``, when already computed."""
    logits = has_classifier(unmerged)
    ref_out, ref_feat = reference if reference is not None else model_outputs(unmerged, images)
    mer_out, mer_feat = model_outputs(merged, images)
    use_labels = (labels is not None and logits and class_names is not None
                  and len(class_names) == int(unmerged.num_classes))
    d = output_drift(ref_out, mer_out, labels if use_labels else None, logits=logits)
    feat = output_drift(ref_feat, mer_feat, logits=False)
    return {
        "outputs": "logits" if logits else "features",
        "n": d["n"],
        "agreement_top1": d.get("agreement_top1"),
        "kl_mean": d.get("kl_mean"),
        "cosine_mean": d["cosine_mean"],
        "cosine_min": d["cosine_min"],
        "cosine_distance_mean": d["cosine_distance_mean"],
        "max_abs_diff": d["max_abs_diff"],
        "feature_cosine_mean": feat["cosine_mean"],
        "knn_agreement": knn_agreement(ref_feat, mer_feat),
        "accuracy_top1_reference": d.get("accuracy_top1_reference"),
        "accuracy_top1_merged": d.get("accuracy_top1_merged"),
        "accuracy_top1_delta": d.get("accuracy_top1_delta"),
        "labels": "used" if use_labels else ("ignored: classes differ from the model's head" if labels is not None
                                             else None),
    }
