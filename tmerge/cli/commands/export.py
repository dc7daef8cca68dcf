"""`tmerge export`: merged model -> verified ONNX (portable or plugin nodes) or TensorRT engine."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ...config import MergeConfig
from ...export import export
from ...models.spec import ModelSpec
from ..app import app, print_json
from ..options import JsonOpt, MergeFormOpt, merge_options, model_options
from ..render import render_export

OutOpt = Annotated[Optional[str], typer.Option("--out", "-O", help="output file: .onnx, .xml with --format openvino (+ .bin), or .engine/.plan with --format trt")]
GraphOpt = Annotated[Optional[str], typer.Option("--graph", help="portable: standard ONNX ops only; plugin: one tmerge:: node per merge (+ local function). Default: portable for onnx, plugin for trt")]
OldGraphOpt = Annotated[Optional[str], typer.Option("--ops", hidden=True, help="old name of --graph")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="batch size of the parity check (and of a --static-batch graph; TensorRT: opt batch)")]
DynamicBatchOpt = Annotated[bool, typer.Option("--dynamic-batch/--static-batch", help="dynamic batch dimension (default; always on for --format trt), or fixed at --batch-size")]
MaxBatchOpt = Annotated[Optional[int], typer.Option("--max-batch", help="--format trt: largest batch of the optimisation profile (default 4x --batch)")]
OpsetOpt = Annotated[int, typer.Option("--opset", help="ONNX opset (>= 18)")]
FormatOpt = Annotated[str, typer.Option("--format", help="onnx, openvino (IR .xml + .bin, converted from the verified ONNX) or trt (TensorRT engine built from the plugin graph)")]
Fp16Opt = Annotated[bool, typer.Option("--fp16", help="--format trt: build an fp16 engine")]


@app.command("export")
@merge_options()
@model_options()
def export_command(
    model: ModelSpec,
    merge: MergeConfig,
    out: OutOpt = None,
    graph: GraphOpt = None,
    ops: OldGraphOpt = None,
    batch: BatchOpt = 2,
    dynamic_batch: DynamicBatchOpt = True,
    max_batch: MaxBatchOpt = None,
    opset: OpsetOpt = 18,
    fmt: FormatOpt = "onnx",
    fp16: Fp16Opt = False,
    merge_form: MergeFormOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a merged model, verify it against PyTorch, write it with a manifest (<out>.json)."""
    result = export(merge, model=model, out=out, graph=graph or ops, batch=batch, dynamic_batch=dynamic_batch,
                    max_batch=max_batch, opset=opset, format=fmt, fp16=fp16, merge_form=merge_form)
    if as_json:
        print_json({"path": str(result.path), "manifest_path": str(result.manifest_path), **result.manifest})
        return
    render_export(result)
