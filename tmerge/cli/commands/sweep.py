"""`tmerge sweep`: methods x schedules, one report per point, a summary table and a Pareto PNG."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..._io import writable_file, writable_folder
from ...models import weights_sha256
from ...models.spec import ModelSpec
from ...profiling.profile import ProfileConfig
from ...profiling.sweep import check_drift_metric, grid, point_label, run_sweep
from ..app import app, print_json
from ..options import (
    BackendsOpt,
    BatchSizesOpt,
    DataOpt,
    DeviceOpt,
    ItersOpt,
    JsonOpt,
    MergeFormOpt,
    NoDriftOpt,
    NumImagesOpt,
    ThreadsOpt,
    WarmupOpt,
    model_options,
    parse_backends,
    parse_float_list,
    parse_int_list,
)
from ..render import render_sweep, wide_console


@app.command("sweep")
@model_options()
def sweep_command(
    model: ModelSpec,
    methods: Annotated[str, typer.Option("--methods", help="comma list of methods, e.g. tome,pitome (none: the unmerged point)")] = "tome,pitome",
    r: Annotated[Optional[str], typer.Option("--r", "-r", help="comma list of constant r values (default 4,8,12,16 unless --keep-ratios is given)")] = None,
    keep_ratios: Annotated[Optional[str], typer.Option("--keep-ratios", help="comma list of keep ratios, e.g. 0.95,0.9")] = None,
    out_dir: Annotated[Path, typer.Option("--out-dir", "-O", help="folder for reports, sweep.json and pareto.png")] = Path("sweep"),
    backends: BackendsOpt = "torch",
    device: DeviceOpt = "cpu",
    batch_sizes: BatchSizesOpt = "8",
    warmup: WarmupOpt = 5,
    iters: ItersOpt = 20,
    threads: ThreadsOpt = None,
    merge_form: MergeFormOpt = None,
    data: DataOpt = "samples",
    num_images: NumImagesOpt = None,
    no_drift: NoDriftOpt = False,
    drift_metric: Annotated[str, typer.Option("--drift-metric", help="cosine_distance_mean, kl_mean, disagreement_top1, knn_disagreement")] = "cosine_distance_mean",
    as_json: JsonOpt = False,
) -> None:
    """Profile a grid of methods x schedules and plot drift against FLOPs and latency ratios."""
    method_list = [m.strip() for m in methods.split(",")]
    keep_list = parse_float_list(keep_ratios, "--keep-ratios") if keep_ratios is not None else []
    r_list = parse_int_list(r, "--r") if r is not None else ([] if keep_list else [4, 8, 12, 16])
    points = grid(method_list, r_list, keep_list)
    check_drift_metric(drift_metric)
    writable_folder(out_dir, "--out-dir")
    if out_dir.is_dir():
        for name in ("sweep.json", "pareto.png"):
            writable_file(out_dir / name, "--out-dir")
    config = ProfileConfig(backends=parse_backends(backends), device=device,
                           batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"), warmup=warmup, iters=iters,
                           threads=threads, data=None if no_drift else data, num_images=num_images,
                           merge_form=merge_form)
    unmerged = model.load()
    info = {"label": model.label, "checkpoint": model.checkpoint, "model_kwargs": dict(model.kwargs) or None,
            "weights_sha256": weights_sha256(unmerged)}
    stderr = wide_console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr) as bar:
        task = bar.add_task("sweep", total=len(points))

        def on_point(i, point):
            bar.update(task, completed=i,
                       description=f"sweep: {point.method} {point_label(point)}" if point else "sweep: done")

        summary = run_sweep(unmerged, points, config, model_name=model.display_name, out_dir=out_dir,
                            model_info=info, drift_metric=drift_metric, on_point=on_point)
    if as_json:
        print_json(summary)
    else:
        render_sweep(summary)
    for warning in summary["warnings"]:
        sys.stderr.write(f"warning: {warning}\n")
