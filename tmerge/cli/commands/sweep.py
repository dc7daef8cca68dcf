"""`tmerge sweep`: methods x schedules, one report per point, a summary table and a Pareto PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ...errors import TmergeError
from ...models import DEFAULT_MODEL, model_label, weights_sha256
from ...models.merged import MergeConfig, build_pair
from ...profiling.profile import ProfileConfig
from ...profiling.sweep import check_drift_metric, grid, run_sweep
from ..app import app, print_json
from ..render import render_sweep, wide_console
from ..options import (BackendsOpt, BatchSizesOpt, CheckpointOpt, DataOpt, DeviceOpt, JsonOpt, ModelKwargsOpt,
                       ModelOpt, NoDriftOpt, NumImagesOpt, PretrainedOpt, ThreadsOpt, parse_backends, parse_int_list,
                       parse_model_kwargs)


def _floats(text: str | None, what: str) -> list[float]:
    if not text:
        return []
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TmergeError(f"{what} takes a comma list of numbers, got {text!r}") from None


@app.command("sweep")
def sweep_command(
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    checkpoint: CheckpointOpt = None,
    pretrained: PretrainedOpt = False,
    methods: Annotated[str, typer.Option("--methods", help="comma list of methods, e.g. tome,pitome")] = "tome,pitome",
    r: Annotated[Optional[str], typer.Option("--r", "-r", help="comma list of constant r values, e.g. 2,4,8,16")] = "4,8,12,16",
    keep_ratios: Annotated[Optional[str], typer.Option("--keep-ratios", help="comma list of keep ratios, e.g. 0.95,0.9")] = None,
    out_dir: Annotated[Path, typer.Option("--out-dir", "-O", help="folder for reports, sweep.json and pareto.png")] = Path("sweep"),
    backends: BackendsOpt = "torch",
    device: DeviceOpt = "cpu",
    batch_sizes: BatchSizesOpt = "8",
    warmup: Annotated[int, typer.Option("--warmup")] = 5,
    iters: Annotated[int, typer.Option("--iters")] = 20,
    threads: ThreadsOpt = None,
    data: DataOpt = "samples",
    num_images: NumImagesOpt = None,
    no_drift: NoDriftOpt = False,
    drift_metric: Annotated[str, typer.Option("--drift-metric", help="cosine_distance_mean, kl_mean, disagreement_top1, knn_disagreement")] = "cosine_distance_mean",
    as_json: JsonOpt = False,
) -> None:
    """Profile a grid of methods x schedules and plot drift against FLOPs and latency ratios."""
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    points = grid(method_list, parse_int_list(r, "--r") if r else [], _floats(keep_ratios, "--keep-ratios"))
    check_drift_metric(drift_metric)
    config = ProfileConfig(backends=parse_backends(backends), device=device,
                           batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"), warmup=warmup, iters=iters,
                           threads=threads, data=None if no_drift else data, num_images=num_images)
    kwargs = parse_model_kwargs(model_kwargs)
    _, unmerged = build_pair(model, MergeConfig(method="none"), checkpoint=checkpoint, pretrained=pretrained,
                             model_kwargs=kwargs)
    info = {"label": model_label(model, checkpoint), "checkpoint": checkpoint, "model_kwargs": kwargs or None,
            "weights_sha256": weights_sha256(unmerged)}
    stderr = wide_console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr) as bar:
        task = bar.add_task("sweep", total=len(points))

        def on_point(i, point):
            bar.update(task, completed=i, description=f"sweep: {point.method} {point.label}" if point else "sweep: done")

        summary = run_sweep(unmerged, points, config, model_name=model or DEFAULT_MODEL, out_dir=out_dir,
                            model_info=info, drift_metric=drift_metric, on_point=on_point)
    if as_json:
        print_json(summary)
    else:
        render_sweep(summary)
