"""`tmerge profile`: FLOPs, latency (merged vs unmerged, interleaved), drift, memory -> report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..._io import check_distinct, existing_file, writable_file, writable_folder
from ...config import MergeConfig
from ...errors import TmergeError
from ...export.input_checks import merge_form_for
from ...export.manifest import manifest_path
from ...models import model_label, weights_sha256
from ...models.merged import build_pair
from ...models.spec import ModelSpec
from ...profiling.profile import ProfileConfig, pair_from_manifest, profile_pair
from ...profiling.report import save_report
from ...runtime import find_backend
from ..app import app, print_json
from ..options import (
    BackendsOpt,
    BatchSizesOpt,
    CompileOpt,
    CudaGraphsOpt,
    DataOpt,
    DeviceOpt,
    ItersOpt,
    JsonOpt,
    MergeFormOpt,
    NoDriftOpt,
    NumImagesOpt,
    PrecisionOpt,
    ThreadsOpt,
    WarmupOpt,
    merge_options,
    model_options,
    parse_backends,
    parse_int_list,
)
from ..render import RichProgress, render_report

OutOpt = Annotated[Optional[Path], typer.Option("--out", "-O", help="also write the JSON report to this file")]
OnnxOpt = Annotated[Optional[Path], typer.Option(
    "--onnx", help="time this exported merged model (its manifest <PATH>.json names the model and schedule)")]
KeepOnnxOpt = Annotated[Optional[Path], typer.Option("--onnx-dir", help="keep the exported ONNX files in this folder")]


@app.command("profile")
@merge_options()
@model_options()
def profile_command(
    model: ModelSpec,
    merge: MergeConfig,
    merge_form: MergeFormOpt = None,
    onnx: OnnxOpt = None,
    onnx_dir: KeepOnnxOpt = None,
    backends: BackendsOpt = "torch",
    device: DeviceOpt = "cpu",
    batch_sizes: BatchSizesOpt = "1",
    warmup: WarmupOpt = 10,
    iters: ItersOpt = 50,
    threads: ThreadsOpt = None,
    compile: CompileOpt = False,
    precision: PrecisionOpt = "fp32",
    cuda_graphs: CudaGraphsOpt = True,
    data: DataOpt = "samples",
    num_images: NumImagesOpt = None,
    no_drift: NoDriftOpt = False,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Profile a merged model against its unmerged self: FLOPs, latency, memory, drift."""
    if out is not None:
        writable_file(out, "--out", (".json",))
    if onnx_dir is not None:
        writable_folder(onnx_dir, "--onnx-dir")
    if onnx is not None:
        existing_file(onnx, "--onnx")
    check_distinct({"--out": out}, {"--onnx": onnx, "the manifest of --onnx": onnx and manifest_path(onnx),
                                    "--checkpoint": model.checkpoint, "--adapter": merge.adapter_path})
    config = ProfileConfig(
        backends=parse_backends(backends), device=device, batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"),
        warmup=warmup, iters=iters, threads=threads, compile=compile, data=None if no_drift else data,
        num_images=num_images, workdir=str(onnx_dir) if onnx_dir else None, precision=precision,
        cuda_graphs=cuda_graphs,
    )
    if onnx is not None:
        # the merge flags given besides --method and --adapter (-o / --no-prop-attn named as --option / --prop-attn)
        given = [f.replace("--no-", "--") for f in merge.as_flags() if f.startswith("--")]
        from_manifest = [f for f in dict.fromkeys(given) if f not in ("--method", "--adapter")]
        from_manifest += ["--merge-form"] * (merge_form is not None) + ["--pretrained"] * model.pretrained
        if from_manifest:
            raise TmergeError(f"{', '.join(from_manifest)}: with --onnx the merge settings come from the "
                              "export's manifest; drop them")
        existing_file(onnx, "--onnx")
        merged, unmerged, name, manifest = pair_from_manifest(onnx, model, adapter=merge.adapter_path)
        static = None if manifest.dynamic_batch else manifest.export_batch
        if static is not None and any(b != static for b in config.batch_sizes) and any(
                find_backend(b).takes == "onnx" for b in config.backends):
            raise TmergeError(f"{onnx} was exported with a static batch of {static}: use --batch-sizes {static} "
                              "or export with --dynamic-batch")
        config.onnx_merged = str(onnx)
        config.onnx_merged_parity = manifest.parity
        config.merge_form = manifest.merge_form
        ckpt = model.checkpoint or manifest.checkpoint
        label = model_label(name, ckpt)
    else:
        config.merge_form = merge_form_for(merge.method, merge_form)
        merged, unmerged = build_pair(model, merge)
        name, label, ckpt = model.display_name, model.label, model.checkpoint
    info = {"label": label, "checkpoint": ckpt, "model_kwargs": dict(model.kwargs) or None,
            "adapter": merge.adapter_path, "weights_sha256": weights_sha256(unmerged),
            "onnx": str(onnx) if onnx else None}
    with RichProgress() as progress:
        report = profile_pair(merged, unmerged, config, model_name=name, model_info=info, progress=progress)
    if out is not None:
        save_report(report, out)
    if as_json:
        print_json(report)
    else:
        render_report(report)
    for warning in report["warnings"]:
        sys.stderr.write(f"warning: {warning}\n")
