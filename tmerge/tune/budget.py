"""The budgets of ``tmerge tune`` (drift or latency, and time) and the ranking of candidates against them."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from ..errors import TmergeError
from ..profiling.sweep import check_drift_metric
from .evaluate import Entry, check_runtime
from .space import PROP_ATTN_MODES, is_learned


def parse_duration(text: str | float | int) -> float:
    """``"15m"``, ``"90s"``, ``"1h"``, ``"1.5m"`` or a number of seconds -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
        if not match:
            raise TmergeError(f"--time-budget takes a duration like 15m, 900s or 1h, got {text!r}")
        seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if not seconds > 0 or math.isinf(seconds):
        raise TmergeError(f"--time-budget must be positive, got {text!r}")
    return seconds


@dataclass
class TuneConfig:
    runtime: str = "onnxruntime"
    batch: int = 8
    max_drift: float | None = None
    latency_ms: float | None = None
    drift_metric: str = "cosine_distance_mean"
    methods: tuple[str, ...] = ("tome", "pitome")
    adapters: tuple[str, ...] = ()
    prop_attn: str = "both"
    data: str = "samples"
    num_images: int | None = None
    time_budget_s: float = 900.0
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    max_timed: int = 8  # candidates in the first timing rung (the reference comes on top)
    first_iters: int = 3  # timed rounds of the first rung; doubled every rung
    reserve_exports: int = 0  # verified exports the caller runs after the search (time kept free)

    def validate(self) -> None:
        if (self.max_drift is None) == (self.latency_ms is None):
            raise TmergeError("give exactly one budget: --max-drift D or --latency-ms T")
        if self.max_drift is not None and not (self.max_drift >= 0 and math.isfinite(self.max_drift)):
            raise TmergeError(f"--max-drift must be a finite number >= 0, got {self.max_drift!r}")
        if self.latency_ms is not None and not (self.latency_ms > 0 and math.isfinite(self.latency_ms)):
            raise TmergeError(f"--latency-ms must be a positive number, got {self.latency_ms!r}")
        check_drift_metric(self.drift_metric)
        if isinstance(self.batch, bool) or self.batch < 1:
            raise TmergeError(f"--batch must be a positive integer, got {self.batch!r}")
        if self.num_images is not None and self.num_images < 2:
            raise TmergeError(f"--num-images must be at least 2 (calibration + held-out), got {self.num_images}")
        if self.max_timed < 1:
            raise TmergeError(f"--max-timed must be at least 1, got {self.max_timed}")
        if self.threads is not None and self.threads < 1:
            raise TmergeError(f"--threads must be at least 1, got {self.threads}")
        if not self.methods and not self.adapters:
            raise TmergeError("--methods needs at least one method (or give --adapter)")
        for method in self.methods:
            if is_learned(method):
                raise TmergeError(f"{method} is a learned method: give its trained adapter with --adapter "
                                  "(it is searched at the adapter's schedule)")
        if self.prop_attn not in PROP_ATTN_MODES:
            raise TmergeError(f"--prop-attn-search must be one of {', '.join(PROP_ATTN_MODES)}, got {self.prop_attn!r}")
        check_runtime(self.runtime, self.device)


class Clock:
    def __init__(self, budget_s: float, reserve_s: float = 0.0):
        self.start = time.monotonic()
        self.deadline = self.start + budget_s - reserve_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def feasible(e: Entry, mode: str, config: TuneConfig, split: str = "calibration") -> bool:
    """Whether ``e`` meets the budget of ``mode``: its drift on ``split``, or its measured p50 latency."""
    if mode == "max_drift":
        value = e.drift.get(split) if split != "calibration" else e.calibration_drift
        return value is not None and value <= config.max_drift
    return e.p50_ms is not None and e.p50_ms <= config.latency_ms


def rank(entries: list[Entry], mode: str, config: TuneConfig, measured: bool = False) -> list[Entry]:
    """Best first. max-drift: feasible by latency ratio (measured) or FLOPs; latency-ms: feasible by drift."""
    def key(e: Entry):
        if mode == "max_drift":
            speed = e.latency_ratio if measured and e.latency_ratio is not None else e.flops_ratio
            return (not feasible(e, mode, config), speed if feasible(e, mode, config) else e.calibration_drift or 0,
                    e.flops_ratio, e.cand.label)
        ok = feasible(e, mode, config) if measured else True
        return (not ok, (e.calibration_drift or 0) if ok else (e.p50_ms or math.inf), e.flops_ratio, e.cand.label)

    return sorted(entries, key=key)
