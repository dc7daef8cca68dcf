"""Latency of a merged model against its unmerged self, timed in one process, interleaved.

Methodology (also in docs/methodology.md):

- Both models are built and loaded before any timing, for the same backend, device and batch size,
  on the same input batch.
- Warm-up: ``warmup`` untimed runs of each model (alternating), so one-off costs (allocator growth,
  ONNX Runtime arena, cuDNN/oneDNN kernel selection, ``torch.compile`` compilation) are excluded.
- Timed iterations alternate the models one run at a time, and the order flips every round
  (A B, B A, A B, ...): slow drift of the machine (thermal state, other tenants, frequency scaling)
  hits both models alike, and neither always runs right after the other.
- Each run is timed with ``time.perf_counter`` around one synchronous forward; on CUDA the
  device is synchronised before the clock is read (torch) or ONNX Runtime's ``run`` returns host
  outputs, so the time includes the copy of the outputs to the host.
- Reported per model: p50/p90/p99 (linear interpolation), mean, std (null with one timed run),
  min, max, and throughput = batch size / mean time. Ratios merged/unmerged of p50 and of mean; the
  CI gate uses ratios.
- Trust in a ratio: a 95 % bootstrap confidence interval of ratio_p50, resampling the timed rounds
  as pairs (the merged and the unmerged run of one round stay together, so a slow spell that hits
  both cancels). An interval wider than :data:`WIDE_INTERVAL` of the ratio cannot call it: the
  report carries a warning, and ``tmerge check`` and ``tmerge tune`` use the interval, not the point.
- Threads: ``torch.set_num_threads(threads)``; ONNX Runtime ``intra_op_num_threads=threads``,
  ``inter_op_num_threads=1``, sequential execution, and intra-op thread spinning off, because with
  two sessions interleaved, one session's spinning pool would steal cores from the other;
  OpenVINO ``INFERENCE_NUM_THREADS=threads`` with f32 precision (see :mod:`tmerge.runtime`).
- Peak memory per model: on CUDA, ``torch.cuda.max_memory_allocated`` growth during one forward
  (torch backend only); on CPU not measured ("n/a"): the runtimes keep no allocation accounting
  there, and the process's resident-set growth mostly shows allocator reuse (it read 0.0 MiB).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import numpy as np
import torch

from ..errors import TmergeError

CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
WIDE_INTERVAL = 0.10  # an interval wider than this share of its ratio is too wide to call the ratio


# ----------------------------------------------------------------------------------------------
# statistics


def summarize(times_s: list[float], batch_size: int) -> dict:
    """Latency statistics of one model's timed runs (seconds in, milliseconds out)."""
    if not times_s:
        raise ValueError("no timed runs")
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    mean = float(ms.mean())
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": mean,
        "std_ms": float(ms.std(ddof=1)) if len(ms) > 1 else None,  # one run has no spread
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "throughput_ips": float(batch_size / (mean / 1e3)) if mean > 0 else math.inf,
        "iters": int(len(ms)),
    }


def ratio_interval(merged_s: list[float], unmerged_s: list[float], *, level: float = CI_LEVEL,
                   resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float] | None:
    """Bootstrap confidence interval [low, high] of median(merged) / median(unmerged) over paired
    rounds (``merged_s[i]`` and ``unmerged_s[i]`` were timed in the same round); None with fewer than
    two rounds. Seeded, so a report is reproducible from its times."""
    m, u = np.asarray(merged_s, dtype=np.float64), np.asarray(unmerged_s, dtype=np.float64)
    if len(m) != len(u):
        raise ValueError("merged and unmerged times must come from the same rounds")
    if len(m) < 2:
        return None
    rounds = np.random.default_rng(seed).integers(0, len(m), size=(resamples, len(m)))
    ratios = np.median(m[rounds], axis=1) / np.median(u[rounds], axis=1)
    low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


def interval_too_wide(ratio: float, interval: list[float] | None) -> bool:
    """Whether ``interval`` (None: not measurable) is too wide to call ``ratio``."""
    return interval is None or (interval[1] - interval[0]) > WIDE_INTERVAL * ratio


def interval_warnings(entries: list[dict], loadavg: list[float] | None = None) -> list[str]:
    """One line per latency entry whose ratio interval is too wide (or missing) to call the ratio."""
    busy = f"; load average {loadavg[0]:g} on {usable_cpus()} cores" if loadavg else ""
    lines = []
    for e in entries:
        interval = e.get("ratio_p50_ci")
        if not interval_too_wide(e["ratio_p50"], interval):
            continue
        where = f"latency {e['backend']}/{e['device']}/b{e['batch_size']}: ratio_p50 {e['ratio_p50']:.3f}"
        if interval is None:
            lines.append(f"{where} comes from one timed run and has no interval; time more --iters")
        else:
            lines.append(f"{where} has a {e.get('ci_level', CI_LEVEL):.0%} interval {interval[0]:.3f}–{interval[1]:.3f}, "
                         f"too wide to call the ratio{busy}; rerun on a quieter machine or with more --iters")
    return lines


def time_interleaved(runs: dict[str, Callable[[], Any]], *, warmup: int, iters: int,
                     progress: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Time each callable ``iters`` times, one run at a time, alternating, flipping the order each
    round; ``warmup`` untimed alternating runs first. Each callable must return only when its work is
    done (synchronised). ``progress(k)`` is called after each round with the number of rounds done."""
    if iters < 1:
        raise TmergeError(f"--iters must be at least 1, got {iters}")
    if warmup < 0:
        raise TmergeError(f"--warmup must be at least 0, got {warmup}")
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    for i in range(iters):
        for name in (names if i % 2 == 0 else names[::-1]):
            fn = runs[name]
            start = clock()
            fn()
            times[name].append(clock() - start)
        if progress is not None:
            progress(i + 1)
    return times


# ----------------------------------------------------------------------------------------------
# peak memory


def peak_memory_mb(fn: Callable[[], Any], device: str, backend: str = "torch") -> tuple[float | None, str]:
    """Peak memory growth (MiB) while ``fn`` runs once, and how it was measured (None: not measurable)."""
    if device == "cuda" and backend in ("torch", "torch.compile"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, "cuda_max_memory_allocated"
    # On CPU neither torch nor ONNX Runtime accounts its allocations, and the process's resident set
    # (VmHWM) reflects allocator reuse, not the model: earlier runs leave memory the next forward
    # reuses, so its growth reads as ~0. No number is better than a meaningless one.
    fn()
    return None, "n/a on cpu" if device == "cpu" else f"n/a for {backend}"


# ----------------------------------------------------------------------------------------------
# backends: runners come from tmerge.runtime; timing calls their prepared zero-argument forwards


def set_torch_threads(threads: int | None) -> int:
    if threads is not None:
        if threads < 1:
            raise TmergeError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# ----------------------------------------------------------------------------------------------
# one (backend, device, batch size) measurement


def measure_pair(merged: Callable[[], Any], unmerged: Callable[[], Any], batch_size: int, *, device: str,
                 backend: str = "torch", warmup: int, iters: int, memory: bool = True,
                 progress: Callable[[int], None] | None = None) -> dict:
    """Interleaved timing of a merged/unmerged pair of prepared forwards (:meth:`Runner.prepare`);
    the ``latency`` entry of a report (without the backend/device/batch fields the caller adds)."""
    mem: dict[str, float | None] = {"merged": None, "unmerged": None}
    method = "skipped"
    if memory:  # before warm-up: the first forward at this shape is the one that allocates
        for name, run in (("unmerged", unmerged), ("merged", merged)):
            mem[name], method = peak_memory_mb(run, device, backend)
    times = time_interleaved({"merged": merged, "unmerged": unmerged}, warmup=warmup, iters=iters,
                             progress=progress)
    stats = {name: summarize(t, batch_size) for name, t in times.items()}
    for name in stats:
        stats[name]["peak_mem_mb"] = mem[name]
    m, u = stats["merged"], stats["unmerged"]
    return {
        "merged": m,
        "unmerged": u,
        "ratio_p50": m["p50_ms"] / u["p50_ms"],
        "ratio_p50_ci": ratio_interval(times["merged"], times["unmerged"]),
        "ci_level": CI_LEVEL,
        "ratio_mean": m["mean_ms"] / u["mean_ms"],
        "speedup_p50": u["p50_ms"] / m["p50_ms"],
        "memory_method": method,
        "warmup": warmup,
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
