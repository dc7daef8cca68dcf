"""Pareto fronts of the measured candidates: speed against calibration drift."""

from __future__ import annotations

import math
from typing import Callable

from .evaluate import Entry


def pareto_front(entries: list[Entry], speed: Callable[[Entry], float | None]) -> list[Entry]:
    """Entries no other entry beats on both speed (lower) and calibration drift (lower)."""
    pts = [e for e in entries if speed(e) is not None and e.calibration_drift is not None]
    pts.sort(key=lambda e: (speed(e), e.calibration_drift, e.cand.label))
    front, best = [], math.inf
    for e in pts:
        if e.calibration_drift < best:
            front.append(e)
            best = e.calibration_drift
    return front
