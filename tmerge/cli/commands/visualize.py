"""`tmerge visualize`: draw which input patches each final token holds (ToMe-paper style)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..._io import writable_file
from ...errors import TmergeError
from ...models import DEFAULT_MODEL
from ...models.merged import build_merged_model
from ...profiling.visualize import visualize
from ..app import app, print_json
from ..options import (
    AdapterOpt,
    CheckpointOpt,
    InflectionOpt,
    JsonOpt,
    KeepRatioOpt,
    MethodOpt,
    MethodOptionsOpt,
    ModelKwargsOpt,
    ModelOpt,
    PretrainedOpt,
    PropAttnOpt,
    ROpt,
    ScheduleOpt,
    merge_config,
    parse_model_kwargs,
)


@app.command("visualize")
def visualize_command(
    image: Annotated[str, typer.Option("--image", help="image file, or a bundled sample name (astronaut, chelsea, ...)")],
    out: Annotated[Path, typer.Option("--out", "-O", help="PNG to write")] = Path("vis.png"),
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    checkpoint: CheckpointOpt = None,
    pretrained: PretrainedOpt = False,
    method: MethodOpt = "tome",
    r: ROpt = None,
    inflection: InflectionOpt = None,
    schedule: ScheduleOpt = None,
    keep_ratio: KeepRatioOpt = None,
    prop_attn: PropAttnOpt = None,
    option: MethodOptionsOpt = None,
    adapter: AdapterOpt = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="one panel per merging block")] = False,
    layers: Annotated[Optional[str], typer.Option("--layers", help="blocks to draw, e.g. 3,7,11 (default: last)")] = None,
    style: Annotated[str, typer.Option("--style", help="mean (group mean colour) or random (tint)")] = "mean",
    as_json: JsonOpt = False,
) -> None:
    """Track which input patches end up in each token and draw the groups over the image."""
    layer_list = None
    if style not in ("mean", "random"):
        raise TmergeError(f"--style must be mean or random, got {style!r}")
    if layers is not None:
        try:
            layer_list = [int(v) for v in layers.split(",")]
        except ValueError:
            raise TmergeError(f"--layers takes a comma list of block indices, got {layers!r}") from None
    writable_file(out, "--out", (".png",))
    merge = merge_config(method, r, inflection, schedule, keep_ratio, prop_attn, option, adapter)
    merged = build_merged_model(model, merge, checkpoint=checkpoint, pretrained=pretrained,
                                model_kwargs=parse_model_kwargs(model_kwargs))
    summary = visualize(merged, image, out, per_layer=per_layer, layers=layer_list, style=style,
                        title=f"{model or DEFAULT_MODEL} · {method} · {Path(image).name}")
    if as_json:
        print_json(summary)
    else:
        sys.stdout.write(f"wrote {summary['out']}: blocks {summary['layers']} -> "
                         f"{summary['groups']} groups of {summary['num_patches']} patches\n")
