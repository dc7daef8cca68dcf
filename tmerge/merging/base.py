"""What a merging method is: something that, per block, *chooses* where each token goes."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import TmergeError


@dataclass
class BlockInput:
    """Everything a method may look at when choosing the merge of one block.

    ``keys`` are the attention keys (B, heads, N, head_dim) after the block's q/k norm (or what the
    method's ``merge_keys`` substitutes for them),
    ``attn_input`` is the normalised input that fed qkv (B, N, C), ``x`` the tokens after the
    attention residual, ``size`` the token sizes (B, N, 1), or None before the first merge (all ones).
    ``consts`` are the method's index constants for this block (:meth:`MergeMethod.constants`), built
    once per schedule by the patched model; None makes the method build them on the fly.
    """

    layer: int
    depth: int
    r: int
    num_prefix: int
    keys: Tensor
    attn_input: Tensor
    x: Tensor
    size: Tensor | None
    consts: dict[str, Tensor] | None = None


@dataclass
class MergePlan:
    """Where the tokens of one block go, as static-shape index tensors (no data-dependent shapes).

    - ``keep`` (B, M, 1): the token copied into each of the M output slots, in output order;
    - ``src`` (B, E, 1): tokens added into a slot on top of it (ToMe: the r merged tokens);
    - ``route`` (B, E, M): the share of each ``src`` row's size sent to each slot: one-hot rows for a
      hard merge, weights for soft ones (LTM, DTEM's training relaxation). A token may appear in
      ``src`` several times (one row per share);
    - ``keep_weight`` (B, M, 1) or None: the share of its size each kept token keeps (soft merges).

    ``num_tokens`` is the number of input tokens N. The first N - M rows of ``src`` are the tokens not
    in ``keep``, each once, with its main destination first (:attr:`slots` reads them).
    ``hard`` says every route row is one-hot with weight 1 (the merge-form choice depends on it).
    """

    keep: Tensor
    src: Tensor
    route: Tensor
    num_tokens: int
    keep_weight: Tensor | None = None
    hard: bool = True

    @property
    def num_out(self) -> int:
        return self.keep.shape[1]

    @property
    def slots(self) -> Tensor:
        """(B, N) int64: the output slot of every input token (its main one, for soft merges).

        Not part of the merge itself: recorded for verification, replay and visualisation."""
        bsz, m = self.keep.shape[0], self.num_out
        moved = self.num_tokens - m
        ids = torch.arange(m, device=self.keep.device).expand(bsz, m)
        slots = torch.zeros(bsz, self.num_tokens, dtype=torch.long, device=self.keep.device)
        slots = slots.scatter(1, self.keep[..., 0], ids)
        if moved:
            slots = slots.scatter(1, self.src[:, :moved, 0], self.route[:, :moved].argmax(-1))
        return slots


@dataclass(frozen=True)
class Option:
    """One method option: its default, help, type and allowed range.

    ``high="depth"`` bounds an integer by the model's number of blocks. ``None`` is accepted only
    where it is the default (it then means "the method decides").
    """

    default: Any
    help: str
    type: type = float
    low: float | None = None
    high: float | str | None = None
    low_open: bool = False  # True: ``low`` itself is not allowed

    def parse(self, name: str, value: Any, method: str, depth: int) -> Any:
        """``value`` checked and converted (e.g. "0.9" -> 0.9); a one-line TmergeError otherwise."""
        if value is None and self.default is None:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        what = "an integer" if self.type is int else "a number"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and self.type is int:
            ok = float(value).is_integer()
        if not ok or not math.isfinite(value):
            raise TmergeError(f"{method} option {name} must be {what}, got {value!r}")
        value = self.type(value)
        high = depth if self.high == "depth" else self.high
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        if below or (high is not None and value > high):
            lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
            hi = "" if high is None else f"<= {high:g}"
            raise TmergeError(f"{method} option {name} must be {' and '.join(p for p in (lo, hi) if p)}, got {value!r}")
        return value


class MergeMethod(nn.Module):
    """Base class. Subclasses set ``name``, ``options`` and implement :meth:`plan`.

    Methods are ``nn.Module`` so that learned ones (DTEM, LTM) carry their parameters; options are
    keyword arguments of ``__init__`` listed in ``options`` (name -> Option) for the CLI and reports.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    prop_attn_default: ClassVar[bool] = True
    # The merge plugin node (see tmerge.plugins.spec): its op type, which is also the TensorRT plugin
    # name, and the method's own node attributes (name -> int, float or str). None: no plugin node.
    # Methods that share an op type plan the same way from the node's attributes; the class that
    # declares plugin_op itself rebuilds that plan (from_plugin_attrs).
    plugin_op: ClassVar[str | None] = None
    plugin_attrs: ClassVar[dict[str, type]] = {}

    def __init__(self, depth: int, **options: Any) -> None:
        super().__init__()
        self.depth = depth
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise TmergeError(f"unknown option(s) for method {self.name}: {', '.join(unknown)} (known: {known})")
        self.config = {k: opt.parse(k, options[k], self.name, depth) if k in options else opt.default
                       for k, opt in self.options.items()}

    def max_r(self, layer: int, tokens: int, num_prefix: int) -> int:
        """The most tokens block ``layer`` can remove from ``tokens`` tokens."""
        return (tokens - num_prefix) // 2

    def bind(self, model: nn.Module) -> None:
        """Called by :func:`tmerge.apply` once the model is patched (``model.blocks`` is the
        :class:`~tmerge.patch.MergingBlocks` with its resolved ``schedule``). Learned methods build or
        initialise their modules from the model here (e.g. DTEM from the key projections). No-op by
        default; must keep already-learned parameters when called again with a compatible model."""

    def merge_keys(self, layer: int, keys: Tensor, attn_input: Tensor) -> Tensor:
        """What the merge step of block ``layer`` receives as ``BlockInput.keys`` (B, H, N, D): the
        attention keys by default. DTEM returns its learned embedding of ``attn_input`` as one "head"
        (B, 1, N, d_f), so its merge is ToMe's step on other keys (and exports as ToMe's node)."""
        return keys

    def constants(self, layer: int, num_tokens: int, r: int, num_prefix: int, *, device=None,
                  dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Index constants of block ``layer``'s plan (token indices, one-hot route rows) for ``num_tokens``
        tokens merging ``r``: built once per schedule by the patched model (as buffers, so they follow
        ``model.to``) and handed back in ``BlockInput.consts``, so a forward creates no index tensor.
        ToMe's by default (:func:`bipartite_constants`)."""
        return bipartite_constants(num_tokens, r, num_prefix, device=device, dtype=dtype)

    def plan(self, block: BlockInput) -> MergePlan:
        raise NotImplementedError

    def plugin_attr_values(self, layer: int) -> dict[str, Any]:
        """Values of :attr:`plugin_attrs` for the merge node of block ``layer``."""
        return {}

    @classmethod
    def from_plugin_attrs(cls, attrs: dict[str, Any]) -> "MergeMethod":
        """A method that plans exactly like one merge node, from the node's checked attributes alone
        (what a TensorRT plugin sees)."""
        return cls(attrs["depth"])

    def describe(self) -> dict:
        info = {"method": self.name, "options": dict(self.config)}
        if self.trainable_layers():  # learned methods say which adapter they run with
            info["adapter"] = getattr(self, "adapter", None) or "untrained"
        return info

    # ---- training hooks: what :mod:`tmerge.training` calls (learned methods override them) ----
    def trainable_layers(self) -> list[nn.Module]:
        """The learned module of each block (index = block), frozen where a block merges nothing."""
        return []

    def prepare_training(self, outputs: Tensor, features: Tensor, *, headless: bool, seed: int,
                         extra_loss_weight: float) -> None:
        """Called once before training with the unmerged (teacher) model's outputs and pooled
        features on the training images (in image order)."""

    def extra_loss(self, features: Tensor, index: Tensor) -> Tensor | None:
        """A loss term added to the distillation loss, from the student's pooled ``features`` of the
        training images ``index`` (None: no term)."""
        return None


def key_metric(keys: Tensor) -> Tensor:
    """ToMe's similarity metric: keys (B, heads, N, head_dim) averaged over heads, L2-normalised:
    (B, N, head_dim).

    Exported, one ``tmerge::key_metric`` op: the keys viewed as (B, heads, N * head_dim) times a row of
    ones (a sum over the heads as one small product, no transpose; the normalisation removes the
    1 / heads of the mean), then one LpNormalization node. A ReduceMean over the heads, with or without
    moving them last first, took ONNX Runtime seven times as long on its own (ViT-S/16 keys, batch 1,
    43 µs against 6 µs). (A zero row is the one input where eager and exported metric differ: PyTorch
    divides 0 by 0, ONNX Runtime's LpNormalization returns zeros; the mean of a token's keys is never
    exactly zero.)"""
    if torch.compiler.is_exporting():
        return torch.ops.tmerge.key_metric(keys)
    return _key_metric(keys)


def _key_metric(keys: Tensor) -> Tensor:
    metric = keys.mean(1)
    return metric / metric.norm(dim=-1, keepdim=True)


@torch.library.custom_op("tmerge::key_metric", mutates_args=())
def _key_metric_op(keys: Tensor) -> Tensor:
    return _key_metric(keys)


@_key_metric_op.register_fake
def _(keys):
    return keys.new_empty(keys.shape[0], keys.shape[2], keys.shape[3])


@dataclass
class BipartiteChoice:
    """ToMe's matching of A rows against B rows (indices into A and B, not tokens).

    ``merged`` (B, r): the A rows that merge, best first; ``kept`` (B, n_a - r): the other A rows in
    ascending order; ``match`` (B, r): the B row each merged one joins; ``scores`` (B, n_a, n_b) and
    ``best_b`` (B, n_a) (each A row's argmax) for methods that build on the choice."""

    merged: Tensor
    kept: Tensor
    match: Tensor
    scores: Tensor
    best_b: Tensor


def bipartite_choice(a: Tensor, b: Tensor, r: int) -> BipartiteChoice:
    """Each A row (``a`` (B, n_a, D), normalised) finds its most similar B row (first on ties); the r
    A rows with the highest such similarity merge (a stable descending sort: ties go to the lower
    row). A handful of batched ops, no data-dependent shape."""
    scores = a @ b.mT
    if r == 0:  # nothing merges (only plans outside a patched model ask): A keeps its order
        kept = torch.arange(a.shape[1], device=a.device).expand(a.shape[0], -1)
        return BipartiteChoice(merged=kept[:, :0], kept=kept, match=kept[:, :0], scores=scores, best_b=kept * 0)
    best, best_b = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)
    if r == a.shape[1]:  # r at its cap: every A merges (no zero-size tensor: some runtimes divide by 0)
        merged, kept = order, order[:, :0]
    else:
        merged, kept = order.split([r, a.shape[1] - r], dim=-1)
        kept = kept.sort(dim=-1, stable=True).values
    return BipartiteChoice(merged=merged, kept=kept, match=best_b.gather(-1, merged), scores=scores, best_b=best_b)


def bipartite_constants(num_tokens: int, r: int, num_prefix: int, device=None, dtype=torch.float32
                        ) -> dict[str, Tensor]:
    """Index constants of ToMe's step on ``num_tokens`` tokens whose first ``num_prefix`` never merge.

    A = even positions, B = odd ones; the protected tokens are left out of both (A', B'). Output order:
    [prefix, unmerged A' (sequence order), B' (sequence order)]. ``prefix`` (p, 1), ``a_tok`` (n_a', 1)
    and ``b_tok`` (n_b', 1) are token indices (as columns, so indexing them with (B, k) gives (B, k, 1));
    ``b_route`` (n_b', M): row j is the one-hot output slot of B' token j. ``keep_fixed`` (M, 1): the kept
    tokens that do not depend on the input (prefix and B'), zeros where the unmerged A' go."""
    first_a, first_b = 2 * ((num_prefix + 1) // 2), 2 * (num_prefix // 2) + 1
    return alternating_constants(num_tokens, r, num_prefix, first_a, first_b, device=device, dtype=dtype)


def alternating_constants(num_tokens: int, r: int, num_prefix: int, first_a: int, first_b: int, device=None,
                          dtype=torch.float32) -> dict[str, Tensor]:
    """:func:`bipartite_constants` with A' = positions ``first_a``, ``first_a + 2``, ... and B' =
    ``first_b``, ``first_b + 2``, ... (both past the prefix)."""
    kw = {"device": device}
    a_tok = torch.arange(first_a, num_tokens, 2, **kw)
    b_tok = torch.arange(first_b, num_tokens, 2, **kw)
    num_out = num_tokens - r
    b_first_slot = num_prefix + len(a_tok) - r
    return {
        "prefix": torch.arange(num_prefix, **kw).view(-1, 1),
        "a_tok": a_tok.view(-1, 1),
        "b_tok": b_tok.view(-1, 1),
        "b_route": torch.eye(num_out, dtype=dtype, **kw)[b_first_slot:],
        "keep_fixed": torch.cat([torch.arange(num_prefix, **kw), torch.zeros(len(a_tok) - r, dtype=torch.long, **kw),
                                 b_tok]).view(-1, 1),
    }


def tome_plan(consts: dict[str, Tensor], choice: BipartiteChoice, num_tokens: int) -> MergePlan:
    """ToMe's hard plan from its choice on (A', B'): [prefix, unmerged A', B'], merged A' -> their B'."""
    fixed = consts["keep_fixed"]
    before, after = len(consts["prefix"]), len(consts["b_tok"])  # the unmerged A' go between prefix and B'
    if choice.kept.shape[1]:
        keep = torch.nn.functional.pad(lookup(consts["a_tok"], choice.kept), (0, 0, before, after)) + fixed
    else:
        keep = fixed.expand(choice.merged.shape[0], -1, -1)
    return MergePlan(keep=keep, src=lookup(consts["a_tok"], choice.merged),
                     route=lookup(consts["b_route"], choice.match), num_tokens=num_tokens)


def bipartite_sides(metric: Tensor, num_prefix: int) -> tuple[Tensor, Tensor]:
    """(A', B') rows of ``metric`` (B, N, D): even / odd positions past the protected prefix (views)."""
    return metric[:, 2 * ((num_prefix + 1) // 2)::2], metric[:, 2 * (num_prefix // 2) + 1::2]


def block_constants(method: "MergeMethod", block: BlockInput) -> dict[str, Tensor]:
    """The block's precomputed constants, or built now (plans outside a patched model, e.g. tests)."""
    if block.consts is not None:
        return block.consts
    n = block.x.shape[1]
    return method.constants(block.layer, n, block.r, block.num_prefix, device=block.x.device, dtype=block.x.dtype)


def lookup(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for a constant ``table`` (T, D): (..., D). One Gather in an exported graph
    (``aten.index`` would bring a broadcast subgraph along)."""
    return torch.nn.functional.embedding(index, table)


def take_rows(t: Tensor, index: Tensor) -> Tensor:
    """``t[b, index[b, i, 0]]`` for ``t`` (B, N, C) and ``index`` (B, K, 1): a gather of whole rows.

    Exported, it is one GatherND over the batch (``tmerge::take_rows``), not GatherElements with an
    index broadcast to every channel (an index as large as the output, which runtimes read element
    by element). (Exported, ``take_along_dim`` would broadcast too, and makes torch.export fix the
    batch size.)"""
    if torch.compiler.is_exporting():
        return torch.ops.tmerge.take_rows(t, index)
    return torch.take_along_dim(t, index, dim=1)  # eager: one op (gather with the index broadcast)


@torch.library.custom_op("tmerge::take_rows", mutates_args=())
def _take_rows_op(t: Tensor, index: Tensor) -> Tensor:
    return t.gather(1, index.expand(-1, -1, t.shape[-1]))


@_take_rows_op.register_fake
def _(t, index):
    return t.new_empty(index.shape[0], index.shape[1], t.shape[-1])


def candidate_destinations(scores: Tensor, best_b: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best B rows of each row of ``scores`` (B, n, n_b), candidate 0 being ``best_b``
    (B, n) (ToMe's own argmax, so ties break as ToMe's do). Returns (indices, scores), both (B, n, k)."""
    idx = scores.topk(k, dim=-1).indices
    idx = torch.cat([best_b.unsqueeze(-1), idx[..., 1:]], dim=-1)
    return idx, scores.gather(2, idx)
