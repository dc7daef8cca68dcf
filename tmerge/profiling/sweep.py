"""Sweep methods x schedules: one profile report per point, a summary, and a Pareto plot.

Every point is profiled against the same unmerged model on the same drift images; ONNX backends
export the unmerged model once. The plot has two panels, drift against the FLOPs ratio and against
the latency ratio (p50, first backend and batch size), one line per method, with the unmerged
model at (1, 0).
"""

from __future__ import annotations

import copy
import io
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

from torch import nn

from .._io import json_bytes, write_files
from .._optional import pyplot
from ..config import SHIPPED_IF_ANY, MergeConfig
from ..data import load_images
from ..errors import TmergeError
from ..merging import registry
from ..models.merged import apply
from ..schedule import ScheduleSpec
from .profile import ProfileConfig, Progress, export_for_runtime, profile_pair
from .report import validate_report

DRIFT_METRICS = ("cosine_distance_mean", "kl_mean", "disagreement_top1", "knn_disagreement")


def point_label(point: MergeConfig) -> str:
    """How the sweep names a point: "unmerged", "r=8", "keep=0.9", "r=8,inflection=0.5", "schedule=8,4"."""
    spec = point.schedule
    if point.method == "none" or spec is None:
        return "unmerged"
    if spec.keep_ratio is not None:
        return f"keep={spec.keep_ratio:g}"
    if spec.per_layer is not None:
        return "schedule=" + ",".join(str(v) for v in spec.per_layer)
    return f"r={spec.r}" + (f",inflection={spec.inflection:g}" if spec.inflection is not None else "")


def point_slug(point: MergeConfig) -> str:
    """The point's report file name (without .json)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{point.method}_{point_label(point).replace('=', '')}")


def grid(methods: list[str], rs: list[int] | None, keep_ratios: list[float] | None) -> list[MergeConfig]:
    """Every method at every r and keep ratio (``none``: one unmerged point); all checked here.
    Learned methods load the adapter shipped for the model where there is one (as the CLI does)."""
    if not methods:
        raise TmergeError("--methods needs at least one method")
    unknown = [m for m in methods if m != "none" and m not in registry.available()]
    if unknown or not all(methods):
        raise TmergeError(f"unknown method {', '.join(repr(m) for m in unknown) or 'name (empty)'}; available: "
                          f"none, {', '.join(registry.available())}")
    if not rs and not keep_ratios:
        raise TmergeError("give --r values and/or --keep-ratios to sweep")
    specs = [ScheduleSpec(r=r) for r in dict.fromkeys(rs or [])]
    specs += [ScheduleSpec(keep_ratio=k) for k in dict.fromkeys(keep_ratios or [])]
    merging = [m for m in dict.fromkeys(methods) if m != "none"]
    points = [MergeConfig("none")] if "none" in methods else []
    points += [MergeConfig(m, spec, adapter=SHIPPED_IF_ANY) for m in merging for spec in specs]
    return points


def check_drift_metric(drift_metric: str) -> str:
    if drift_metric not in DRIFT_METRICS:
        raise TmergeError(f"--drift-metric must be one of {', '.join(DRIFT_METRICS)}, got {drift_metric!r}")
    return drift_metric


def drift_value(drift: dict | None, metric: str) -> float | None:
    if not drift:
        return None
    if metric == "disagreement_top1":
        v = drift.get("agreement_top1")
        return None if v is None else 1 - v
    if metric == "knn_disagreement":
        v = drift.get("knn_agreement")
        return None if v is None else 1 - v
    return drift.get(metric)


def summary_row(point: MergeConfig, report: dict, drift_metric: str) -> dict:
    lat = report["latency"][0] if report["latency"] else None
    return {
        "method": point.method,
        "point": point_label(point),
        **_sweep_point(point),
        "schedule": report["schedule"],
        "final_tokens": report["tokens_per_layer"][-1],
        "flops_ratio": report["flops"]["ratio"],
        "latency_ratio_p50": lat["ratio_p50"] if lat else None,
        "latency_backend": f"{lat['backend']}/{lat['device']}/b{lat['batch_size']}" if lat else None,
        "drift_metric": drift_metric,
        "drift": drift_value(report["drift"], drift_metric),
        "agreement_top1": (report["drift"] or {}).get("agreement_top1"),
        "cosine_mean": (report["drift"] or {}).get("cosine_mean"),
    }


def _sweep_point(point: MergeConfig) -> dict:
    spec = point.schedule
    return {"r": spec and spec.r, "keep_ratio": spec and spec.keep_ratio}


def run_sweep(unmerged: nn.Module, points: list[MergeConfig], config: ProfileConfig, *, model_name: str,
              out_dir: str | Path, model_info: dict | None = None, drift_metric: str = "cosine_distance_mean",
              on_point: Callable[[int, MergeConfig | None], None] | None = None,
              progress: Progress | None = None) -> dict:
    """Profile every point (a merge configuration, e.g. from :func:`grid`); write
    ``points/<slug>.json``, ``sweep.json`` and ``pareto.png`` into ``out_dir``. Returns the sweep
    summary (also in sweep.json). ``config.merge_form`` applies to the merged points' exports.

    Every point is checked (its schedule on this model, its options) before any is measured, and
    the files are written only once all points are measured; point reports of earlier sweeps in
    ``points/`` are removed, so the folder holds exactly this sweep.
    """
    check_drift_metric(drift_metric)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TmergeError(f"--out-dir {out_dir} is a file, not a folder")
    scratch = copy.deepcopy(unmerged)
    for point in points:  # bad points fail here, before any work
        apply(scratch, point)
    del scratch
    progress = progress or Progress()
    unmerged.eval()
    images = None
    if config.data is not None:
        images = load_images(config.data, unmerged, n=config.num_images, seed=config.seed)
    config = replace(config)
    if config.needs_onnx and not config.onnx_unmerged:
        onnx_dir = Path(config.workdir) if config.workdir else out_dir / "onnx"
        onnx_dir.mkdir(parents=True, exist_ok=True)
        progress.log("exporting the unmerged model to ONNX")
        config.onnx_unmerged = export_for_runtime(unmerged, onnx_dir / "unmerged.onnx", model_name=model_name)["path"]
        config.workdir = str(onnx_dir)
    rows, reports = [], {}
    for i, point in enumerate(points):
        if on_point is not None:
            on_point(i, point)
        merged = apply(copy.deepcopy(unmerged), point).eval()
        slug = point_slug(point)
        point_config = replace(config, workdir=str(Path(config.workdir) / slug) if config.workdir else None,
                               merge_form=None if point.method == "none" else config.merge_form)
        report = profile_pair(merged, unmerged, point_config, model_name=model_name, model_info=model_info,
                              progress=progress, drift_images=images)
        report["sweep_point"] = {"method": point.method, **_sweep_point(point)}
        reports[slug] = report
        rows.append(summary_row(point, report, drift_metric))
        del merged
    if on_point is not None:
        on_point(len(points), None)
    points_dir = out_dir / "points"
    report_files = {points_dir / f"{slug}.json": json_bytes(validate_report(report, f"sweep point {slug}"))
                    for slug, report in reports.items()}
    files = [str(path) for path in report_files]
    summary = {
        "schema_version": 1,
        "kind": "tmerge.sweep",
        "model": model_name,
        "drift_metric": drift_metric,
        "config": {"backends": config.backends, "batch_sizes": config.batch_sizes, "device": config.device,
                   "warmup": config.warmup, "iters": config.iters, "threads": config.threads, "data": config.data},
        "points": rows,
        "reports": files,
        "warnings": [f"{slug}: {w}" for slug, report in reports.items() for w in report.get("warnings", [])],
    }
    png = pareto_png(rows, title=f"{model_name}: drift vs cost", drift_metric=drift_metric)
    summary["png"] = str(out_dir / "pareto.png")
    points_dir.mkdir(parents=True, exist_ok=True)
    # every report, the summary and the plot land together, or none of them
    write_files({**report_files, out_dir / "sweep.json": json_bytes(summary), out_dir / "pareto.png": png})
    for stale in points_dir.glob("*.json"):
        if stale.stem not in reports:
            stale.unlink()
    return summary


def plot_pareto(rows: list[dict], out: str | Path, *, title: str = "", drift_metric: str = "cosine_distance_mean") -> Path:
    """Write :func:`pareto_png` to ``out`` (atomically)."""
    out = Path(out)
    write_files({out: pareto_png(rows, title=title, drift_metric=drift_metric)})
    return out


def pareto_png(rows: list[dict], *, title: str = "", drift_metric: str = "cosine_distance_mean") -> bytes:
    """Two panels, drift vs FLOPs ratio and drift vs latency ratio, one line per method (PNG bytes)."""
    plt = pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    panels = (("flops_ratio", "FLOPs ratio (merged / unmerged)"),
              ("latency_ratio_p50", "latency ratio p50 (merged / unmerged)"))
    positive = [r["drift"] for r in rows if r["drift"] is not None and r["drift"] > 0]
    log_y = len(positive) == len([r for r in rows if r["drift"] is not None]) and len(positive) > 1
    for ax, (key, xlabel) in zip(axes, panels):
        for method in methods:
            # in schedule order (FLOPs ratio falls as r grows), so each line traces one method
            ordered = sorted((r for r in rows if r["method"] == method and r[key] is not None
                              and r["drift"] is not None), key=lambda r: -r["flops_ratio"])
            pts = [(r[key], r["drift"], r["point"]) for r in ordered]
            if not pts:
                continue
            xs, ys, labels = zip(*pts)
            (line,) = ax.plot(xs, ys, marker="o", label=method)
            for x, y, label in pts:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=line.get_color())
        if not log_y:
            ax.plot([1.0], [0.0], marker="*", color="black", markersize=10, linestyle="none", label="unmerged")
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"drift: {drift_metric}")
        if log_y:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    lat_label = next((r["latency_backend"] for r in rows if r.get("latency_backend")), None)
    if lat_label:
        axes[1].set_title(lat_label, fontsize=9)
    axes[0].set_title("FLOPs (FLOPs = 2·MACs)", fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    plt.close(fig)
    return png.getvalue()
