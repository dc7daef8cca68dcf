"""`tmerge schedule`: per-block r and token counts of a schedule on a concrete model."""

from __future__ import annotations

from ...config import MergeConfig
from ...models.merged import build_merged_model
from ...models.spec import ModelSpec
from ...patch import merge_info
from ..app import app, print_json
from ..options import JsonOpt, merge_options, model_options


@app.command("schedule")
@merge_options(adapter=False)
@model_options(pretrained=False)
def schedule_command(
    model: ModelSpec,
    merge: MergeConfig,
    as_json: JsonOpt = False,
) -> None:
    """Show how many tokens each block merges and keeps."""
    info = merge_info(build_merged_model(model, merge))
    info["model"] = model.display_name
    if as_json:
        print_json(info)
        return
    from rich.console import Console
    from rich.table import Table

    capped = {c["layer"]: c for c in info.get("capped", [])}
    table = Table(title=f"{info['model']} · {info['method']} · {info['schedule'] or 'no merging'}")
    for col in ("block", "tokens in", "r", "tokens out", "note"):
        table.add_column(col, justify="right")
    tokens = info["tokens"] or []
    for layer, r_l in enumerate(info["r"]):
        note = f"capped from {capped[layer]['asked']}" if layer in capped else ""
        n_in = tokens[layer] if tokens else ""
        n_out = tokens[layer + 1] if tokens else ""
        table.add_row(str(layer), str(n_in), str(r_l), str(n_out), note)
    Console().print(table)
    if info["method"] != "none":
        Console().print(f"proportional attention: {'on' if info['prop_attn'] else 'off'}")
