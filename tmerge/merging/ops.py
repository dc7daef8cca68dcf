"""The one merge primitive every method shares.

A method only decides *where* each token goes: ``slots[b, i]`` is the output position that input
token ``i`` is merged into (several tokens may share a slot). The merge itself is always the
size-weighted average over each slot::

    x'_j = sum_{i -> j} s_i x_i / sum_{i -> j} s_i,     s'_j = sum_{i -> j} s_i

computed as a sum-scatter of ``s * x`` and of ``s`` followed by a division. It never uses a "mean"
reduction: ONNX has no mean scatter, and the dynamo exporter silently turns
``scatter_reduce(..., "mean")`` into an overwrite.

Soft merges (LTM) give each token K slots with weights: ``slots`` is then (B, N, K) and ``weights``
(B, N, K) holds the share of the token sent to each slot (rows summing to 1 conserve size).
"""

from __future__ import annotations

import torch
from torch import Tensor

MERGE_FORMS = ("scatter", "onehot")


def merge_tokens(
    x: Tensor,
    size: Tensor,
    slots: Tensor,
    num_out: int,
    weights: Tensor | None = None,
    form: str = "scatter",
) -> tuple[Tensor, Tensor]:
    """Size-weighted merge of ``x`` (B, N, C) with sizes ``size`` (B, N, 1) into ``num_out`` slots.

    ``form="scatter"`` uses ScatterElements(add); ``form="onehot"`` computes the same sums as a
    one-hot matrix product (no scatter at all), for runtimes with weak scatter support.
    """
    if slots.dim() == 2:
        slots = slots.unsqueeze(-1)
    share = size if weights is None else size * weights  # (B, N, K): size token i sends to each slot
    bsz, n, k = slots.shape
    if form == "onehot":
        onehot = torch.nn.functional.one_hot(slots, num_out).to(x.dtype)  # (B, N, K, num_out)
        route = (onehot * share.unsqueeze(-1)).sum(2)  # (B, N, num_out)
        route_t = route.transpose(1, 2)
        return _normalise(route_t @ x, route_t.sum(-1, keepdim=True))
    if form != "scatter":
        raise ValueError(f"unknown merge form {form!r}; expected one of {MERGE_FORMS}")
    flat_slots = slots.reshape(bsz, n * k)
    flat_share = share.reshape(bsz, n * k, 1)
    src = x.unsqueeze(2).expand(bsz, n, k, x.shape[-1]).reshape(bsz, n * k, -1) if k > 1 else x
    return _normalise(*_sum_into_slots(torch.cat([src * flat_share, flat_share], dim=-1), flat_slots, num_out))


def _sum_into_slots(values: Tensor, slots: Tensor, num_out: int) -> tuple[Tensor, Tensor]:
    """out[b, slots[b, i]] += values[b, i]; returns (sums of s*x, sums of s) split off the last column.

    Traced (ONNX export, torch.compile): ScatterElements(add), which every runtime we target has.
    Eager: the same sums with ``index_add_`` over the flattened batch, ~5x faster than scatter_add on
    CPU (it adds whole rows instead of element by element).
    """
    bsz, n, c = values.shape
    if torch.compiler.is_compiling():
        index = slots.unsqueeze(-1).expand(bsz, n, c)
        sums = values.new_zeros(bsz, num_out, c).scatter_add(1, index, values)
    else:
        offsets = torch.arange(bsz, device=slots.device).unsqueeze(1) * num_out
        flat = (slots + offsets).reshape(-1)
        sums = values.new_zeros(bsz * num_out, c).index_add_(0, flat, values.reshape(bsz * n, c))
        sums = sums.view(bsz, num_out, c)
    return sums[..., :-1], sums[..., -1:]


def _normalise(weighted: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    return weighted / total, total
