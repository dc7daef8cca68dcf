"""The one merge primitive every method shares.

A method only decides *where* each token goes, as a :class:`~tmerge.merging.MergePlan`: the token
copied into each output slot (``keep``), the tokens added on top (``src``) and the share of each one's
size each slot receives (``route``). The merge itself is always the size-weighted average over each
slot::

    x'_j = sum_{i -> j} s_i x_i / sum_{i -> j} s_i,     s'_j = sum_{i -> j} s_i

computed as sums of ``s * x`` and of ``s`` followed by one division. It never uses a "mean"
reduction: ONNX has no mean scatter, and the dynamo exporter silently turns
``scatter_reduce(..., "mean")`` into an overwrite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import TmergeError
from .base import MergePlan, take_rows

MERGE_FORMS = ("gather", "scatter", "onehot")
DEFAULT_FORM = "gather"


def check_form(form: str) -> str:
    """``form`` when it is a merge form (:data:`MERGE_FORMS`), else a one-line TmergeError."""
    if form not in MERGE_FORMS:
        raise TmergeError(f"merge_form must be one of {', '.join(MERGE_FORMS)}, got {form!r}")
    return form


def merge_tokens(x: Tensor, size: Tensor | None, plan: MergePlan, form: str = DEFAULT_FORM
                 ) -> tuple[Tensor, Tensor]:
    """Size-weighted merge of ``x`` (B, N, C) with sizes ``size`` (B, N, 1; None = all ones) by ``plan``.

    All forms compute the same sums; they differ in the ops eager PyTorch and traced graphs (ONNX,
    torch.compile) run:

    - ``"gather"`` (default): the kept and the added rows of ``s * x`` are gathered, then one small
      batched product ``route^T @ added`` (M x E, E = r for a hard merge) is added to the kept rows;
      the sizes take the same two steps on their own (B, N, 1) tensor. No scatter, no atomics: exact
      and bit-identical run to run on every runtime and thread count. Tokens and sizes are not joined
      into one (B, N, C + 1) tensor: joining and splitting them again were two more full passes over
      the tokens, the largest part of the step's cost at batch 8.
    - ``"scatter"``: the added rows are summed with ScatterElements(add), the form TensorRT parses
      (through NVIDIA's plugin). Soft plans use the product.
    - ``"onehot"``: no gather either: (M x N) one-hot matrices and two products (O(N^2 C) work).
    The scatter and one-hot forms carry the size as an extra channel of the tokens.

    The merge runs outside autocast: under fp16/bf16 autocast the residual stream stays in its own
    precision instead of being rounded by a half-precision product.
    """
    check_form(form)
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return _merge(x, size, plan, form)
    return _merge(x, size, plan, form)


def _merge(x: Tensor, size: Tensor | None, plan: MergePlan, form: str) -> tuple[Tensor, Tensor]:
    route = plan.route if plan.route.dtype == x.dtype else plan.route.to(x.dtype)
    if form == "gather":
        return _gather_merge(x, size, plan, route.mT)
    channels = x.shape[-1]
    rows = F.pad(x, (0, 1), value=1.0) if size is None else torch.cat([x * size, size], dim=-1)
    if form == "onehot":
        tokens = torch.arange(x.shape[1], device=x.device)
        take_kept = (plan.keep == tokens).to(rows.dtype)  # (B, M, N)
        if plan.keep_weight is not None:
            take_kept = take_kept * plan.keep_weight
        take_added = (plan.src == tokens).to(rows.dtype)  # (B, E, N)
        out = torch.baddbmm(take_kept, route.mT, take_added) @ rows
    else:
        out = take_rows(rows, plan.keep)
        if plan.keep_weight is not None:
            out = out * plan.keep_weight
        added = take_rows(rows, plan.src)
        if plan.hard:
            out = out.scatter_add(1, route.argmax(-1, keepdim=True).expand_as(added), added)
        else:
            out = torch.baddbmm(out, route.mT, added)
    total_x, total = out.split([channels, 1], dim=-1)
    return total_x / total, total


def _gather_merge(x: Tensor, size: Tensor | None, plan: MergePlan, to_slot: Tensor) -> tuple[Tensor, Tensor]:
    """The gather form: sums of ``s * x`` and of ``s`` into each slot (``to_slot`` = route^T, (B, M, E)),
    then one division. Before the first merge (``size`` None: all ones) ``s * x`` is ``x`` and a
    slot's size is its kept share plus the route's row sum."""
    if size is None:
        kept_x, kept_s = take_rows(x, plan.keep), plan.keep_weight
        total_x = torch.baddbmm(kept_x if kept_s is None else kept_x * kept_s, to_slot, take_rows(x, plan.src))
        added_s = to_slot.sum(-1, keepdim=True)
        total = added_s + 1.0 if kept_s is None else kept_s + added_s
        return total_x / total, total
    weighted = x * size
    kept_x, kept_s = take_rows(weighted, plan.keep), take_rows(size, plan.keep)
    if plan.keep_weight is not None:
        kept_x, kept_s = kept_x * plan.keep_weight, kept_s * plan.keep_weight
    total_x = torch.baddbmm(kept_x, to_slot, take_rows(weighted, plan.src))
    total = torch.baddbmm(kept_s, to_slot, take_rows(size, plan.src))
    return total_x / total, total


def plan_from_slots(slots: Tensor, num_out: int, weights: Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> MergePlan:
    """A plan from a slot map: ``slots`` (B, N) (token i goes to slot ``slots[b, i]``; every slot gets
    at least one token) or, with ``weights``, (B, N, K) slots with the share of the token's size sent
    to each. Used to replay recorded choices; not on the hot path."""
    n = slots.shape[1]
    if weights is None and slots.dim() == 2:
        keep, extra, dest = split_slots(slots, num_out)
        route = F.one_hot(dest, num_out).to(dtype)
        return MergePlan(keep=keep.unsqueeze(-1), src=extra.unsqueeze(-1), route=route, num_tokens=n)
    if slots.dim() == 2:
        slots = slots.unsqueeze(-1)
    bsz, _, k = slots.shape
    weights = torch.ones(slots.shape, dtype=dtype, device=slots.device) if weights is None else weights
    src = torch.arange(n, device=slots.device).repeat_interleave(k).view(1, -1, 1).expand(bsz, -1, -1)
    route = F.one_hot(slots.reshape(bsz, n * k), num_out).to(dtype) * weights.reshape(bsz, n * k, 1).to(dtype)
    nothing = torch.zeros(bsz, num_out, 1, dtype=torch.long, device=slots.device)
    return MergePlan(keep=nothing, src=src, route=route, num_tokens=n, keep_weight=torch.zeros_like(nothing, dtype=dtype),
                     hard=False)


def merge_slots(x: Tensor, size: Tensor | None, slots: Tensor, num_out: int, weights: Tensor | None = None,
                form: str = DEFAULT_FORM) -> tuple[Tensor, Tensor]:
    """:func:`merge_tokens` by a slot map (see :func:`plan_from_slots`)."""
    return merge_tokens(x, size, plan_from_slots(slots, num_out, weights, dtype=x.dtype), form)


def split_slots(slots: Tensor, num_out: int) -> tuple[Tensor, Tensor, Tensor]:
    """(keep, extra, dest) of a slot map (B, N) onto ``num_out`` = M slots, all static shapes.

    ``keep`` (B, M): the first token of each slot, in slot order; ``extra`` (B, N - M): the other
    tokens, grouped by slot; ``dest`` (B, N - M): the slot of each extra token. Two sorts of N
    distinct integer keys (so sort stability does not matter): tokens grouped by slot, then the
    group starts (key = their slot) ahead of the rest (key = M + position).
    """
    n = slots.shape[1]
    position = torch.arange(n, device=slots.device)
    order = torch.sort(slots * n + position, dim=1, stable=True).indices
    grouped = slots.gather(1, order)
    starts = grouped != torch.cat([grouped[:, :1] - 1, grouped[:, :-1]], dim=1)
    pos = torch.sort(torch.where(starts, grouped, num_out + position), dim=1, stable=True).indices
    rest = pos[:, num_out:]
    return order.gather(1, pos[:, :num_out]), order.gather(1, rest), grouped.gather(1, rest)
