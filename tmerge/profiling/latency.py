"""Latency of a merged model against its unmerged self, timed in one process, interleaved.

Methodology (also in the README):

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
- Reported per model: p50/p90/p99 (linear interpolation), mean, std, min, max, and throughput =
  batch size / mean time. Ratios merged/unmerged of p50 and of mean; the CI gate uses ratios.
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

from .. import runtime
from ..errors import TmergeError

STAT_KEYS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms", "throughput_ips")


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
        "std_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "throughput_ips": float(batch_size / (mean / 1e3)) if mean > 0 else math.inf,
        "iters": int(len(ms)),
    }


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


def check_backend(backend: str, device: str) -> str:
    """The registered name of ``backend``; a one-line TmergeError when it or the device is not usable."""
    return runtime.check(backend, device).name


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
