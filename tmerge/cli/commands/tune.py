"""`tmerge tune`: search methods x schedules for the fastest model within a drift budget (or the most
faithful one within a latency budget) on the target runtime; Pareto table, JSON, PNG, export command."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..._io import json_bytes, writable_file, write_files
from ...config import MergeConfig
from ...errors import TmergeError, VerificationError
from ...export import export
from ...export.input_checks import ENGINE_SUFFIXES, check_out_path
from ...merging import registry
from ...models.merged import apply
from ...models.spec import ModelSpec
from ...profiling.tune import TuneConfig, adapter_candidate, parse_duration, plot_tune, tune
from ..app import app, print_json
from ..options import DataOpt, JsonOpt, NumImagesOpt, ThreadsOpt, model_options
from ..render import RichProgress, calibration_drift, render_tune


def _check_out_dir(path: Path) -> Path:
    """Fail before any work when the output folder cannot be created or written."""
    path = path.expanduser()
    if path.exists() and not path.is_dir():
        raise TmergeError(f"--out-dir {path} exists and is not a folder")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise TmergeError(f"cannot write into --out-dir {path}: {existing} is not a writable folder")
    return path


@app.command("tune")
@model_options()
def tune_command(
    *,
    max_drift: Annotated[Optional[float], typer.Option("--max-drift", help="drift budget (in --drift-metric units): find the fastest model within it")] = None,
    latency_ms: Annotated[Optional[float], typer.Option("--latency-ms", help="latency budget (p50 ms at --batch): find the least drift within it")] = None,
    runtime: Annotated[str, typer.Option("--runtime", help="onnxruntime, openvino, torch or tensorrt")] = "onnxruntime",
    batch: Annotated[int, typer.Option("--batch", help="batch size the latency is measured at")] = 8,
    model: ModelSpec,
    methods: Annotated[str, typer.Option("--methods", help="comma list of training-free methods to search (learned ones: --adapter)")] = "tome,pitome",
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", help="trained DTEM/LTM adapter to include (its schedule); repeatable")] = None,
    prop_attn: Annotated[str, typer.Option("--prop-attn-search", help="proportional attention: both, on, off or default (the method's)")] = "both",
    data: DataOpt = "samples",
    num_images: NumImagesOpt = None,
    drift_metric: Annotated[str, typer.Option("--drift-metric", help="cosine_distance_mean, kl_mean, disagreement_top1, knn_disagreement")] = "cosine_distance_mean",
    time_budget: Annotated[str, typer.Option("--time-budget", help="stop the search within this time, e.g. 15m, 900s")] = "15m",
    max_timed: Annotated[int, typer.Option("--max-timed", help="candidates timed in the first halving rung")] = 8,
    threads: ThreadsOpt = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda for tensorrt, else cpu)")] = None,
    seed: Annotated[int, typer.Option("--seed", help="seeds the data split, image choice and random-init weights")] = 0,
    out_dir: Annotated[Path, typer.Option("--out-dir", "-O", help="folder for tune.json and pareto.png")] = Path("tune"),
    export_to: Annotated[Optional[str], typer.Option("--export", help="export the chosen model here, verified, with its manifest")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Find the fastest merged model within a drift budget (or the least drift within a latency budget),
    timed on the target runtime."""
    device = device or ("cuda" if runtime == "tensorrt" else "cpu")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    for m in method_list:
        registry.get(m)
    config = TuneConfig(runtime=runtime, batch=batch, max_drift=max_drift, latency_ms=latency_ms,
                        drift_metric=drift_metric, methods=tuple(method_list), adapters=tuple(adapter or ()),
                        prop_attn=prop_attn, data=data, num_images=num_images,
                        time_budget_s=parse_duration(time_budget), seed=seed, threads=threads, device=device,
                        max_timed=max_timed, reserve_exports=1 if export_to else 0)
    config.validate()
    out_dir = _check_out_dir(out_dir)
    if out_dir.is_dir():
        for name in ("tune.json", "pareto.png"):
            writable_file(out_dir / name, "--out-dir")
    export_path = _check_export_path(export_to, runtime) if export_to else None
    unmerged = model.load(seed=seed)
    for path in config.adapters:  # an adapter for other weights or another model is bad input: fail now
        apply(copy.deepcopy(unmerged), adapter_candidate(path).merge)
    with RichProgress(enabled=True) as progress:
        result = tune(unmerged, config, model_name=model.display_name, progress=progress,
                      reference_model_flags=model.as_flags())
    if result["met"]:  # a failed search (exit 1) writes nothing
        if export_path is not None:
            result["export"] = _export_choice(result, config, export_path, model)
        result["png"], result["json"] = str(out_dir / "pareto.png"), str(out_dir / "tune.json")
        png = plot_tune(result)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_files({out_dir / "tune.json": json_bytes(result), out_dir / "pareto.png": png})
    if as_json:
        print_json(result)
    else:
        render_tune(result)
    if not result["met"]:
        c = result["chosen"]
        drift, p50 = calibration_drift(c), c.get("p50_ms")
        raise VerificationError(f"no candidate meets the budget; closest: {c['label']} (drift "
                                f"{'–' if drift is None else format(drift, '.4g')}, latency p50 "
                                f"{'–' if p50 is None else format(p50, '.1f')} ms)")


def _check_export_path(path: str, runtime: str) -> Path:
    if runtime == "tensorrt":
        engine = check_out_path(path, ENGINE_SUFFIXES, what="--export")
        check_out_path(engine.with_suffix(".onnx"), what="--export")
        return engine
    return check_out_path(path, what="--export")


def _export_choice(result, config, path: Path, model: ModelSpec) -> dict:
    """What the printed `tmerge export` command does: the chosen configuration, exported and verified."""
    merge = MergeConfig.from_manifest(result["chosen"])
    exported = export(merge, model=model, out=path, batch=config.batch, dynamic_batch=True,
                      format="trt" if config.runtime == "tensorrt" else "onnx")
    return {"path": str(exported.path), "manifest": str(exported.manifest_path),
            "parity_max_abs_diff": exported.parity.get("max_abs_diff")}
