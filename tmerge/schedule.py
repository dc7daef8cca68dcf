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
    """What the user asked for; exactly one of the fields is set.

    - ``r``: a constant number of tokens per block;
    - ``r`` with ``inflection``: ToMe's linear ramp around ``r`` (inflection 0 = constant);
    - ``keep_ratio``: PiToMe-style, each block keeps ``ratio`` of its current non-prefix tokens;
    - ``per_layer``: an explicit list, shorter lists are padded with zeros.
    """

    r: int | None = None
    inflection: float | None = None
    keep_ratio: float | None = None
    per_layer: tuple[int, ...] | None = None

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
    r: int | Sequence[int] | tuple[int, float] | None = None,
    schedule: Sequence[int] | str | None = None,
    keep_ratio: float | None = None,
) -> ScheduleSpec:
    """Validate the user's choice (at most one of r / schedule / keep_ratio) into a ScheduleSpec.

    ``r`` may be an int, an ``(r, inflection)`` pair, or a list (same as ``schedule``); ``schedule`` may
    be a list of ints or a comma-separated string. Nothing given means r = 0.
    """
    given = [name for name, v in (("r", r), ("schedule", schedule), ("keep_ratio", keep_ratio)) if v is not None]
    if len(given) > 1:
        raise TmergeError(f"give only one of r, schedule, keep_ratio (got {', '.join(given)})")
    if keep_ratio is not None:
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
            raise TmergeError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
        return ScheduleSpec(keep_ratio=float(keep_ratio))
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        _check_r(r[0], "r")
        if not -1 <= r[1] <= 1:
            raise TmergeError(f"inflection must be in [-1, 1], got {r[1]!r}")
        return ScheduleSpec(r=int(r[0]), inflection=float(r[1]))
    if isinstance(r, (list, tuple)):
        schedule, r = r, None
    if schedule is not None:
        if isinstance(schedule, str):
            try:
                schedule = [int(v) for v in schedule.replace(" ", "").split(",")]
            except ValueError:
                raise TmergeError(f"schedule must be a comma-separated list of integers, got {schedule!r}") from None
        values = tuple(schedule)
        if not values:
            raise TmergeError("schedule is empty; give one r per block, e.g. 8,8,4")
        for v in values:
            _check_r(v, "schedule entries")
        return ScheduleSpec(per_layer=values)
    r = 0 if r is None else r
    _check_r(r, "r")
    return ScheduleSpec(r=int(r))


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
