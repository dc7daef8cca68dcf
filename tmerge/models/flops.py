"""FLOPs of the real forward pass, counted by ``torch.utils.flop_counter``.

Convention (stated in every report): FLOPs = 2 x multiply-accumulates, as FlopCounterMode counts
them. Only matmul-like ops (linear, bmm, SDPA, conv) are counted; elementwise ops, norms, softmax
and the merge's gathers/scatters are not, which is FlopCounterMode's convention too.
"""

from __future__ import annotations

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
