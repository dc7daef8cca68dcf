"""`tmerge visualize`: draw which input patches each final token holds (ToMe-paper style)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..._io import writable_file
from ...config import MergeConfig
from ...errors import TmergeError
from ...models.merged import build_merged_model
from ...models.spec import ModelSpec
from ...profiling.visualize import visualize
from ..app import app, print_json
from ..options import JsonOpt, merge_options, model_options


@app.command("visualize")
@merge_options()
@model_options()
def visualize_command(
    image: Annotated[str, typer.Option("--image", help="image file, or a bundled sample name (astronaut, chelsea, ...)")],
    out: Annotated[Path, typer.Option("--out", "-O", help="PNG to write")] = Path("vis.png"),
    *,
    model: ModelSpec,
    merge: MergeConfig,
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
    merged = build_merged_model(model, merge)
    summary = visualize(merged, image, out, per_layer=per_layer, layers=layer_list, style=style,
                        title=f"{model.display_name} · {merge.method} · {Path(image).name}")
    if as_json:
        print_json(summary)
    else:
        sys.stdout.write(f"wrote {summary['out']}: blocks {summary['layers']} -> "
                         f"{summary['groups']} groups of {summary['num_patches']} patches\n")
