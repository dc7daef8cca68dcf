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
    attention residual, ``size`` the token sizes (B, N, 1).
    """

    layer: int
    depth: int
    r: int
    num_prefix: int
    keys: Tensor
    attn_input: Tensor
    x: Tensor
    size: Tensor


@dataclass
class MergePlan:
    """Where each input token goes: ``slots`` (B, N) or (B, N, K) with optional soft ``weights``.

    ``sources`` (B, E), for sparse soft merges: E extra rows, copies of tokens ``sources``, follow the
    N tokens; ``slots`` and ``weights`` then cover N + E rows (see :func:`tmerge.merging.merge_tokens`).
    """

    slots: Tensor
    num_out: int
    weights: Tensor | None = None
    sources: Tensor | None = None


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
    """ToMe's similarity metric: keys averaged over heads, L2-normalised. (B, N, head_dim)."""
    return torch.nn.functional.normalize(keys.mean(1), dim=-1)


@dataclass
class BipartiteMatch:
    """ToMe's matching of one block: ``slots`` (B, N) is where each token goes; ``scores`` (B, n_a, n_b)
    the A x B similarities (protected rows and columns -inf), ``best_b`` (B, n_a) each A token's best
    B match (argmax) and ``merged_a`` (B, r) the A tokens (A indices) that merge."""

    slots: Tensor
    scores: Tensor
    best_b: Tensor
    merged_a: Tensor


def bipartite_slots(metric: Tensor, r: int, num_protected: int, slot_offset: int) -> Tensor:
    """Bipartite soft matching on a token sequence; returns the output slot of every token.

    A = even positions, B = odd positions of ``metric`` (B, N, D, already normalised). The first
    ``num_protected`` tokens never merge: their A rows and B columns score -inf, and they keep slots
    ``slot_offset + 0 .. num_protected - 1`` in order. Each other A token finds its most similar B
    token; the ``r`` A tokens with the highest such similarity merge into it. Output order after the
    protected tokens: the unmerged A tokens in sequence order, then the B tokens in sequence order.
    """
    return bipartite_match(metric, r, num_protected, slot_offset).slots


def bipartite_match(metric: Tensor, r: int, num_protected: int, slot_offset: int = 0) -> BipartiteMatch:
    """:func:`bipartite_slots` with the intermediate choices learned methods build on."""
    bsz, n, _ = metric.shape
    device = metric.device
    a, b = metric[:, ::2], metric[:, 1::2]
    n_a, n_b = a.shape[1], b.shape[1]
    prot_a, prot_b = (num_protected + 1) // 2, num_protected // 2
    # Constant masks (no data dependence): exported graphs fold them instead of slice-assigning.
    a_protected = torch.arange(n_a, device=device) < prot_a
    b_protected = torch.arange(n_b, device=device) < prot_b
    scores = (a @ b.transpose(1, 2)).masked_fill(a_protected.unsqueeze(1) | b_protected, -torch.inf)
    best_score, best_b = scores.max(dim=-1)  # (B, n_a)
    merged_a = torch.topk(best_score, r, dim=-1).indices
    is_merged = torch.zeros_like(best_score, dtype=torch.bool).scatter(1, merged_a, True)

    first = slot_offset + num_protected
    unmerged_slot = first + torch.cumsum((~is_merged & ~a_protected).to(torch.long), dim=1) - 1
    b_slots = first + (n_a - prot_a - r) + torch.arange(n_b, device=device) - prot_b
    merged_slot = best_b + (first + (n_a - prot_a - r) - prot_b)  # = b_slots[best_b]: b_slots is affine
    # protected tokens keep slots slot_offset + 0, 1, 2, ... in sequence order (A gets the even ones)
    a_slots = torch.where(a_protected, slot_offset + 2 * torch.arange(n_a, device=device),
                          torch.where(is_merged, merged_slot, unmerged_slot))
    b_slots = torch.where(b_protected, slot_offset + 2 * torch.arange(n_b, device=device) + 1, b_slots)
    slots = interleave(a_slots, b_slots.expand(bsz, n_b), n)
    return BipartiteMatch(slots=slots, scores=scores, best_b=best_b, merged_a=merged_a)


def candidate_destinations(scores: Tensor, best_b: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best B tokens of each row of ``scores`` (B, n, n_b), candidate 0 being ``best_b``
    (B, n) (ToMe's own argmax, so ties break as ToMe's do). Returns (indices, scores), both (B, n, k)."""
    idx = scores.topk(k, dim=-1).indices
    idx = torch.cat([best_b.unsqueeze(-1), idx[..., 1:]], dim=-1)
    return idx, scores.gather(2, idx)


def interleave(even: Tensor, odd: Tensor, n: int) -> Tensor:
    """Inverse of (t[:, ::2], t[:, 1::2]) for (B, n, ...) tensors, with static shapes only."""
    if odd.shape[1] < even.shape[1]:
        odd = torch.cat([odd, odd[:, :1]], dim=1)
    return torch.stack([even, odd], dim=2).reshape(even.shape[0], -1, *even.shape[2:])[:, :n]
