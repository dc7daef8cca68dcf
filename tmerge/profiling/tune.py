"""``tmerge tune``: the fastest merged model within a drift budget (or the most faithful one within a
latency budget), measured on the target runtime.

Search, cheapest evidence first:

1. **Search space.** Per method (training-free ones; learned ones only with a trained adapter, which
   fixes their schedule, and only where the adapter drifts less than ToMe at that schedule on the
   calibration split: at equal cost, timing could otherwise pick it by noise) and proportional-attention setting: *families* of schedules ordered by
   strength — constant r, ToMe's (r, inflection) ramps, "late" schedules that merge only in the later
   blocks, PiToMe-style keep ratios. Schedules that resolve to the same per-block r are one candidate.
2. **Cost model.** Exact FLOPs of every candidate (``torch.utils.flop_counter`` on the real forward,
   cached per method and per-block r).
3. **Drift screen** on the calibration split. ``--max-drift``: per family, a binary search on strength
   (drift grows with merging) for the strongest schedule within the budget on a small subset, skipping
   schedules the cost model already rules out; the family frontiers are re-measured on the whole
   calibration split. ``--latency-ms``: per family the weakest schedules the cost model predicts to fit
   the budget.
4. **Successive halving on the target runtime.** The most promising candidates (and the constant-r
   ToMe reference) are exported once and timed together with the unmerged model, one run at a time,
   interleaved, order flipped every round; each rung keeps the better half and doubles the rounds.
5. **Confirmation** of the winner's drift on the held-out split (the next best is tried when the
   winner fails it).

Deterministic given ``seed`` up to the timing itself: candidates, data split, drift and the cost model
are exact; which candidates survive a rung depends on measured times, and the JSON records them.
"""

from __future__ import annotations

import copy
import io
import math
import re
import shlex
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import runtime as runtimes
from .._optional import pyplot
from ..config import MergeConfig
from ..data import SAMPLE_PHOTOS, load_images
from ..errors import TmergeError
from ..merging import MergeMethod, registry
from ..models.adapters import read_adapter
from ..models.flops import count_flops, token_cost_model
from ..models.forward import input_shape
from ..models.merged import apply
from ..patch import tokens_per_layer
from ..schedule import ScheduleSpec, resolve
from . import latency as lat
from .profile import Progress, drift_between, export_for_runtime, model_outputs
from .sweep import check_drift_metric, drift_value

RUNTIMES = ("onnxruntime", "openvino", "torch", "tensorrt")
PROP_ATTN_MODES = ("both", "on", "off", "default")
INFLECTIONS = (-0.5, 0.5)  # ToMe ramps: more merging early (-) or late (+)
KEEP_RATIOS = tuple(round(1 - 0.01 * i, 2) for i in range(1, 31))  # 0.99 .. 0.70
SCREEN_IMAGES = 8  # calibration images of the binary-search screen
FLOPS_SLACK = 0.03  # FLOPs-ratio margin within which a schedule may still beat a cheaper-looking one
SCREEN_SHARE = 0.4  # at most this share of the time left after setup goes to the drift screen


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


# ----------------------------------------------------------------------------------------------
# search space


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


# ----------------------------------------------------------------------------------------------
# the measurements: FLOPs (cost model), drift, latency


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


# ----------------------------------------------------------------------------------------------
# the search


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


class Clock:
    def __init__(self, budget_s: float, reserve_s: float = 0.0):
        self.start = time.monotonic()
        self.deadline = self.start + budget_s - reserve_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def split_images(images: torch.Tensor, seed: int, period: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, held-out). ``period``: the images cycle through that many sources (sample views:
    view i shows photo i mod P), so alternate blocks of ``period`` go to each side and both hold every
    photo alike; otherwise a seeded permutation, cut in halves (held-out gets the smaller one)."""
    n = len(images)
    if n < 2:
        raise TmergeError(f"tune needs at least 2 images (calibration + held-out), got {n}")
    if period and n >= 2 * period:
        side = (torch.arange(n) // period) % 2
        return images[side == 0], images[side == 1]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = (n + 1) // 2
    return images[order[:cut]], images[order[cut:]]


def tune(unmerged: nn.Module, config: TuneConfig, *, model_name: str, progress: Progress | None = None,
         images=None, reference_model_flags: list[str] | None = None) -> dict:
    """Run the search; the result dict (see the module docstring). ``images`` (an ImageSet) overrides
    ``config.data``. Raises TmergeError on bad input; a budget nobody meets is ``result["met"] = False``."""
    config.validate()
    progress = progress or Progress()
    clock = Clock(config.time_budget_s)
    torch.manual_seed(config.seed)
    lat.set_torch_threads(config.threads)
    if images is None:
        n = config.num_images if config.num_images is not None else _default_images(config.data)
        images = load_images(config.data, unmerged, n=n, seed=config.seed)
    calibration, held_out = split_images(images[0], config.seed, _views_period(config.data))
    screen = calibration[:SCREEN_IMAGES]
    metric = config.drift_metric
    mode = "max_drift" if config.max_drift is not None else "latency_ms"

    progress.log(f"search space for {', '.join(config.methods) or 'adapters'}")
    space = search_space(unmerged, list(config.methods), list(config.adapters), prop_attn=config.prop_attn)
    if not space:
        raise TmergeError("the search space is empty for this model (no schedule merges any token)")
    ev = Evaluator(unmerged)
    update = progress.step(f"cost model: FLOPs of {len(space)} candidates", total=len(space))
    entries: list[Entry] = []
    for i, cand in enumerate(space):
        if clock.left() <= 0:
            progress.log(f"time budget reached after the FLOPs of {i} of {len(space)} candidates")
            break
        counts = candidate_tokens(unmerged, cand)
        entries.append(Entry(cand, ev.flops_ratio(counts), list(counts)))
        update(i + 1)
    families: dict[tuple, list[Entry]] = {}
    for e in entries:
        families.setdefault(e.cand.family_key, []).append(e)
    for fam in families.values():
        fam.sort(key=lambda e: e.cand.strength)

    def measure(entry: Entry, split: str) -> float:
        imgs = {"screen": screen, "calibration": calibration, "held_out": held_out}[split]
        if split not in entry.drift:
            entry.drift[split], _ = ev.drift(entry.cand, imgs, split, metric)
        return entry.drift[split]

    _drop_learned_worse_than_tome(families, measure, progress)
    rounds: dict[str, Any] = {"unmerged_ms": None}
    workdir = tempfile.TemporaryDirectory(prefix="tmerge-tune-")
    runners: dict[int, Callable[[], Any]] = {}
    try:
        x = _timing_batch(calibration, config.batch)
        unmerged_runner = _unmerged_runner(config, unmerged, x, Path(workdir.name), progress, rounds)
        clock.deadline -= rounds.get("reserved_s", 0.0)
        # the drift screen may use up to SCREEN_SHARE of what is left; the rest is for timing
        screen_clock = Clock(0)
        screen_clock.deadline = time.monotonic() + SCREEN_SHARE * clock.left()
        # ---------------------------------------------------------------- drift screen
        if mode == "max_drift":
            frontiers = _screen_max_drift(families, config.max_drift, measure, screen_clock, progress)
            pool, reference = _confirm(frontiers, config.max_drift, measure, config.max_timed, clock, progress)
        else:
            pool = _screen_latency(families, config.latency_ms, rounds["unmerged_ms"], measure, screen_clock, progress)
            pool = _rank(pool, mode, config)
            reference = next((e for e in pool if _is_reference_family(e.cand)), None)
            pool = pool[: config.max_timed] + ([reference] if reference and reference not in pool[: config.max_timed]
                                               else [])
        # ---------------------------------------------------------------- successive halving
        rungs, last = _time_rungs(pool, reference, mode, config, ev, unmerged_runner, x, Path(workdir.name), clock,
                                  progress, rounds, runners)
    finally:
        runners.clear()
        workdir.cleanup()
    # ---------------------------------------------------------------- choose + confirm on held-out
    # the last rung's candidates (most rounds, timed together) first, then those halved away earlier
    ranked = _rank(last, mode, config, measured=bool(rungs))
    ranked += _rank([e for e in pool if e not in last], mode, config, measured=bool(rungs))
    chosen = None
    for e in ranked:
        measure(e, "held_out")
        if _feasible(e, mode, config, split="held_out"):
            chosen = e
            break
        e.stage += ", failed held-out"
    if chosen is not None and mode == "max_drift" and chosen.times:
        chosen = _least_drift_among_ties(chosen, ranked, measure, mode, config)
    if reference is not None:
        measure(reference, "held_out")
    measured = [e for e in entries if e.drift]
    closest = ranked[0] if ranked else (min(measured, key=lambda e: e.calibration_drift) if measured else None)
    met = chosen is not None
    if closest is None:
        raise TmergeError(f"the time budget ({config.time_budget_s:g} s) ran out before any candidate was "
                          "measured; give a larger --time-budget")
    if chosen is not None:
        chosen.stage = "chosen"
    return _result(entries, chosen or closest, met, reference, mode, config, model_name, clock, rounds, rungs,
                   len(calibration), len(held_out), reference_model_flags or [])


def _views_period(source: str) -> int | None:
    if source != "samples":
        return None
    return len(SAMPLE_PHOTOS)


def _default_images(source: str) -> int | None:
    return 32 if source == "samples" else (64 if str(source).startswith("fashion-mnist") else None)


def _timing_batch(images: torch.Tensor, batch: int) -> torch.Tensor:
    reps = -(-batch // len(images))
    return images.repeat(reps, 1, 1, 1)[:batch].contiguous()


def _unmerged_runner(config, unmerged, x, workdir, progress, rounds) -> Callable[[], Any]:
    progress.log(f"preparing the unmerged model on {config.runtime}")
    t0 = time.monotonic()
    runner = make_runner(config.runtime, unmerged, x, workdir, "unmerged", config.threads, config.device)
    rounds["prepare_s"] = time.monotonic() - t0
    if config.reserve_exports:  # room for the verified export of the choice (about 3 unverified ones)
        rounds["reserved_s"] = 3 * rounds["prepare_s"] * config.reserve_exports
    times = lat.time_interleaved({"unmerged": runner}, warmup=1, iters=2)["unmerged"]
    rounds["unmerged_ms"] = float(sorted(times)[len(times) // 2] * 1e3)
    return runner


def _feasible(e: Entry, mode: str, config: TuneConfig, split: str = "calibration") -> bool:
    if mode == "max_drift":
        value = e.drift.get(split) if split != "calibration" else e.calibration_drift
        return value is not None and value <= config.max_drift
    return e.p50_ms is not None and e.p50_ms <= config.latency_ms


def _rank(entries: list[Entry], mode: str, config: TuneConfig, measured: bool = False) -> list[Entry]:
    """Best first. max-drift: feasible by latency ratio (measured) or FLOPs; latency-ms: feasible by drift."""
    def key(e: Entry):
        if mode == "max_drift":
            speed = e.latency_ratio if measured and e.latency_ratio is not None else e.flops_ratio
            return (not _feasible(e, mode, config), speed if _feasible(e, mode, config) else e.calibration_drift or 0,
                    e.flops_ratio, e.cand.label)
        ok = _feasible(e, mode, config) if measured else True
        return (not ok, (e.calibration_drift or 0) if ok else (e.p50_ms or math.inf), e.flops_ratio, e.cand.label)

    return sorted(entries, key=key)


def _drop_learned_worse_than_tome(families: dict, measure: Callable[[Entry, str], float], progress) -> None:
    """A trained adapter costs what ToMe costs at the same schedule, so timing cannot tell them apart:
    it stays a candidate only where it drifts less than ToMe at its schedule on the calibration split."""
    for key, fam in list(families.items()):
        learned = fam[0]
        if learned.cand.merge.adapter_path is None:
            continue
        tome = replace(learned.cand.merge, method="tome", options={}, adapter=None)
        twin = Entry(Candidate(tome, "adapter", learned.cand.strength),
                     learned.flops_ratio, list(learned.tokens))
        ours, tome = measure(learned, "calibration"), measure(twin, "calibration")
        if ours >= tome:
            learned.stage = f"dropped: drifts more than ToMe at its schedule ({ours:.4g} vs {tome:.4g})"
            del families[key]
            progress.log(f"{learned.cand.label}: {learned.stage}")


def _is_reference_family(cand: Candidate) -> bool:

    return (cand.merge.method == "tome" and cand.family == "r"
            and cand.merge.prop_attn == bool(registry.get("tome").prop_attn_default))


def _least_drift_among_ties(fastest: Entry, ranked: list[Entry], measure, mode: str, config: TuneConfig) -> Entry:
    """Among the feasible timed candidates that ``fastest`` is not surely faster than (their latency
    intervals overlap), the one with the least held-out drift: a speed advantage inside the timing
    noise never outweighs less drift."""
    ties = [fastest]
    for e in ranked:
        if e is fastest or not e.times or fastest.surely_faster_than(e):
            continue
        measure(e, "held_out")
        if _feasible(e, mode, config, split="held_out"):
            ties.append(e)
    return min(ties, key=lambda e: (e.drift["held_out"], e.latency_ratio, e.cand.label))


def _screen_max_drift(families, budget, measure, clock, progress) -> list[tuple[list[Entry], int]]:
    """Per family, the strongest schedule within the drift budget on the small screen subset; returns
    (family schedules considered, index of the frontier) pairs.

    Families go cheapest-first, constant-r ToMe (the reference) before all; each later family is only
    searched among schedules whose FLOPs come within FLOPS_SLACK of the best frontier so far, starting
    from the weakest of them: when that one already exceeds the budget the family is done after one
    measurement, else a binary search (drift grows with strength) finds its frontier.
    """
    best_flops = math.inf
    frontiers: list[tuple[list[Entry], int]] = []
    order = sorted(families.values(), key=lambda fam: (not _is_reference_family(fam[0].cand),
                                                       min(e.flops_ratio for e in fam), fam[0].cand.label))
    update = progress.step("drift screen: cost-model bound + binary search per family", total=len(order))
    for i, fam in enumerate(order):
        update(i)
        if clock.left() <= 0:
            progress.log(f"drift screen stopped by the time budget after {i} of {len(order)} families")
            break
        useful = [e for e in fam if e.flops_ratio <= best_flops + FLOPS_SLACK]
        if not useful:
            continue
        found, lo, hi = None, 1, len(useful) - 1
        useful[0].stage = "drift screen"
        if measure(useful[0], "screen") <= budget:
            found = 0
            while lo <= hi:
                mid = (lo + hi) // 2
                useful[mid].stage = "drift screen"
                if measure(useful[mid], "screen") <= budget:
                    found, lo = mid, mid + 1
                else:
                    hi = mid - 1
        if found is not None:
            frontiers.append((useful, found))
            best_flops = min(best_flops, useful[found].flops_ratio)
    update(len(order))
    return frontiers


def _confirm(frontiers, budget, measure, want, clock, progress) -> tuple[list[Entry], Entry | None]:
    """Re-measure the cheapest screen frontiers on the whole calibration split, stepping back in their
    family while they fail it, until ``want`` hold (plus the constant-r ToMe reference, always
    confirmed). Returns (timing pool, reference)."""
    pool: list[Entry] = []
    reference = None
    ordered = sorted(frontiers, key=lambda f: (f[0][f[1]].flops_ratio, f[0][f[1]].cand.label))
    update = progress.step("drift on the calibration split", total=min(want, len(ordered)))
    for fam, idx in ordered:
        is_ref = _is_reference_family(fam[idx].cand)
        if len(pool) >= want and not is_ref:
            continue
        if clock.left() <= 0 and pool and not is_ref:
            continue
        for j in range(idx, -1, -1):
            fam[j].stage = "calibration"
            if measure(fam[j], "calibration") <= budget:
                if len(pool) < want:
                    pool.append(fam[j])
                    update(len(pool))
                if is_ref:
                    reference = fam[j]
                break
            if not is_ref and j <= idx - 1:  # one step back at most, except for the reference
                break
    if reference is not None and reference not in pool:
        pool.append(reference)
    return pool, reference


def _screen_latency(families, budget_ms, unmerged_ms, measure, clock, progress) -> list[Entry]:
    """Per family, the two weakest schedules whose FLOPs ratio predicts the latency budget (latency
    ratio ~ FLOPs ratio), by drift on the calibration split."""
    target = budget_ms / unmerged_ms
    picked: list[Entry] = []
    for fam in families.values():
        fits = [e for e in fam if e.flops_ratio <= target * (1 + FLOPS_SLACK)]
        picked += fits[:2] if fits else fam[-1:]
    update = progress.step("drift on the calibration split", total=len(picked))
    for i, e in enumerate(sorted(picked, key=lambda e: e.cand.label)):
        if clock.left() <= 0:
            break
        e.stage = "calibration"
        measure(e, "calibration")
        update(i + 1)
    return [e for e in picked if "calibration" in e.drift]


def _time_rungs(pool, reference, mode, config, ev, unmerged_runner, x, workdir, clock, progress, rounds,
                runners) -> list[dict]:
    """Successive halving: time the pool with the unmerged model, keep the better half, double rounds."""
    rungs: list[dict] = []
    alive = list(pool)
    last: list[Entry] = []
    iters = config.first_iters
    unmerged_s = (rounds["unmerged_ms"] or 1.0) / 1e3
    per_export = rounds.get("prepare_s", 0.0)
    while alive:
        new = [e for e in alive if id(e) not in runners]
        # predicted cost of this rung: exports of new candidates + rounds of (unmerged + every candidate)
        cost = len(new) * per_export + (iters + 1) * unmerged_s * (1 + sum(e.flops_ratio for e in alive))
        if cost > clock.left():
            if not rungs:  # not even one rung fits: time fewer candidates
                while len(alive) > 1 and cost > clock.left():
                    alive = alive[:-1] if alive[-1] is not reference else alive[:-2] + alive[-1:]
                    new = [e for e in alive if id(e) not in runners]
                    cost = len(new) * per_export + (iters + 1) * unmerged_s * (1 + sum(e.flops_ratio for e in alive))
                if cost > clock.left():
                    progress.log("time budget too small to time any candidate: choosing by the cost model")
                    break
            else:
                progress.log("time budget reached: stopping the halving")
                break
        verb = "building" if config.runtime == "torch" else "exporting"
        update = progress.step(f"rung {len(rungs) + 1}: {verb} {len(new)} candidates", total=len(new)) if new else None
        for i, e in enumerate(new):
            if clock.left() < per_export + (iters + 1) * unmerged_s * 2 and any(id(a) in runners for a in alive):
                progress.log(f"time budget: timing {len(alive) - len(new) + i} candidates, not {len(alive)}")
                alive = [a for a in alive if id(a) in runners]
                break
            model = ev.build(e.cand, copy.deepcopy(ev.unmerged)) if config.runtime == "torch" else ev.build(e.cand)
            e.flops_ratio_exact = ev.exact_flops_ratio(e.cand)
            runners[id(e)] = make_runner(config.runtime, model, x, workdir, f"c{len(runners)}", config.threads,
                                         config.device)
            update(i + 1)
        runs = {"unmerged": unmerged_runner, **{str(id(e)): runners[id(e)] for e in alive}}
        update = progress.step(f"rung {len(rungs) + 1}: timing {len(alive)} candidates + unmerged, {iters} rounds",
                               total=iters)
        times = lat.time_interleaved(runs, warmup=1, iters=iters, progress=update)
        last = list(alive)
        for e in alive:
            e.times += times[str(id(e))]
            e.reference_times += times["unmerged"]
            e.stage = f"timed (rung {len(rungs) + 1})"
        ranked = _rank(alive, mode, config, measured=True)
        rungs.append({"rounds": iters,
                      "unmerged_p50_ms": float(sorted(times["unmerged"])[len(times["unmerged"]) // 2] * 1e3),
                      "ranking": [{"label": e.cand.label, "latency_ratio_p50": e.latency_ratio, "p50_ms": e.p50_ms}
                                  for e in ranked]})
        keep = ranked[: max(2, math.ceil(len(ranked) / 2))]
        if reference is not None and reference in alive and reference not in keep:
            keep.append(reference)
        if len(keep) >= len(alive):  # nothing left to halve away
            break
        for e in alive:
            if e not in keep:
                runners.pop(id(e), None)
        alive = keep
        iters *= 2
    return rungs, last


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


def export_command(flags: list[str], cand: Candidate, config: TuneConfig, out: str | None) -> str:
    fmt = ["--format", "trt"] if config.runtime == "tensorrt" else []
    default_out = "model.engine" if config.runtime == "tensorrt" else "model.onnx"
    args = ["tmerge", "export", *flags, *cand.merge.as_flags(), *fmt, "--batch-size", str(config.batch),
            "--dynamic-batch", "--out", out or default_out]
    return " ".join(shlex.quote(a) for a in args)


def _result(entries, chosen, met, reference, mode, config, model_name, clock, rounds, rungs, n_cal, n_held,
            model_flags) -> dict:
    timed = [e for e in entries if e.times]
    front_lat = pareto_front(timed, lambda e: e.latency_ratio)
    front_flops = pareto_front(entries, lambda e: e.flops_ratio)
    return {
        "schema_version": 1,
        "kind": "tmerge.tune",
        "model": model_name,
        "mode": mode,
        "budget": {"max_drift": config.max_drift, "latency_ms": config.latency_ms, "drift_metric": config.drift_metric},
        "met": met,
        "chosen": chosen.as_dict() if chosen else None,
        "reference": reference.as_dict() if reference else None,
        "export_command": export_command(model_flags, chosen.cand, config, None) if chosen else None,
        "pareto_latency": [e.cand.label for e in front_lat],
        "pareto_flops": [e.cand.label for e in front_flops],
        "candidates": [e.as_dict() for e in entries if e.drift or e.times],
        "search_space_size": len(entries),
        "unmerged_ms": rounds.get("unmerged_ms"),
        "rungs": rungs,
        "config": {"runtime": config.runtime, "batch": config.batch, "device": config.device,
                   "threads": config.threads, "methods": list(config.methods), "adapters": list(config.adapters),
                   "prop_attn": config.prop_attn, "data": config.data, "calibration_images": n_cal,
                   "held_out_images": n_held, "seed": config.seed, "time_budget_s": config.time_budget_s,
                   "max_timed": config.max_timed},
        "elapsed_s": round(clock.elapsed(), 1),
    }


# ----------------------------------------------------------------------------------------------
# plot


def plot_tune(result: dict) -> bytes:
    """Drift against FLOPs ratio (every measured candidate) and against latency ratio (timed ones);
    the Pareto fronts as lines, the chosen point and the ToMe reference marked; PNG bytes."""
    plt = pyplot()

    cands = result["candidates"]
    metric = result["budget"]["drift_metric"]

    def drift(c):
        return c["drift"].get("calibration", c["drift"].get("screen"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    panels = (("flops_ratio", "FLOPs ratio (merged / unmerged)", "pareto_flops"),
              ("latency_ratio_p50", f"latency ratio p50 ({result['config']['runtime']}, batch "
                                    f"{result['config']['batch']})", "pareto_latency"))
    methods = sorted({c["method"] for c in cands})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, (key, xlabel, front_key) in zip(axes, panels):
        pts = [c for c in cands if c.get(key) is not None and drift(c) is not None]
        for m in methods:
            mine = [c for c in pts if c["method"] == m]
            if mine:
                ax.scatter([c[key] for c in mine], [drift(c) for c in mine], s=14, alpha=0.6, color=colors[m], label=m)
        front = [c for c in pts if c["label"] in set(result[front_key])]
        front.sort(key=lambda c: c[key])
        if front:
            ax.plot([c[key] for c in front], [drift(c) for c in front], color="black", linewidth=1, label="Pareto front")
        ref = result.get("reference")
        if ref and ref.get(key) is not None and drift(ref) is not None:
            ax.scatter([ref[key]], [drift(ref)], marker="s", s=70, facecolors="none", edgecolors="red",
                       label=f"constant-r ToMe ({ref['label'].split(' ')[1]})")
        ch = result.get("chosen")
        if ch and ch.get(key) is not None and drift(ch) is not None:
            ax.scatter([ch[key]], [drift(ch)], marker="*", s=220, color="gold", edgecolors="black", zorder=5,
                       label="chosen")
        if result["budget"]["max_drift"] is not None:
            ax.axhline(result["budget"]["max_drift"], color="red", linestyle="--", linewidth=0.8, label="drift budget")
        elif key == "latency_ratio_p50" and result.get("unmerged_ms"):
            ax.axvline(result["budget"]["latency_ms"] / result["unmerged_ms"], color="red", linestyle="--",
                       linewidth=0.8, label="latency budget (approx.)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"drift: {metric} (calibration)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("cost model (FLOPs = 2·MACs)", fontsize=9)
    axes[1].set_title("timed on the target runtime, interleaved with the unmerged model", fontsize=9)
    fig.suptitle(f"tmerge tune · {result['model']}", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
