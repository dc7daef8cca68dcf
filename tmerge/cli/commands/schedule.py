"""`tmerge schedule`: per-block r and token counts of a schedule on a concrete model."""

from __future__ import annotations

from ...models import DEFAULT_MODEL
from ...models.merged import build_merged_model
from ...patch import merge_info
from ..app import app, print_json
from ..options import (
    CheckpointOpt,
    InflectionOpt,
    JsonOpt,
    KeepRatioOpt,
    MethodOpt,
    MethodOptionsOpt,
    ModelKwargsOpt,
    ModelOpt,
    PropAttnOpt,
    ROpt,
    ScheduleOpt,
    merge_config,
    parse_model_kwargs,
)


@app.command("schedule")
def schedule_command(
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    checkpoint: CheckpointOpt = None,
    method: MethodOpt = "tome",
    r: ROpt = None,
    inflection: InflectionOpt = None,
    schedule: ScheduleOpt = None,
    keep_ratio: KeepRatioOpt = None,
    prop_attn: PropAttnOpt = None,
    option: MethodOptionsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show how many tokens each block merges and keeps."""
    merge = merge_config(method, r, inflection, schedule, keep_ratio, prop_attn, option)
    info = merge_info(build_merged_model(model, merge, checkpoint=checkpoint,
                                         model_kwargs=parse_model_kwargs(model_kwargs)))
    info["model"] = model or DEFAULT_MODEL
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
