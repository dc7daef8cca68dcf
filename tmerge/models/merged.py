"""Models merged as a :class:`~tmerge.config.MergeConfig` says: :func:`apply` (``tmerge.apply``) and
the loaders the commands share (:func:`build_merged_model`, :func:`build_pair`)."""

from __future__ import annotations

import copy

from torch import nn

from ..config import SHIPPED, SHIPPED_IF_ANY, MergeConfig
from ..errors import TmergeError
from ..patch import apply as patch_model
from .adapters import load_adapter, shipped_adapter
from .spec import ModelSpec


def apply(model: nn.Module, merge: MergeConfig) -> nn.Module:
    """Patch ``model`` in place as ``merge`` says (:func:`tmerge.patch.apply`), then load the learned
    parameters of a learned method (DTEM, LTM) from ``merge.adapter``: a trained adapter file;
    ``"shipped"`` (the default of :meth:`MergeConfig.of`) the adapter tmerge ships for the model's
    weights (the embedded default model), an error when there is none; ``"shipped-if-any"`` that
    adapter where there is one, else untrained; None runs the method untrained (it then merges
    exactly like ToMe). Returns the model.

    ``tmerge.apply(model, tmerge.MergeConfig.of("tome", r=16))``.
    """
    patch_model(model, merge)
    if not merge.learned:
        return model
    adapter = merge.adapter
    if adapter in (SHIPPED, SHIPPED_IF_ANY):
        adapter = shipped_adapter(model, merge.method)
        if adapter is None and merge.adapter == SHIPPED:
            raise TmergeError(f"{merge.method} is a learned method and tmerge ships no adapter for this model's "
                              "weights: train one (tmerge train) and pass adapter=PATH, or pass adapter=None to "
                              "run it untrained (it then merges like ToMe)")
    if adapter is not None:
        load_adapter(model, adapter)
    return model


def build_merged_model(model: ModelSpec, merge: MergeConfig, *, seed: int | None = 0) -> nn.Module:
    """Load ``model`` and merge it as ``merge`` says; eval mode. ``seed``: see :func:`tmerge.models.load_model`."""
    return apply(model.load(seed=seed), merge).eval()


def build_pair(model: ModelSpec, merge: MergeConfig, *, seed: int | None = 0) -> tuple[nn.Module, nn.Module]:
    """(merged, unmerged): one load, a deep copy, the copy merged. Same weights, eval mode.

    ``seed``: see :func:`tmerge.models.load_model` (random-init models are the same in every run)."""
    unmerged = model.load(seed=seed)
    merged = apply(copy.deepcopy(unmerged), merge).eval()
    return merged, unmerged.eval()
