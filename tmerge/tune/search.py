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

import math
import shlex
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data import SAMPLE_PHOTOS, load_images
from ..errors import TmergeError
from ..merging import registry
from ..profiling import latency as lat
from ..profiling.profile import ProgressReporter
from .budget import Clock, TuneConfig, feasible, rank
from .evaluate import Entry, Evaluator, make_runner
from .halving import time_rungs
from .pareto import pareto_front
from .space import Candidate, candidate_tokens, search_space

SCREEN_IMAGES = 8  # calibration images of the binary-search screen
FLOPS_SLACK = 0.03  # FLOPs-ratio margin within which a schedule may still beat a cheaper-looking one
SCREEN_SHARE = 0.4  # at most this share of the time left after setup goes to the drift screen


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


def tune(unmerged: nn.Module, config: TuneConfig, *, model_name: str, progress: ProgressReporter | None = None,
         images=None, reference_model_flags: list[str] | None = None) -> dict:
    """Run the search; the result dict (see the module docstring). ``images`` (an ImageSet) overrides
    ``config.data``. Raises TmergeError on bad input; a budget nobody meets is ``result["met"] = False``."""
    config.validate()
    progress = progress or ProgressReporter()
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
            pool = rank(pool, mode, config)
            reference = next((e for e in pool if _is_reference_family(e.cand)), None)
            pool = pool[: config.max_timed] + ([reference] if reference and reference not in pool[: config.max_timed]
                                               else [])
        # ---------------------------------------------------------------- successive halving
        rungs, last = time_rungs(pool, reference, mode, config, ev, unmerged_runner, x, Path(workdir.name), clock,
                                  progress, rounds, runners)
    finally:
        runners.clear()
        workdir.cleanup()
    # ---------------------------------------------------------------- choose + confirm on held-out
    # the last rung's candidates (most rounds, timed together) first, then those halved away earlier
    ranked = rank(last, mode, config, measured=bool(rungs))
    ranked += rank([e for e in pool if e not in last], mode, config, measured=bool(rungs))
    chosen = None
    for e in ranked:
        measure(e, "held_out")
        if feasible(e, mode, config, split="held_out"):
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
        if feasible(e, mode, config, split="held_out"):
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


def export_command_line(flags: list[str], cand: Candidate, config: TuneConfig, out: str | None) -> str:
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
        "export_command": export_command_line(model_flags, chosen.cand, config, None) if chosen else None,
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
