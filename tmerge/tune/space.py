"""The search space of ``tmerge tune``: families of schedules per method and proportional-attention
setting, ordered by strength, and the candidate a trained adapter defines."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from ..config import MergeConfig
from ..errors import TmergeError
from ..merging import MergeMethod, registry
from ..models.adapters import read_adapter
from ..schedule import ScheduleSpec, resolve

PROP_ATTN_MODES = ("both", "on", "off", "default")
INFLECTIONS = (-0.5, 0.5)  # ToMe ramps: more merging early (-) or late (+)
KEEP_RATIOS = tuple(round(1 - 0.01 * i, 2) for i in range(1, 31))  # 0.99 .. 0.70


@dataclass(frozen=True)
class Candidate:
    """One point of the search space: a merge configuration (one schedule, an explicit
    proportional-attention setting), the family of schedules it belongs to and its place there."""

    merge: MergeConfig
    family: str  # schedule shape: "r", "r/inflection=-0.5", "late/skip=3", "keep", "adapter"
    strength: float  # position in its family: larger merges more

    @property
    def family_key(self) -> tuple:
        m = self.merge
        return (m.method, self.family, m.prop_attn, m.adapter, tuple(sorted(m.options.items())))

    @property
    def schedule_label(self) -> str:
        spec = self.merge.schedule
        if spec.keep_ratio is not None:
            return f"keep={spec.keep_ratio:g}"
        if spec.per_layer is not None:
            return "schedule=" + ",".join(str(v) for v in spec.per_layer)
        if spec.inflection is not None:
            return f"r={spec.r},inflection={spec.inflection:g}"
        return f"r={spec.r}"

    @property
    def label(self) -> str:
        m = self.merge
        extra = f" adapter={Path(m.adapter_path).name}" if m.adapter_path else ""
        return f"{m.method} {self.schedule_label} prop-attn={'on' if m.prop_attn else 'off'}{extra}"

    def as_dict(self) -> dict:
        d = self.merge.as_dict()
        return {"method": d.pop("method"), "family": self.family, "strength": self.strength,
                "prop_attn": d.pop("prop_attn"), **d, "label": self.label}


def is_learned(method: str) -> bool:
    """A method that builds trainable modules when bound to a model (DTEM, LTM): untrained, it merges
    like ToMe, so it is searched only through a trained adapter."""

    return registry.get(method).bind is not MergeMethod.bind


def _model_tokens(model: nn.Module) -> tuple[int, int, int]:
    return len(model.blocks), model.patch_embed.num_patches + model.num_prefix_tokens, model.num_prefix_tokens


def candidate_tokens(model: nn.Module, cand: Candidate) -> tuple[int, ...] | None:
    """Token counts entering each block (and leaving the last) of ``cand`` on ``model``, from the
    schedule alone; None when ``tmerge export`` would refuse it (capped at block 0, or an explicit
    schedule the model cannot do)."""

    depth, tokens, prefix = _model_tokens(model)
    spec = cand.merge.schedule
    method = registry.get(cand.merge.method)(depth, **cand.merge.options)
    try:
        resolved = resolve(spec, depth, tokens, prefix, method.max_r)
    except TmergeError:
        return None
    if resolved.capped and (spec.per_layer is not None or resolved.capped[0][0] == 0):
        return None
    return tuple(resolved.tokens)


def search_space(model: nn.Module, methods: list[str], adapters: list[str] | None = None, *,
                 prop_attn: str = "both") -> list[Candidate]:
    """Every candidate schedule for ``model``: families per (method, prop-attn, shape), deduplicated by
    their per-block r (first family wins: constant r, then ramps, late schedules, keep ratios)."""

    if prop_attn not in PROP_ATTN_MODES:
        raise TmergeError(f"--prop-attn-search must be one of {', '.join(PROP_ATTN_MODES)}, got {prop_attn!r}")
    depth, tokens, prefix = _model_tokens(model)
    r_max = math.ceil((tokens - prefix) / depth)
    candidates: list[Candidate] = []
    for method in methods:
        cls = registry.get(method)
        if is_learned(method):
            raise TmergeError(f"{method} is a learned method: give its trained adapter with --adapter "
                              "(it is searched at the adapter's schedule)")
        default = bool(cls.prop_attn_default)
        modes = {"both": (default, not default), "on": (True,), "off": (False,), "default": (default,)}[prop_attn]
        for pa in modes:
            def add(spec: ScheduleSpec, family: str, strength: float) -> None:
                candidates.append(Candidate(MergeConfig(method, spec, pa), family, strength))

            for r in range(1, r_max + 1):
                add(ScheduleSpec(r=r), "r", r)
            for infl in INFLECTIONS:
                for r in range(1, r_max + 1):
                    add(ScheduleSpec(r=r, inflection=infl), f"r/inflection={infl:g}", r)
            for skip in ({max(1, depth // 4)} if depth > 1 else set()):
                late_max = math.ceil((tokens - prefix) / (depth - skip))
                for r in range(1, late_max + 1):
                    add(ScheduleSpec(per_layer=(0,) * skip + (r,) * (depth - skip)), f"late/skip={skip}", r)
            for keep in KEEP_RATIOS:
                add(ScheduleSpec(keep_ratio=keep), "keep", round(1 - keep, 2))
    for path in adapters or []:
        candidates.append(adapter_candidate(path))
    seen: set = set()
    unique = []
    for cand in candidates:
        counts = candidate_tokens(model, cand)
        if counts is None or (cand.merge.adapter_path is None and counts[-1] == counts[0]):
            continue
        key = (replace(cand.merge, schedule=None), counts)  # the same configuration merging the same tokens
        if key in seen:
            continue
        seen.add(key)
        unique.append(cand)
    return unique


def adapter_candidate(path: str) -> Candidate:
    """The candidate a trained DTEM/LTM adapter defines: its method, options, per-block r, prop-attn."""
    _, meta = read_adapter(path)
    r = meta.get("r")
    if not isinstance(r, list) or not r:
        raise TmergeError(f"adapter {path} records no per-block schedule")
    options = dict(sorted((k, v) for k, v in (meta.get("options") or {}).items() if v is not None))
    merge = MergeConfig(str(meta.get("method")), ScheduleSpec(per_layer=tuple(int(v) for v in r)),
                        bool(meta.get("prop_attn")), options, adapter=str(path))
    return Candidate(merge, "adapter", float(sum(r)))
