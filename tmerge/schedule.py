"""Reduction schedules: how many tokens each block removes, resolved against a concrete model.

A schedule is fixed before the model runs, so every tensor shape in a merged model is static (only
the batch dimension varies); only index *values* depend on the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import TmergeError


@dataclass(frozen=True)
class ScheduleSpec:
    """What the user asked for; exactly one of ``r``, ``per_layer`` and ``keep_ratio`` is set, and
    every value is checked when the spec is made (a one-line TmergeError).

    - ``r``: a constant number of tokens per block;
    - ``r`` with ``inflection``: ToMe's linear ramp around ``r`` (inflection 0 = constant);
    - ``keep_ratio``: PiToMe-style, each block keeps ``ratio`` of its current non-prefix tokens;
    - ``per_layer``: an explicit list, shorter lists are padded with zeros.
    """

    r: int | None = None
    inflection: float | None = None
    keep_ratio: float | None = None
    per_layer: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.inflection is not None and self.r is None:
            raise TmergeError("--inflection needs --r")
        given = [name for name, v in (("r", self.r), ("schedule", self.per_layer), ("keep_ratio", self.keep_ratio))
                 if v is not None]
        if len(given) > 1:
            raise TmergeError(f"give only one of r, schedule, keep_ratio (got {', '.join(given)})")
        if not given:
            raise TmergeError("a schedule needs one of r, schedule or keep_ratio")
        if self.keep_ratio is not None:
            k = self.keep_ratio
            if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
                raise TmergeError(f"keep_ratio must be in (0, 1], got {k!r}")
            object.__setattr__(self, "keep_ratio", float(k))
        if self.per_layer is not None:
            values = tuple(self.per_layer)
            if not values:
                raise TmergeError("schedule is empty; give one r per block, e.g. 8,8,4")
            for v in values:
                _check_r(v, "schedule entries")
            object.__setattr__(self, "per_layer", tuple(int(v) for v in values))
        if self.r is not None:
            _check_r(self.r, "r")
            object.__setattr__(self, "r", int(self.r))
        if self.inflection is not None:
            i = self.inflection
            if isinstance(i, bool) or not isinstance(i, (int, float)) or not -1 <= i <= 1:
                raise TmergeError(f"inflection must be in [-1, 1], got {i!r}")
            object.__setattr__(self, "inflection", float(i))

    def describe(self) -> str:
        if self.per_layer is not None:
            return "list:" + ",".join(str(v) for v in self.per_layer)
        if self.keep_ratio is not None:
            return f"keep_ratio={self.keep_ratio:g}"
        if self.inflection is not None:
            return f"r={self.r},inflection={self.inflection:g}"
        return f"r={self.r}"

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items() if v is not None}


@dataclass
class ResolvedSchedule:
    """Per-block r (after capping) and the token count entering each block plus the final count."""

    spec: ScheduleSpec
    r: list[int]
    tokens: list[int]
    capped: list[tuple[int, int, int]] = field(default_factory=list)  # (layer, asked, applied)

    def as_dict(self) -> dict:
        return {
            "spec": self.spec.describe(),
            "r": self.r,
            "tokens": self.tokens,
            "capped": [{"layer": l, "asked": a, "applied": g} for l, a, g in self.capped],
        }


def make_spec(
    r: int | None = None,
    inflection: float | None = None,
    schedule: Sequence[int] | str | None = None,
    keep_ratio: float | None = None,
) -> ScheduleSpec | None:
    """The user's loose choice (at most one of r / schedule / keep_ratio; ``inflection`` with ``r``)
    as a checked ScheduleSpec; None when nothing is given.

    ``schedule`` may be a list of ints or a comma-separated string ("8,8,4").
    """
    if inflection is not None and r is None:
        raise TmergeError("--inflection needs --r")
    if isinstance(schedule, str) and r is None and keep_ratio is None:
        try:
            schedule = [int(v) for v in schedule.replace(" ", "").split(",")]
        except ValueError:
            raise TmergeError(f"schedule must be a comma-separated list of integers, got {schedule!r}") from None
    if r is None and schedule is None and keep_ratio is None:
        return None
    return ScheduleSpec(r=r, inflection=inflection, keep_ratio=keep_ratio,
                        per_layer=None if schedule is None else tuple(schedule))


def _check_r(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TmergeError(f"{what} must be an integer, got {value!r}")
    if value < 0:
        raise TmergeError(f"{what} must be >= 0, got {value}")


def requested_r(spec: ScheduleSpec, depth: int, layer: int, tokens: int, num_prefix: int) -> int:
    """The r the schedule asks of block ``layer`` that currently holds ``tokens`` tokens."""
    if spec.per_layer is not None:
        return spec.per_layer[layer] if layer < len(spec.per_layer) else 0
    if spec.keep_ratio is not None:
        t = tokens - num_prefix
        return max(0, math.floor(t - t * spec.keep_ratio))
    if spec.inflection is not None:
        # ToMe's linear ramp: r_l goes from min to max = 2r - min across the depth.
        lo = int(spec.r * (1.0 - spec.inflection))
        hi = 2 * spec.r - lo
        if depth == 1:
            return spec.r
        return int(lo + (hi - lo) * layer / (depth - 1))
    return spec.r


def resolve(
    spec: ScheduleSpec,
    depth: int,
    num_tokens: int,
    num_prefix: int,
    max_r: Callable[[int, int, int], int],
) -> ResolvedSchedule:
    """Resolve ``spec`` for a model of ``depth`` blocks starting with ``num_tokens`` tokens.

    ``max_r(layer, tokens, num_prefix)`` is the method's cap. ToMe-style capping of late blocks (a
    constant r=16 on 197 tokens runs out in block 11) reduces the request and records it in ``capped``
    so reports can say so; a request the first block cannot do, or an explicit per-block entry the
    model cannot do, is an error.
    """
    if spec.per_layer is not None and len(spec.per_layer) > depth:
        raise TmergeError(f"schedule has {len(spec.per_layer)} entries but the model has only {depth} blocks")
    rs, tokens, capped = [], [num_tokens], []
    for layer in range(depth):
        n = tokens[-1]
        asked = requested_r(spec, depth, layer, n, num_prefix)
        applied = min(asked, max(0, max_r(layer, n, num_prefix)))
        if applied != asked:
            capped.append((layer, asked, applied))
        rs.append(applied)
        tokens.append(n - applied)
    if capped and (spec.per_layer is not None or capped[0][0] == 0):
        layer, asked, applied = capped[0]
        raise TmergeError(f"r={asked} is impossible at block {layer}: {tokens[layer]} tokens allow at most {applied}")
    return ResolvedSchedule(spec=spec, r=rs, tokens=tokens, capped=capped)
