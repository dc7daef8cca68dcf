"""`tmerge profile`: FLOPs, latency (merged vs unmerged, interleaved), drift, memory -> report."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..app import app, print_json
from ..options import (AdapterOpt, CheckpointOpt, InflectionOpt, JsonOpt, KeepRatioOpt, MethodOpt,
                          MethodOptionsOpt, ModelOpt, PretrainedOpt, PropAttnOpt, ROpt, ScheduleOpt)
from ...errors import TmergeError

ModelKwargsOpt = Annotated[Optional[str], typer.Option(
    "--model-kwargs", help="extra timm.create_model arguments, e.g. img_size=32,patch_size=8,depth=3")]
BackendsOpt = Annotated[str, typer.Option("--backends", "--backend", help="comma list of torch, onnxruntime, tensorrt")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda")]
BatchSizesOpt = Annotated[str, typer.Option("--batch-sizes", help="comma list of batch sizes, e.g. 1,8,32")]
WarmupOpt = Annotated[int, typer.Option("--warmup", help="untimed runs of each model before timing")]
ItersOpt = Annotated[int, typer.Option("--iters", help="timed runs of each model (interleaved)")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="torch threads and ONNX Runtime intra-op threads")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch backend: time torch.compile'd models")]
DataOpt = Annotated[str, typer.Option("--data", help="drift images: 'samples', 'fashion-mnist[:test]' or an ImageFolder dir")]
NumImagesOpt = Annotated[Optional[int], typer.Option("--num-images", help="images for drift (default: source's default)")]
NoDriftOpt = Annotated[bool, typer.Option("--no-drift", help="skip the drift measurement")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-O", help="also write the JSON report to this file")]
OnnxOpt = Annotated[Optional[Path], typer.Option(
    "--onnx", help="time this exported merged model (its manifest <PATH>.json names the model and schedule)")]
KeepOnnxOpt = Annotated[Optional[Path], typer.Option("--onnx-dir", help="keep the exported ONNX files in this folder")]


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TmergeError(f"{what} takes a comma list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise TmergeError(f"{what} takes positive integers, got {text!r}")
    return values


def parse_backends(text: str) -> list[str]:
    from ...profiling.latency import BACKENDS

    backends = [b.strip().lower() for b in text.split(",") if b.strip()]
    aliases = {"ort": "onnxruntime", "trt": "tensorrt", "eager": "torch"}
    backends = [aliases.get(b, b) for b in backends]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise TmergeError(f"unknown backend {', '.join(unknown) or text!r}; use {', '.join(BACKENDS)}")
    return list(dict.fromkeys(backends))


class RichProgress:
    """Progress on stderr with rich: a bar per timed (backend, batch) step, a line per phase."""

    def __init__(self, enabled: bool = True):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled
        self._progress = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False

    def step(self, description: str, total: int | None = None):
        if not self.enabled:
            return lambda done: None
        if self._progress is None:  # started on first use: an early error prints nothing but itself
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=self.console, transient=False)
            self._progress.__enter__()
        task = self._progress.add_task(description, total=total)
        return lambda done: self._progress.update(task, completed=done)

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[dim]· {message}[/dim]")


def read_manifest(onnx_path: Path) -> dict:
    """The manifest written next to an exported model: ``<PATH>.json`` (or PATH with .json suffix)."""
    for candidate in (Path(str(onnx_path) + ".json"), onnx_path.with_suffix(".json")):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise TmergeError(f"manifest {candidate} is unreadable ({e})") from e
            if not isinstance(data, dict):
                raise TmergeError(f"manifest {candidate} is not a JSON object")
            return data
    raise TmergeError(f"{onnx_path} has no manifest ({onnx_path}.json); export it with `tmerge export`")


def pair_from_manifest(manifest: dict, onnx_path: Path, *, model: str | None = None, checkpoint: str | None = None,
                       model_kwargs: dict | None = None, adapter: str | None = None):
    """Rebuild the torch merged/unmerged pair an exported model came from (for FLOPs, drift, the
    unmerged ONNX counterpart and the torch backend).

    From the manifest: model name, method, options, proportional attention and the per-block r
    (``layers[].r``); ``checkpoint``, ``model_kwargs`` and ``adapter`` from the manifest when the
    exporter recorded them, else from the command line. The rebuilt merged model's weights must hash
    to the manifest's ``weights_sha256``, so a mismatched rebuild is an error, never a silent
    comparison against other weights.
    """
    from ...profiling.profile import build_pair

    # "model_name" is what was asked for (e.g. "dinov2-s14"); "model" is a human-readable label
    name = (manifest.get("model_name") or manifest.get("model")) if model is None else model
    if isinstance(name, dict):
        name = name.get("name")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not all(isinstance(l, dict) and "r" in l for l in layers):
        raise TmergeError(f"the manifest of {onnx_path} has no per-block schedule (layers[].r)")
    schedule = ",".join(str(int(l["r"])) for l in layers)
    method = manifest.get("method") or "tome"
    options = manifest.get("options") or {}
    checkpoint = checkpoint or manifest.get("checkpoint")
    model_kwargs = model_kwargs or manifest.get("model_kwargs") or {}
    adapter = adapter or manifest.get("adapter")
    if method == "none":
        from ...models import load_model

        import torch
        torch.manual_seed(0)
        merged = load_model(name, checkpoint=checkpoint, **model_kwargs)
        unmerged = copy.deepcopy(merged)
    else:
        merged, unmerged = build_pair(
            name, checkpoint=checkpoint, method=method, schedule=schedule, prop_attn=manifest.get("prop_attn"),
            options=[f"{k}={json.dumps(v)}" for k, v in options.items()], adapter=adapter, model_kwargs=model_kwargs)
    expected = manifest.get("weights_sha256")
    if expected:
        from ...models import weights_sha256

        if weights_sha256(merged) != expected:
            raise TmergeError(f"rebuilding {name} here gives other weights than {onnx_path} was exported with "
                              "(weights_sha256 mismatch); pass the --model/--model-kwargs/--checkpoint/--adapter "
                              "it was exported from")
    return merged, unmerged, name or "dinov2-s14"


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
    onnx: OnnxOpt = None,
    onnx_dir: KeepOnnxOpt = None,
    backends: BackendsOpt = "torch",
    device: DeviceOpt = "cpu",
    batch_sizes: BatchSizesOpt = "1",
    warmup: WarmupOpt = 10,
    iters: ItersOpt = 50,
    threads: ThreadsOpt = None,
    compile: CompileOpt = False,
    data: DataOpt = "samples",
    num_images: NumImagesOpt = None,
    no_drift: NoDriftOpt = False,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Profile a merged model against its unmerged self: FLOPs, latency, memory, drift."""
    from ...models import model_label
    from ...profiling.profile import ProfileConfig, build_pair, parse_kv, profile_pair
    from ...profiling.report import render_report, save_report

    config = ProfileConfig(
        backends=parse_backends(backends), device=device, batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"),
        warmup=warmup, iters=iters, threads=threads, compile=compile, data=None if no_drift else data,
        num_images=num_images, workdir=str(onnx_dir) if onnx_dir else None,
    )
    if iters < 1 or warmup < 0:
        raise TmergeError("--iters must be >= 1 and --warmup >= 0")
    from ...profiling.latency import check_backend

    for backend in config.backends:  # fail fast, before loading anything
        check_backend(backend, device)
    kwargs = parse_kv(model_kwargs)
    if onnx is not None:
        if not onnx.is_file():
            raise TmergeError(f"{onnx} does not exist")
        manifest = read_manifest(onnx)
        static = manifest.get("export_batch") if manifest.get("dynamic_batch") is False else None
        if static is not None and any(b != static for b in config.batch_sizes) and "onnxruntime" in config.backends:
            raise TmergeError(f"{onnx} was exported with a static batch of {static}: use --batch-sizes {static} "
                              "or export with --dynamic-batch")
        merged, unmerged, name = pair_from_manifest(manifest, onnx, model=model, checkpoint=checkpoint,
                                                    model_kwargs=kwargs, adapter=adapter)
        config.onnx_merged = str(onnx)
        ckpt = checkpoint or manifest.get("checkpoint")
        label = model_label(name, ckpt)
    else:
        merged, unmerged = build_pair(model, checkpoint=checkpoint, pretrained=pretrained, method=method, r=r,
                                      inflection=inflection, schedule=schedule, keep_ratio=keep_ratio,
                                      prop_attn=prop_attn, options=option, adapter=adapter, model_kwargs=kwargs)
        name, label, ckpt = model or "dinov2-s14", model_label(model, checkpoint), checkpoint
    from ...models import weights_sha256

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
