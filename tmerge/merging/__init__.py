"""The merge core: one shared size-weighted merge, and methods that only choose what merges."""

from .base import BlockInput, MergeMethod, MergePlan, Option, key_metric
from .ops import merge_slots, merge_tokens
from .registry import available, get, register

__all__ = [
    "BlockInput", "MergeMethod", "MergePlan", "Option", "available", "get", "key_metric", "merge_slots",
    "merge_tokens", "register",
]
