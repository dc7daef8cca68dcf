"""Successive halving on the target runtime: the candidates are timed together with the unmerged model,
interleaved, order flipped every round; each rung keeps the better half and doubles the rounds."""

from __future__ import annotations

import copy
import math

from ..profiling import latency as lat
from .budget import rank
from .evaluate import Entry, make_runner


def time_rungs(pool, reference, mode, config, ev, unmerged_runner, x, workdir, clock, progress, rounds,
               runners) -> tuple[list[dict], list[Entry]]:
    """Successive halving: time the pool with the unmerged model, keep the better half, double rounds.
    Returns (the rungs as recorded in the result, the candidates timed in the last rung)."""
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
        ranked = rank(alive, mode, config, measured=True)
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
