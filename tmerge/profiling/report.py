"""The profile report: a versioned JSON schema, validation and atomic save (the CLI renders it).

Schema version 1 (documented in docs/report-schema.md). Top-level keys:

    schema_version  1
    kind            "tmerge.profile"
    created         ISO 8601 UTC time
    model           model name as given (str), model_info: {label, checkpoint, weights_sha256,
                    input_size, num_prefix_tokens, num_classes, head}
    method          merging method name; method_options, adapter (learned methods: the adapter that ran
                    {path, sha256, shipped, ...} or "untrained"; older reports name it adapter_used),
                    prop_attn, merge_form (the ops exported graphs merge with), schedule_spec
    schedule        per-block r (list of int)
    tokens_per_layer  tokens entering each block, then the final count (len = depth + 1)
    params          {merged, unmerged}
    flops           {merged, unmerged, ratio, per_image: true, convention, per_layer: [{layer,
                    tokens_in, r, tokens_out, merged, unmerged}]}
    latency         list of {backend, device, batch_size, threads, compile, warmup, iters,
                    merged: {p50_ms, p90_ms, p99_ms, mean_ms, std_ms, min_ms, max_ms,
                    throughput_ips, iters, peak_mem_mb}, unmerged: {...}, ratio_p50,
                    ratio_p50_ci: [low, high] (bootstrap over the interleaved rounds; null with one
                    round), ci_level, ratio_mean, speedup_p50, memory_method, artifacts}
    drift           {source, n, seed, outputs: "logits"|"features", agreement_top1, kl_mean,
                    cosine_mean, cosine_min, cosine_distance_mean, max_abs_diff, knn_agreement,
                    accuracy_top1_reference, accuracy_top1_merged, accuracy_top1_delta} (metrics that
                    do not apply are null) or null when drift was skipped
    warnings        lines printed as "warning: ..." (e.g. a ratio interval too wide to call)
    env             {versions: {tmerge, torch, timm, onnxruntime, onnx, python}, platform, cpu,
                    cpu_count, gpu, threads: {torch, onnxruntime}}

Every number is validated on write and on read: finite, times and ratios positive, probabilities
in [0, 1], distances >= 0, cosines in [-1, 1]. Readers must ignore unknown keys; a new required key or a changed meaning bumps schema_version.
"""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._io import existing_file, json_bytes, write_files
from ..config import upgrade_adapter_keys
from ..errors import TmergeError
from .latency import cpu_name, usable_cpus

SCHEMA_VERSION = 1
KIND = "tmerge.profile"

# key -> accepted types; None in the tuple means the value may be null
_REQUIRED_TOP: dict[str, tuple] = {
    "schema_version": (int,),
    "model": (str,),
    "method": (str,),
    "schedule": (list,),
    "tokens_per_layer": (list,),
    "flops": (dict,),
    "latency": (list,),
    "drift": (dict, type(None)),
    "env": (dict,),
}
_REQUIRED_FLOPS = ("merged", "unmerged", "ratio")
_REQUIRED_LATENCY = ("backend", "device", "batch_size", "merged", "unmerged", "ratio_p50")
_REQUIRED_STATS = ("p50_ms", "mean_ms")
_DRIFT_KEYS = ("agreement_top1", "kl_mean", "cosine_mean")

# the range of every number a report carries: (low, high), both inclusive; "positive" is (> 0)
POSITIVE = "positive"
_PROBABILITY = (0.0, 1.0)
_NON_NEGATIVE = (0.0, math.inf)
_COSINE = (-1.0, 1.0)
STAT_RANGES = {"p50_ms": POSITIVE, "p90_ms": POSITIVE, "p99_ms": POSITIVE, "mean_ms": POSITIVE,
               "std_ms": _NON_NEGATIVE, "min_ms": POSITIVE, "max_ms": POSITIVE, "throughput_ips": POSITIVE,
               "peak_mem_mb": _NON_NEGATIVE}
LATENCY_RANGES = {"ratio_p50": POSITIVE, "ratio_mean": POSITIVE, "speedup_p50": POSITIVE}
DRIFT_RANGES = {"agreement_top1": _PROBABILITY, "knn_agreement": _PROBABILITY,
                "accuracy_top1_reference": _PROBABILITY, "accuracy_top1_merged": _PROBABILITY,
                "accuracy_top1_delta": (-1.0, 1.0), "kl_mean": _NON_NEGATIVE,
                "cosine_distance_mean": (0.0, 2.0), "max_abs_diff": _NON_NEGATIVE, "cosine_mean": _COSINE,
                "cosine_min": _COSINE, "feature_cosine_mean": _COSINE}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _range_problem(value: Any, allowed) -> str | None:
    """Why ``value`` (not null) is outside ``allowed``, or None when it is inside."""
    if not _number(value):
        return f"is {value!r}, not a finite number"
    if allowed == POSITIVE:
        return None if value > 0 else f"is {value!r}, not positive"
    low, high = allowed
    if low <= value <= high:
        return None
    return f"is {value!r}, outside [{low:g}, {high:g}]"


def validate_report(data: Any, where: str = "report") -> dict:
    """Check ``data`` against schema version 1, every number included (finite and in its range);
    a TmergeError naming the first problem."""
    def bad(msg: str):
        raise TmergeError(f"{where} is not a valid tmerge profile report: {msg}")

    def check_range(name: str, value: Any, allowed, nullable: bool = True) -> None:
        if value is None and nullable:
            return
        problem = _range_problem(value, allowed)
        if problem:
            bad(f"{name} {problem}")

    if not isinstance(data, dict):
        bad(f"expected a JSON object, got {type(data).__name__}")
    if "schema_version" not in data:
        bad("no schema_version")
    if data["schema_version"] != SCHEMA_VERSION:
        bad(f"schema_version {data['schema_version']!r} is not supported (this tmerge reads {SCHEMA_VERSION})")
    if data.get("kind") != KIND:
        bad(f"kind is {data.get('kind')!r}, not {KIND!r}")
    for key, types in _REQUIRED_TOP.items():
        if key not in data:
            bad(f"missing key {key!r}")
        if not isinstance(data[key], types):
            bad(f"{key!r} has type {type(data[key]).__name__}")
    if not all(isinstance(r, int) and r >= 0 for r in data["schedule"]):
        bad("'schedule' must be a list of non-negative integers (per-block r)")
    if not all(isinstance(t, int) and t > 0 for t in data["tokens_per_layer"]):
        bad("'tokens_per_layer' must be a list of positive integers")
    for key in _REQUIRED_FLOPS:
        check_range(f"flops.{key}", data["flops"].get(key), POSITIVE, nullable=False)
    seen = set()
    for i, entry in enumerate(data["latency"]):
        if not isinstance(entry, dict):
            bad(f"latency[{i}] is not an object")
        for key in _REQUIRED_LATENCY:
            if key not in entry:
                bad(f"latency[{i}] has no {key!r}")
        for key, allowed in LATENCY_RANGES.items():
            check_range(f"latency[{i}].{key}", entry.get(key), allowed, nullable=key != "ratio_p50")
        for side in ("merged", "unmerged"):
            if not isinstance(entry[side], dict) or not all(_number(entry[side].get(k)) for k in _REQUIRED_STATS):
                bad(f"latency[{i}].{side} lacks {', '.join(_REQUIRED_STATS)}")
            for key, allowed in STAT_RANGES.items():
                check_range(f"latency[{i}].{side}.{key}", entry[side].get(key), allowed)
        interval = entry.get("ratio_p50_ci")
        if interval is not None:
            if not (isinstance(interval, list) and len(interval) == 2 and all(_number(v) and v > 0 for v in interval)
                    and interval[0] <= interval[1]):
                bad(f"latency[{i}].ratio_p50_ci is {interval!r}, not [low, high] with 0 < low <= high")
        key = (entry["backend"], entry["device"], entry["batch_size"])
        if key in seen:
            bad(f"latency[{i}] repeats {entry['backend']}/{entry['device']}/batch {entry['batch_size']}")
        seen.add(key)
    drift = data["drift"]
    if drift is not None:
        for key in _DRIFT_KEYS:
            if key not in drift:
                bad(f"drift has no {key!r}")
        for key, allowed in DRIFT_RANGES.items():
            check_range(f"drift.{key}", drift.get(key), allowed)
        n = drift.get("n")
        if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            bad(f"drift.n is {n!r}, not a positive integer")
    return data


def load_report(path: str | Path, what: str = "report") -> dict:
    """Read and validate a report (``what``: how messages name it, e.g. "--baseline"); unreadable,
    corrupt or incomplete files are a TmergeError."""
    path = existing_file(path, what)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TmergeError(f"cannot read {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TmergeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(data, dict):
        data = upgrade_adapter_keys(data)  # reports written before "adapter_used" became "adapter"
    return validate_report(data, str(path))


def save_report(report: dict, path: str | Path) -> Path:
    """Validate, then write atomically (temp file in the same folder + rename)."""
    validate_report(report, "the report to write")
    path = Path(path)
    write_files({path: json_bytes(report)})
    return path


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages when the report is made: a busy machine explains noisy times."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def environment(torch_threads: int | None = None, ort_threads: int | None = None) -> dict:
    """Versions, CPU/GPU and threads, for the report's ``env``."""
    import importlib.metadata as md

    import torch

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
               "count": torch.cuda.device_count()}
    return {
        "versions": {
            "tmerge": version("tmerge"),
            "torch": torch.__version__,
            "timm": version("timm"),
            "onnx": version("onnx"),
            "onnxruntime": version("onnxruntime") or version("onnxruntime-gpu"),
            "openvino": version("openvino"),
            "tensorrt": version("tensorrt"),
            "python": platform.python_version(),
        },
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": usable_cpus(),
        "gpu": gpu,
        "loadavg": _loadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "threads": {"torch": torch_threads if torch_threads is not None else torch.get_num_threads(),
                    "onnxruntime": ort_threads},
    }
