"""The profile report: a versioned JSON schema, validation and atomic save (the CLI renders it).

Schema version 1 (documented in the README, "Profile report schema"). Top-level keys:

    schema_version  1
    kind            "tmerge.profile"
    created         ISO 8601 UTC time
    model           model name as given (str), model_info: {label, checkpoint, weights_sha256,
                    input_size, num_prefix_tokens, num_classes, head}
    method          merging method name; method_options, adapter_used (learned methods: the adapter that ran
                    {path, sha256, shipped, ...} or "untrained"), prop_attn, merge_form, schedule_spec
    schedule        per-block r (list of int)
    tokens_per_layer  tokens entering each block, then the final count (len = depth + 1)
    params          {merged, unmerged}
    flops           {merged, unmerged, ratio, per_image: true, convention, per_layer: [{layer,
                    tokens_in, r, tokens_out, merged, unmerged}]}
    latency         list of {backend, device, batch_size, threads, compile, warmup, iters,
                    merged: {p50_ms, p90_ms, p99_ms, mean_ms, std_ms, min_ms, max_ms,
                    throughput_ips, iters, peak_mem_mb}, unmerged: {...}, ratio_p50, ratio_mean,
                    speedup_p50, memory_method, artifacts}
    drift           {source, n, seed, outputs: "logits"|"features", agreement_top1, kl_mean,
                    cosine_mean, cosine_min, cosine_distance_mean, max_abs_diff, knn_agreement,
                    accuracy_top1_reference, accuracy_top1_merged, accuracy_top1_delta} (metrics that
                    do not apply are null) or null when drift was skipped
    env             {versions: {tmerge, torch, timm, onnxruntime, onnx, python}, platform, cpu,
                    cpu_count, gpu, threads: {torch, onnxruntime}}

Readers must ignore unknown keys; a new required key or a changed meaning bumps schema_version.
"""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._io import existing_file, write_files
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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_report(data: Any, where: str = "report") -> dict:
    """Check ``data`` against schema version 1; a TmergeError naming the first problem."""
    def bad(msg: str):
        raise TmergeError(f"{where} is not a valid tmerge profile report: {msg}")

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
        if not _number(data["flops"].get(key)) or not data["flops"][key] > 0:
            bad(f"flops.{key} is missing or not a positive number")
    seen = set()
    for i, entry in enumerate(data["latency"]):
        if not isinstance(entry, dict):
            bad(f"latency[{i}] is not an object")
        for key in _REQUIRED_LATENCY:
            if key not in entry:
                bad(f"latency[{i}] has no {key!r}")
        if not _number(entry["ratio_p50"]) or not entry["ratio_p50"] > 0:
            bad(f"latency[{i}].ratio_p50 is not a positive number")
        for side in ("merged", "unmerged"):
            if not isinstance(entry[side], dict) or not all(_number(entry[side].get(k)) for k in _REQUIRED_STATS):
                bad(f"latency[{i}].{side} lacks {', '.join(_REQUIRED_STATS)}")
            if not all(entry[side][k] > 0 for k in _REQUIRED_STATS):
                bad(f"latency[{i}].{side} has a time that is not positive")
        key = (entry["backend"], entry["device"], entry["batch_size"])
        if key in seen:
            bad(f"latency[{i}] repeats {entry['backend']}/{entry['device']}/batch {entry['batch_size']}")
        seen.add(key)
    if data["drift"] is not None:
        for key in _DRIFT_KEYS:
            if key not in data["drift"]:
                bad(f"drift has no {key!r}")
            value = data["drift"][key]
            if value is not None and not _number(value):
                bad(f"drift.{key} is not a number or null")
    return data


def load_report(path: str | Path) -> dict:
    """Read and validate a report; unreadable, corrupt or incomplete files are a TmergeError."""
    path = existing_file(path, "report")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TmergeError(f"cannot read {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TmergeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    return validate_report(data, str(path))


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, allow_nan=False, default=str) + "\n"


def save_report(report: dict, path: str | Path) -> Path:
    """Validate, then write atomically (temp file in the same folder + rename)."""
    validate_report(report, "the report to write")
    path = Path(path)
    write_files({path: dumps(report).encode()})
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
