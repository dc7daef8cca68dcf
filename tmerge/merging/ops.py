"""The one merge primitive every method shares.

A method only decides *where* each token goes: ``slots[b, i]`` is the output position that input
token ``i`` is merged into (several tokens may share a slot; every slot gets at least one). The merge
itself is always the size-weighted average over each slot::

    x'_j = sum_{i -> j} s_i x_i / sum_{i -> j} s_i,     s'_j = sum_{i -> j} s_i

computed as sums of ``s * x`` and of ``s`` followed by a division. It never uses a "mean"
reduction: ONNX has no mean scatter, and the dynamo exporter silently turns
``scatter_reduce(..., "mean")`` into an overwrite.

Soft merges give each token K slots with weights: ``slots`` is then (B, N, K) and ``weights``
(B, N, K) holds the share of the token sent to each slot (rows summing to 1 conserve size).
Sparse soft merges (LTM: only the r merged tokens are spread) instead append E extra rows, copies of
the tokens ``sources`` (B, E), with their own slots and weights: (B, N + E) slots, (B, N + E, 1)
weights, so the merge costs ToMe's plus E rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

MERGE_FORMS = ("gather", "scatter", "onehot")
DEFAULT_FORM = "gather"


def merge_tokens(
    x: Tensor,
    size: Tensor,
    slots: Tensor,
    num_out: int,
    weights: Tensor | None = None,
    form: str = DEFAULT_FORM,
    sources: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Size-weighted merge of ``x`` (B, N, C) with sizes ``size`` (B, N, 1) into ``num_out`` slots.

    All forms compute the same sums; they differ in the ops eager PyTorch and traced graphs (ONNX,
    torch.compile) run:

    - ``"gather"`` (default): a Gather copies each slot's first token; only the (at most r) slots
      that receive the r other tokens are recomputed, with a small (r x r) 0/1 product, and written
      with ScatterND (no reduction; a slot written twice gets the same copied row). No summing
      scatter, so no runtime can lose or reorder updates: exact and bit-identical run to run on
      every runtime and thread count, touching r rows instead of N. Soft plans (K > 1) use the
      one-hot product.
    - ``"scatter"``: ScatterElements(add), the form TensorRT parses (through NVIDIA's plugin).
    - ``"onehot"``: a (M x N) one-hot matrix product, no scatter (O(N^2 C) work).

    (A ScatterND(add) form was removed: ONNX Runtime's CPU kernel loses updates when indices repeat
    and more than one thread runs it; ``tests/runtime/test_stress.py`` keeps that documented.)
    """
    if form not in MERGE_FORMS:
        raise ValueError(f"unknown merge form {form!r}; expected one of {MERGE_FORMS}")
    if sources is not None:  # extra rows: second shares of the tokens ``sources``
        x = torch.cat([x, x.gather(1, sources.unsqueeze(-1).expand(-1, -1, x.shape[-1]))], dim=1)
        size = torch.cat([size, size.gather(1, sources.unsqueeze(-1))], dim=1)
    if form == "gather" and (slots.dim() == 2 or slots.shape[-1] == 1):
        share = size if weights is None else size * weights.reshape(size.shape)
        return _gather_merge(x, share, slots.reshape(slots.shape[0], -1), num_out)
    if form == "gather":  # soft plans with K slots per token: the one-hot product
        form = "onehot"
    if slots.dim() == 2:
        slots = slots.unsqueeze(-1)
    share = size if weights is None else size * weights  # (B, N, K): size token i sends to each slot
    bsz, n, k = slots.shape
    if form == "onehot":
        targets = torch.arange(num_out, device=slots.device)
        if k == 1:
            route_t = (slots.transpose(1, 2) == targets.view(1, -1, 1)).to(x.dtype) * share.transpose(1, 2)
        else:
            route_t = ((slots.unsqueeze(-1) == targets).to(x.dtype) * share.unsqueeze(-1)).sum(2).transpose(1, 2)
        return _normalise(route_t @ x, route_t.sum(-1, keepdim=True))  # route_t: (B, num_out, N)
    flat_slots = slots.reshape(bsz, n * k)
    flat_share = share.reshape(bsz, n * k, 1)
    src = x.unsqueeze(2).expand(bsz, n, k, x.shape[-1]).reshape(bsz, n * k, -1) if k > 1 else x
    values = torch.cat([src * flat_share, flat_share], dim=-1)  # one scatter for s*x and s together
    sums = _scatter_into_slots(values, flat_slots, num_out)
    return _normalise(sums[..., :-1], sums[..., -1:])


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


def _gather_merge(x: Tensor, size: Tensor, slots: Tensor, num_out: int) -> tuple[Tensor, Tensor]:
    """The gather form: copy each slot's first token, then overwrite only the slots that receive the
    r extra tokens with their full size-weighted average. Extras that share a slot all write the
    row computed for the first of them, so the order of the writes cannot matter.

    Rows are taken from the batch flattened to (B*N, C) (ONNX Gather / ScatterND on whole rows),
    with reshapes to -1 so that a dynamic batch needs no shape arithmetic in the graph."""
    n, c = x.shape[1], x.shape[2]
    keep, extra, dest = split_slots(slots, num_out)
    r = extra.shape[1]
    batch = torch.ones_like(keep[:, :1]).cumsum(0) - 1  # (B, 1): 0, 1, 2, ...
    x_rows, size_rows = x.reshape(-1, c), size.reshape(-1, 1)
    kept = (keep + batch * n).reshape(-1)
    out, out_size = x_rows.index_select(0, kept), size_rows.index_select(0, kept)
    if r:
        first = (keep.gather(1, dest) + batch * n).reshape(-1)  # the token each extra joins
        added = (extra + batch * n).reshape(-1)
        same = (dest.unsqueeze(2) == dest.unsqueeze(1)).to(x.dtype)  # (B, r, r): extras sharing a slot
        s_first = size_rows.index_select(0, first).reshape(-1, r, 1)
        s_added = size_rows.index_select(0, added).reshape(-1, r, 1)
        total = s_first + same @ s_added
        weighted = s_first * x_rows.index_select(0, first).reshape(-1, r, c)
        merged = (weighted + same @ (s_added * x_rows.index_select(0, added).reshape(-1, r, c))) / total
        leader = (same.argmax(-1) + batch * r).reshape(-1)  # the first extra of each slot
        slot = (dest + batch * num_out).reshape(-1)
        out = out.index_put((slot,), merged.reshape(-1, c).index_select(0, leader))
        out_size = out_size.index_put((slot,), total.reshape(-1, 1).index_select(0, leader))
    return out.reshape(-1, num_out, c), out_size.reshape(-1, num_out, 1)


def _scatter_into_slots(values: Tensor, slots: Tensor, num_out: int) -> Tensor:
    """out[b, slots[b, i]] += values[b, i]: ScatterElements(add) when traced, ``index_add`` over the
    flattened batch in eager PyTorch (~5x faster than scatter_add on CPU)."""
    bsz, n, c = values.shape
    if torch.compiler.is_compiling():
        index = slots.unsqueeze(-1).expand(bsz, n, c)
        return values.new_zeros(bsz, num_out, c).scatter_add(1, index, values)
    offsets = torch.arange(bsz, device=slots.device).unsqueeze(1) * num_out
    flat = (slots + offsets).reshape(-1)
    return values.new_zeros(bsz * num_out, c).index_add(0, flat, values.reshape(bsz * n, c)).view(bsz, num_out, c)


def _normalise(weighted: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    return weighted / total, total
