"""FLOPs of the real forward pass, counted by ``torch.utils.flop_counter``.

Convention (stated in every report): FLOPs = 2 x multiply-accumulates, as FlopCounterMode counts
them. Only matmul-like ops (linear, bmm, SDPA, conv) are counted; elementwise ops, norms, softmax
and the merge's gathers/scatters are not, which is FlopCounterMode's convention too.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

FLOPS_CONVENTION = "FLOPs = 2 x MACs (torch.utils.flop_counter; matmul/conv/attention only)"


def count_flops(model: nn.Module, input_shape: tuple[int, ...], *, per_layer: bool = True) -> dict:
    """FLOPs for one forward at ``input_shape`` (batch included), total and per block.

    Runs the model on zeros; the merged model's shrinking token counts are what get counted, since
    the counter sees the actual forward.
    """
    param = next(model.parameters())
    x = torch.zeros(input_shape, dtype=param.dtype, device=param.device)
    counter = FlopCounterMode(display=False, depth=None)
    with torch.no_grad(), counter:
        model(x)
    total = int(counter.get_total_flops())
    result = {"total": total, "per_image": total // input_shape[0], "convention": FLOPS_CONVENTION}
    if per_layer:
        counts = counter.get_flop_counts()
        # A merged block is not called as a whole (its submodules are), so sum each block's direct
        # children: "<Model>.blocks.<i>.<child>".
        per_block: dict[int, int] = {}
        for name, ops in counts.items():
            parts = name.split(".")
            if len(parts) == 4 and parts[1] == "blocks" and parts[2].isdigit():
                per_block[int(parts[2])] = per_block.get(int(parts[2]), 0) + int(sum(ops.values()))
        result["per_layer"] = [per_block[i] for i in sorted(per_block)]
    return result


def token_cost_model(model: nn.Module) -> Callable[[Sequence[int]], int]:
    """Per-image FLOPs of ``model`` merged with any schedule, from its token counts alone (instant).

    ``cost(tokens)`` takes the counts entering each block and leaving the last (as
    :func:`tmerge.tokens_per_layer` gives them). Calibrated once with FlopCounterMode on the model's
    own (unmerged) submodules: each block's attention costs ``a·N + b·N²`` at its input count (fit at
    two counts) and its MLP ``c·N`` at its output count, since the merge sits between the two;
    everything outside the blocks (patch embedding, head) is constant. Same convention as
    :func:`count_flops`, except that the merge's own similarity matmuls are not included.
    """
    from torch.utils.flop_counter import FlopCounterMode

    blocks = list(model.blocks)
    n0 = model.patch_embed.num_patches + model.num_prefix_tokens
    n1 = max(2, n0 // 2)
    param = next(model.parameters())
    width = param.new_zeros(0).new_zeros

    def flops(module: nn.Module, n: int) -> int:
        counter = FlopCounterMode(display=False, depth=None)
        with torch.no_grad(), counter:
            module(width(1, n, blocks[0].norm1.normalized_shape[0]))
        return int(counter.get_total_flops())

    attn, mlp = [], []
    for blk in blocks:
        f0, f1 = flops(blk.attn, n0), flops(blk.attn, n1)
        b = (f0 / n0 - f1 / n1) / (n0 - n1)  # f(N) = a N + b N^2  =>  f/N = a + b N
        attn.append((f0 / n0 - b * n0, b))
        mlp.append(flops(blk.mlp, n0) / n0)
    total = count_flops(model, (1, *_input_chw(model)), per_layer=False)["total"]
    outside = total - sum(a * n0 + b * n0 * n0 for a, b in attn) - sum(c * n0 for c in mlp)

    def cost(tokens: Sequence[int]) -> int:
        inner = sum(a * n + b * n * n for (a, b), n in zip(attn, tokens))
        inner += sum(c * n for c, n in zip(mlp, tokens[1:]))
        return int(round(outside + inner))

    return cost


def _input_chw(model: nn.Module) -> tuple[int, int, int]:
    size = model.patch_embed.img_size
    return (getattr(model.patch_embed.proj, "in_channels", 3), int(size[0]), int(size[1]))
