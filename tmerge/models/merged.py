"""What to merge and how, as one typed value, and the models built from it.

:class:`MergeConfig` is what the command line's ``--method/--r/--inflection/--schedule/--keep-ratio/
--prop-attn/-o/--adapter/--merge-form`` flags become; the library (export, profile, sweep,
visualize) takes it as it is, never as strings to parse again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import TmergeError
from ..merging import registry
from ..patch import apply as patch_model
from ..patch import merge_method
from . import load_model
from .adapters import load_adapter, shipped_adapter

SHIPPED = "shipped"  # adapter=SHIPPED: the adapter shipped for the model's weights (default of tmerge.apply)


def apply(model: nn.Module, method: Any, *, adapter: str | Path | None = SHIPPED, **kwargs: Any) -> nn.Module:
    """:func:`tmerge.patch.apply` (same arguments), then the learned parameters of DTEM/LTM.

    ``adapter``: a trained adapter file; ``"shipped"`` (default) the adapter tmerge ships for the
    model's weights (the embedded default model), an error when there is none; ``None`` runs the
    learned method untrained (it then merges exactly like ToMe). Training-free methods take no adapter.
    """
    patch_model(model, method, **kwargs)
    learned = method != "none" and bool(merge_method(model).trainable_layers())
    if not learned:
        if adapter not in (None, SHIPPED):
            raise TmergeError(f"method {merge_name(model)} learns nothing: it takes no adapter")
        return model
    if adapter == SHIPPED:
        adapter = shipped_adapter(model, merge_name(model))
        if adapter is None:
            raise TmergeError(f"{merge_name(model)} is a learned method and tmerge ships no adapter for this model's "
                              "weights: train one (tmerge train) and pass adapter=PATH, or pass adapter=None to "
                              "run it untrained (it then merges like ToMe)")
    if adapter is not None:
        load_adapter(model, adapter)
    return model


def merge_name(model: nn.Module) -> str:
    return merge_method(model).name


@dataclass(frozen=True)
class MergeConfig:
    """A merging method with its schedule and options (see :func:`tmerge.apply`).

    At most one of ``r`` (with an optional ``inflection``), ``schedule`` (per-block r, a list or
    "8,8,4") and ``keep_ratio``. ``options`` are the method's own (``tmerge methods``) as typed
    values; ``adapter`` a trained DTEM/LTM adapter file; ``merge_form`` None keeps
    :func:`tmerge.apply`'s default.
    """

    method: str = "tome"
    r: int | None = None
    inflection: float | None = None
    schedule: str | tuple[int, ...] | list[int] | None = None
    keep_ratio: float | None = None
    prop_attn: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)
    adapter: str | None = None
    merge_form: str | None = None

    def check(self) -> MergeConfig:
        """Errors that need no model: unknown method, --inflection without --r, a merge form or
        schedule given to method "none"."""
        self.schedule_args()
        if self.method != "none":
            registry.get(self.method)
        elif self.merge_form is not None:
            raise TmergeError("--merge-form applies to merged models; method 'none' merges nothing")
        return self

    def schedule_args(self) -> dict[str, Any]:
        """``r`` (an int or ToMe's ``(r, inflection)``), ``schedule`` and ``keep_ratio`` as
        :func:`tmerge.apply` takes them."""
        if self.inflection is not None and self.r is None:
            raise TmergeError("--inflection needs --r")
        r = (self.r, float(self.inflection)) if self.inflection is not None else self.r
        return {"r": r, "schedule": self.schedule, "keep_ratio": self.keep_ratio}

    def apply_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`tmerge.apply` (after ``model`` and ``method``)."""
        self.check()
        kwargs: dict[str, Any] = {**self.schedule_args(), "prop_attn": self.prop_attn, **self.options}
        if self.merge_form is not None and self.method != "none":
            kwargs["merge_form"] = self.merge_form
        return kwargs

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Patch ``model`` in place (and load the adapter); returns it in eval mode.

        A learned method without ``adapter`` on the model a shipped adapter was trained for (the
        embedded default) loads that adapter; otherwise it runs untrained (= ToMe)."""
        patch_model(model, self.method, **self.apply_kwargs())
        adapter = self.adapter
        if adapter is None and self.method != "none" and merge_method(model).trainable_layers():
            adapter = shipped_adapter(model, self.method)
        if adapter is not None:
            load_adapter(model, adapter)
        return model.eval()


def build_merged_model(model_name: str | None, merge: MergeConfig, *, checkpoint: str | None = None,
                       pretrained: bool = False, model_kwargs: dict | None = None, seed: int | None = 0) -> nn.Module:
    """Load the model (``model_kwargs`` go to timm) and merge it as ``merge`` says; eval mode.

    ``seed``: see :func:`tmerge.models.load_model`."""
    merge.check()
    net = load_model(model_name, checkpoint=checkpoint, pretrained=pretrained, seed=seed, **(model_kwargs or {}))
    return merge.apply_to(net)


def build_pair(model_name: str | None, merge: MergeConfig, *, checkpoint: str | None = None,
               pretrained: bool = False, model_kwargs: dict | None = None,
               seed: int | None = 0) -> tuple[nn.Module, nn.Module]:
    """(merged, unmerged): one load, a deep copy, the copy merged. Same weights, eval mode.

    ``seed``: see :func:`tmerge.models.load_model` (random-init models are the same in every run)."""
    merge.check()
    unmerged = load_model(model_name, checkpoint=checkpoint, pretrained=pretrained, seed=seed,
                          **(model_kwargs or {}))
    merged = merge.apply_to(copy.deepcopy(unmerged))
    return merged, unmerged.eval()
