"""`tmerge profile`: FLOPs, latency (merged vs unmerged, interleaved), drift, memory -> report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..._io import check_distinct, existing_file, writable_file, writable_folder
from ...errors import TmergeError
from ...export.manifest import manifest_path
from ...models import DEFAULT_MODEL, model_label, weights_sha256
from ...models.merged import build_pair
from ...profiling.profile import ProfileConfig, pair_from_manifest, profile_pair
from ...profiling.report import save_report
from ...runtime import find_backend
from ..app import app, print_json
from ..options import (
    AdapterOpt,
    BackendsOpt,
    BatchSizesOpt,
    CheckpointOpt,
    CompileOpt,
    CudaGraphsOpt,
    DataOpt,
    DeviceOpt,
    InflectionOpt,
    ItersOpt,
    JsonOpt,
    KeepRatioOpt,
    MergeFormOpt,
    MethodOpt,
    MethodOptionsOpt,
    ModelKwargsOpt,
    ModelOpt,
    NoDriftOpt,
    NumImagesOpt,
    PrecisionOpt,
    PretrainedOpt,
    PropAttnOpt,
    ROpt,
    ScheduleOpt,
    ThreadsOpt,
    WarmupOpt,
    merge_config,
    parse_backends,
    parse_int_list,
    parse_model_kwargs,
)
from ..render import RichProgress, render_report

OutOpt = Annotated[Optional[Path], typer.Option("--out", "-O", help="also write the JSON report to this file")]
OnnxOpt = Annotated[Optional[Path], typer.Option(
    "--onnx", help="time this exported merged model (its manifest <PATH>.json names the model and schedule)")]
KeepOnnxOpt = Annotated[Optional[Path], typer.Option("--onnx-dir", help="keep the exported ONNX files in this folder")]


@app.command("profile")
def profile_command(
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
                                    "--checkpoint": checkpoint, "--adapter": adapter})
    config = ProfileConfig(
        backends=parse_backends(backends), device=device, batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"),
        warmup=warmup, iters=iters, threads=threads, compile=compile, data=None if no_drift else data,
        num_images=num_images, workdir=str(onnx_dir) if onnx_dir else None, precision=precision,
        cuda_graphs=cuda_graphs,
    )
    kwargs = parse_model_kwargs(model_kwargs)
    if onnx is not None:
        from_manifest = [flag for flag, value in (("--r", r), ("--inflection", inflection), ("--schedule", schedule),
                                                  ("--keep-ratio", keep_ratio), ("--prop-attn", prop_attn),
                                                  ("--option", option), ("--merge-form", merge_form),
                                                  ("--pretrained", pretrained or None)) if value is not None]
        if from_manifest:
            raise TmergeError(f"{', '.join(from_manifest)}: with --onnx the merge settings come from the "
                              "export's manifest; drop them")
        existing_file(onnx, "--onnx")
        merged, unmerged, name, manifest = pair_from_manifest(onnx, model=model, checkpoint=checkpoint,
                                                              model_kwargs=kwargs, adapter=adapter)
        static = None if manifest.dynamic_batch else manifest.export_batch
        if static is not None and any(b != static for b in config.batch_sizes) and any(
                find_backend(b).takes == "onnx" for b in config.backends):
            raise TmergeError(f"{onnx} was exported with a static batch of {static}: use --batch-sizes {static} "
                              "or export with --dynamic-batch")
        config.onnx_merged = str(onnx)
        config.onnx_merged_parity = manifest.parity
        ckpt = checkpoint or manifest.checkpoint
        label = model_label(name, ckpt)
    else:
        merge = merge_config(method, r, inflection, schedule, keep_ratio, prop_attn, option, adapter, merge_form)
        merged, unmerged = build_pair(model, merge, checkpoint=checkpoint, pretrained=pretrained,
                                      model_kwargs=kwargs)
        name, label, ckpt = model or DEFAULT_MODEL, model_label(model, checkpoint), checkpoint
    info = {"label": label, "checkpoint": ckpt, "model_kwargs": kwargs or None, "adapter": adapter,
            "weights_sha256": weights_sha256(unmerged), "onnx": str(onnx) if onnx else None}
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
