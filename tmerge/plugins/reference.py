"""The merge a plugin node computes, from its attributes alone, in PyTorch (CPU or GPU).

This is what a TensorRT plugin must reproduce: :func:`method_from_attrs` rebuilds the merging
method of one node from the ONNX attributes (nothing else: the plugin sees only those), and
:func:`reference_merge` runs the shared merge core on it. It is the plugin's JIT implementation
(:mod:`tmerge.plugins.trt`) and the oracle a compiled GPU merge kernel would be tested against.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..merging import BlockInput
from ..patch import eager_merge_step
from .spec import check_attrs, plugin_methods


def method_from_attrs(op_type: str, attrs: dict[str, Any]):
    """A :class:`~tmerge.merging.MergeMethod` that plans exactly like the node's method at its layer."""
    return plugin_methods()[op_type].from_plugin_attrs(check_attrs(op_type, attrs))


def reference_merge(op_type: str, attrs: dict[str, Any], x: Tensor, size: Tensor, keys: Tensor,
                    with_slots: bool = False):
    """(x_out, size_out[, slots]) of one merge node, computed with the shared merge core."""
    a = check_attrs(op_type, attrs)
    if x.shape[1] != a["num_tokens"]:
        raise ValueError(f"{op_type}: x has {x.shape[1]} tokens, the node was built for {a['num_tokens']}")
    method = method_from_attrs(op_type, attrs)
    block = BlockInput(layer=a["layer"], depth=a["depth"], r=a["r"], num_prefix=a["num_prefix"], keys=keys,
                       attn_input=x, x=x, size=size)
    out, out_size, plan = eager_merge_step(method, block, a["merge_form"])
    return (out, out_size, plan.slots) if with_slots else (out, out_size)
