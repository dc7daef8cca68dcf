"""`tmerge export`: merged model -> verified ONNX (portable or plugin nodes) or TensorRT engine."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ...errors import TmergeError
from ...export import export
from ..app import app, print_json
from ..options import (AdapterOpt, CheckpointOpt, InflectionOpt, JsonOpt, KeepRatioOpt, MethodOpt,
                       MethodOptionsOpt, ModelKwargsOpt, ModelOpt, PretrainedOpt, PropAttnOpt, ROpt, ScheduleOpt,
                       merge_config, parse_model_kwargs)

OutOpt = Annotated[Optional[str], typer.Option("--out", help="output file: .onnx, or .engine/.plan with --format trt")]
GraphOpt = Annotated[Optional[str], typer.Option("--graph", help="portable: standard ONNX ops only; plugin: one tmerge:: node per merge (+ local function). Default: portable for onnx, plugin for trt")]
OldGraphOpt = Annotated[Optional[str], typer.Option("--ops", hidden=True, help="old name of --graph")]
BatchOpt = Annotated[int, typer.Option("--batch", help="batch size of the export and of the parity check (TensorRT: opt batch)")]
DynamicBatchOpt = Annotated[bool, typer.Option("--dynamic-batch", help="make the batch dimension dynamic (always on for --format trt)")]
MaxBatchOpt = Annotated[Optional[int], typer.Option("--max-batch", help="--format trt: largest batch of the optimisation profile (default 4x --batch)")]
OpsetOpt = Annotated[int, typer.Option("--opset", help="ONNX opset (>= 18)")]
FormatOpt = Annotated[str, typer.Option("--format", help="onnx or trt (TensorRT engine built from the plugin graph)")]
MergeFormOpt = Annotated[Optional[str], typer.Option("--merge-form", help="scatter_nd (ScatterND, default for onnx: fastest on ONNX Runtime), scatter (ScatterElements, default for trt) or onehot (one-hot matmul)")]
Fp16Opt = Annotated[bool, typer.Option("--fp16", help="--format trt: build an fp16 engine")]


@app.command("export")
def export_command(
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
    out: OutOpt = None,
    graph: GraphOpt = None,
    ops: OldGraphOpt = None,
    batch: BatchOpt = 2,
    dynamic_batch: DynamicBatchOpt = False,
    max_batch: MaxBatchOpt = None,
    opset: OpsetOpt = 18,
    fmt: FormatOpt = "onnx",
    fp16: Fp16Opt = False,
    merge_form: MergeFormOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a merged model, verify it against PyTorch, write it with a manifest (<out>.json)."""
    if out is None:
        raise TmergeError("--out is required")
    merge = merge_config(method, r, inflection, schedule, keep_ratio, prop_attn, option, adapter, merge_form)
    result = export(model_name=model, checkpoint=checkpoint, pretrained=pretrained, merge=merge, out=out,
                    graph=graph or ops, batch=batch, dynamic_batch=dynamic_batch, max_batch=max_batch, opset=opset,
                    format=fmt, fp16=fp16, model_kwargs=parse_model_kwargs(model_kwargs))
    if as_json:
        print_json({"path": str(result.path), "manifest_path": str(result.manifest_path), **result.manifest})
        return
    _render(result)


def _render(result) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result.manifest
    parity = m.get("onnx_parity", m["parity"]) if m["format"] == "trt" else m["parity"]
    table = Table(title=f"tmerge export · {m['model']}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("file", str(result.path))
    table.add_row("manifest", str(result.manifest_path))
    table.add_row("format", f"{m['format']} · graph {m['graph']} · opset {m['opset']} · "
                            f"batch {'dynamic' if m['dynamic_batch'] else m['export_batch']}")
    table.add_row("method", f"{m['method']} {m.get('options') or ''} · schedule {m.get('schedule') or '-'} · "
                            f"prop. attn {'on' if m.get('prop_attn') else 'off'}")
    if m.get("tokens"):
        table.add_row("tokens", " → ".join(str(t) for t in m["tokens"]))
    if m.get("capped"):
        table.add_row("capped", ", ".join(f"block {c['layer']}: {c['asked']}→{c['applied']}" for c in m["capped"]))
    f = m["flops"]
    table.add_row("GFLOPs/img", f"{f['merged_per_image'] / 1e9:.3f} merged vs {f['unmerged_per_image'] / 1e9:.3f} "
                                f"unmerged (ratio {f['ratio']:.3f})")
    if parity.get("verified"):
        ties = len(parity.get("near_ties", []))
        table.add_row("ONNX parity", f"max abs diff {parity['max_abs_diff']:.2e} ≤ {parity['atol']:g} "
                                     f"({', '.join(p.replace('ExecutionProvider', '') for p in parity['providers'])}; "
                                     f"batches {parity['batches']}; near-ties {ties})")
    else:
        table.add_row("ONNX parity", "not verified")
    if m["format"] == "trt":
        checks = m["parity"]["checks"]
        table.add_row("TensorRT parity", "; ".join(
            f"batch {c['batch']}: diff {c['max_abs_diff']:.2e}, cos {c['cosine_min']:.5f}" for c in checks))
    if m.get("plugin_nodes"):
        ops = sorted({n["op_type"] for n in m["plugin_nodes"]})
        table.add_row("plugin nodes", f"{len(m['plugin_nodes'])} × tmerge::{'/'.join(ops)} "
                                      f"(plugin_namespace=tmerge, plugin_version=1)")
    table.add_row("export time", f"{parity.get('export_seconds', '?')} s")
    Console().print(table)
