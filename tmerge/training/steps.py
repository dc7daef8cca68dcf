"""What each training step uses, as functions of the seed and the step counter only (so a resumed run
continues exactly as the uninterrupted one): the data order, the r drawn from a range, the value of an
annealed option and the learning rate."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..patch import set_schedule
from ..schedule import ScheduleSpec
from .distributed import Dist


def epoch_order(n: int, seed: int, epoch: int, dist: Dist) -> Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    per_rank = max(1, n // dist.world)
    if dist.world > 1:
        perm = perm[: per_rank * dist.world][dist.rank::dist.world] if n >= dist.world else perm[:1]
    return perm


def batches_per_epoch(n: int, batch_size: int, dist: Dist) -> int:
    return math.ceil(max(1, n // dist.world) / batch_size)


def set_constant_r(model: nn.Module, r: int) -> None:
    """Switch a patched model to a constant-r schedule in place (the method keeps its parameters)."""
    set_schedule(model, ScheduleSpec(r=r))


def sampled_r(r_range: tuple[int, int], seed: int, step: int) -> int:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * step + 1)
    return int(torch.randint(r_range[0], r_range[1] + 1, (1,), generator=gen))


def annealed(values: tuple[float, float], step: int, total: int) -> float:
    start, end = float(values[0]), float(values[1])
    t = step / max(1, total - 1)
    return start * (end / start) ** t


def cosine_lr(lr: float, step: int, total: int) -> float:
    """The learning rate at ``step`` of ``total``: cosine decay from ``lr`` to 0."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / total))
