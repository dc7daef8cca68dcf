"""The distillation targets and loss: the unmerged model's outputs on the training images (computed
once, reused every epoch), the loss against them, and ToMe's loss at each r for the "balanced r"
training (each step's loss divided by the untrained method's at that step's r)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..metrics import model_outputs
from ..models.forward import forward_with_features
from ..patch import merge_method
from .steps import set_constant_r


def teacher_outputs(teacher: nn.Module, images, batch_size: int, device) -> tuple[Tensor, Tensor]:
    """(outputs, pooled features) of the unmerged ``teacher`` on ``images``, float32 on the CPU: the
    targets of :func:`~tmerge.training.train_adapter` (its ``teacher_outputs``, to share them
    between several trainings on the same images)."""
    return model_outputs(teacher, images, batch_size, device)


def distill_loss(student: Tensor, teacher: Tensor, headless: bool) -> Tensor:
    if headless:
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    return F.kl_div(student.float().log_softmax(-1), teacher.float().log_softmax(-1), log_target=True,
                    reduction="batchmean")


@torch.no_grad()
def tome_reference_loss(model: nn.Module, images, t_out: Tensor, r_values: range, headless: bool, n: int,
                        batch_size: int, device) -> dict[int, float]:
    """Distillation loss of the untrained method (ToMe's merge) at each r on the first ``n`` images."""
    merger = merge_method(model)
    was_training = merger.training
    merger.eval()
    index = torch.arange(min(n, len(images)))
    reference = {}
    try:
        for r in r_values:
            set_constant_r(model, r)
            losses = [distill_loss(forward_with_features(model, images[i].to(device))[0], t_out[i].to(device),
                                   headless) * len(i) for i in index.split(batch_size)]
            reference[r] = max(float(sum(losses)) / len(index), 1e-12)
    finally:
        merger.train(was_training)
    return reference
