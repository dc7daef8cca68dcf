"""The merge step as one opaque operator for ``torch.compile``.

Inductor compiles what it traces. Traced, each merge step is some thirty small index ops per block,
on a different token count in every block, and compiling them all took several times as long as
compiling the unmerged model. So while compiling, the patched model calls each merge as the custom
op ``tmerge::merge_step``: the compiler sees one node with a known output shape (its fake kernel) and
compiles only the transformer around it; the op itself runs the same eager plan and merge, with the
block's index constants built once and cached. Used for methods whose plan follows from their name
and options alone (ToMe, PiToMe, DTEM at inference, whose learned part runs before the step); the
others are traced as usual.
"""

from __future__ import annotations

import functools
import json

import torch
from torch import Tensor

from .base import BlockInput, MergeMethod
from .ops import merge_tokens
from .registry import get


def opaque_args(method: MergeMethod) -> tuple[str, str] | None:
    """(name, options JSON) that rebuild ``method``'s inference plan inside the op, or None where they
    cannot (no plugin node: the plan depends on learned parameters)."""
    if method.plugin_op is None:
        return None
    return method.name, json.dumps(method.config, sort_keys=True)


@functools.lru_cache(maxsize=None)
def _method(name: str, options: str, depth: int) -> MergeMethod:
    return get(name)(depth, **json.loads(options)).eval()


@functools.lru_cache(maxsize=256)
def _constants(name: str, options: str, depth: int, layer: int, tokens: int, r: int, num_prefix: int,
               device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    return _method(name, options, depth).constants(layer, tokens, r, num_prefix, device=device, dtype=dtype)


@torch.library.custom_op("tmerge::merge_step", mutates_args=())
def merge_step(x: Tensor, size: Tensor, keys: Tensor, method: str, options: str, layer: int, depth: int, r: int,
               num_prefix: int, form: str) -> tuple[Tensor, Tensor]:
    """One block's merge: (x, size) after merging ``r`` of x's tokens (B, N, C) the way ``method`` with
    ``options`` chooses from ``keys``."""
    merger = _method(method, options, depth)
    consts = _constants(method, options, depth, layer, x.shape[1], r, num_prefix, x.device, x.dtype)
    block = BlockInput(layer=layer, depth=depth, r=r, num_prefix=num_prefix, keys=keys, attn_input=x, x=x,
                       size=size, consts=consts)
    out, out_size = merge_tokens(x, size, merger.plan(block), form)
    return out.contiguous(), out_size.contiguous()


@merge_step.register_fake
def _(x, size, keys, method, options, layer, depth, r, num_prefix, form):
    bsz, n, c = x.shape
    return x.new_empty(bsz, n - r, c), size.new_empty(bsz, n - r, 1)
