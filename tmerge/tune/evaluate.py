"""The measurements of ``tmerge tune``: FLOPs (cost model), drift and runtime latency of candidates,
and what tune knows about each of them."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import runtime as runtimes
from ..errors import TmergeError
from ..metrics import drift_between, model_outputs
from ..models.flops import count_flops, token_cost_model
from ..models.forward import input_shape
from ..models.merged import apply
from ..patch import tokens_per_layer
from ..profiling import latency as lat
from ..profiling.profile import export_for_runtime
from ..profiling.sweep import drift_value
from .space import Candidate

RUNTIMES = ("onnxruntime", "openvino", "torch", "tensorrt")


class Evaluator:
    """Builds candidates on one working copy of the model and measures them (with caches)."""

    def __init__(self, unmerged: nn.Module):
        self.unmerged = unmerged.eval()
        self.work = copy.deepcopy(unmerged).eval()
        self.cost = token_cost_model(unmerged)
        self.unmerged_flops = self.cost(tokens_per_layer(unmerged))
        self._reference: dict = {}

    def build(self, cand: Candidate, model: nn.Module | None = None) -> nn.Module:
        """``cand`` applied to ``model`` (default: the working copy, re-patched each time); eval mode."""
        return apply(self.work if model is None else model, cand.merge).eval()

    def flops_ratio(self, tokens: tuple[int, ...]) -> float:
        """The cost model: FLOPs ratio from the token counts (see :func:`token_cost_model`)."""
        return self.cost(tokens) / self.unmerged_flops

    def exact_flops_ratio(self, cand: Candidate) -> float:
        """FLOPs ratio counted on the real forward (merge matmuls included), for the timed candidates."""
        shape = input_shape(self.unmerged)
        merged = count_flops(self.build(cand), shape, per_layer=False)["per_image"]
        return merged / count_flops(self.unmerged, shape, per_layer=False)["per_image"]

    def drift(self, cand: Candidate, images: torch.Tensor, split: str, metric: str) -> tuple[float, dict]:
        key = (split, len(images))
        if key not in self._reference:
            self._reference[key] = model_outputs(self.unmerged, images)
        d = drift_between(self.build(cand), self.unmerged, images, reference=self._reference[key])
        value = drift_value(d, metric)
        if value is None:
            raise TmergeError(f"--drift-metric {metric} does not apply to this model "
                              f"(outputs are {d['outputs']})")
        return float(value), d


def make_runner(runtime: str, model: nn.Module, x: torch.Tensor, workdir: Path, name: str,
                threads: int | None, device: str) -> Callable[[], Any]:
    """One model's prepared forward on ``x`` for timing on ``runtime`` (ONNX runtimes: exported once,
    unverified — the chosen configuration is exported and verified by ``tmerge export``)."""
    source: Any = model
    if runtimes.find_backend(runtime).takes == "onnx":
        source = workdir / f"{name}.onnx"
        export_for_runtime(model, source, model_name=None, verify=False)
    return runtimes.create(runtime, source, device=device, threads=threads, timing=True).prepare(x)


def check_runtime(runtime: str, device: str) -> None:
    if runtime not in RUNTIMES:
        raise TmergeError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    runtimes.check_backend(runtime, device)


@dataclass(eq=False)
class Entry:
    """What tune knows about one candidate."""

    cand: Candidate
    flops_ratio: float
    tokens: list[int] = field(default_factory=list)
    drift: dict[str, float] = field(default_factory=dict)  # "screen" / "calibration" / "held_out" -> value
    times: list[float] = field(default_factory=list)  # timed runs (s) ...
    reference_times: list[float] = field(default_factory=list)  # ... and the unmerged runs of the same rounds
    stage: str = "cost model"
    flops_ratio_exact: float | None = None  # counted on the real forward (timed candidates)

    @property
    def calibration_drift(self) -> float | None:
        return self.drift.get("calibration", self.drift.get("screen"))

    @property
    def latency_ratio(self) -> float | None:
        if not self.times:
            return None
        return float(np.median(self.times) / np.median(self.reference_times))

    @property
    def latency_ratio_ci(self) -> list[float] | None:
        """Bootstrap interval of :attr:`latency_ratio` over the rounds timed with the unmerged model."""
        return lat.ratio_interval(self.times, self.reference_times) if self.times else None

    def surely_faster_than(self, other: "Entry") -> bool:
        """Whether the two latency intervals say this entry is faster (they do not overlap)."""
        mine, theirs = self.latency_ratio_ci, other.latency_ratio_ci
        return mine is not None and theirs is not None and mine[1] < theirs[0]

    @property
    def p50_ms(self) -> float | None:
        return float(np.median(self.times) * 1e3) if self.times else None

    def as_dict(self) -> dict:
        return {**self.cand.as_dict(), "flops_ratio": self.flops_ratio, "flops_ratio_exact": self.flops_ratio_exact, "final_tokens": self.tokens[-1] if self.tokens else None,
                "tokens": self.tokens, "drift": dict(self.drift), "latency_ratio_p50": self.latency_ratio,
                "latency_ratio_p50_ci": self.latency_ratio_ci,
                "p50_ms": self.p50_ms, "timed_rounds": len(self.times), "stage": self.stage}
