"""``tmerge profile`` as a library: build the merged/unmerged pair, measure, return a report dict.

The report follows :mod:`tmerge.profiling.report` (schema version 1). Everything is measured in this
process: FLOPs with ``torch.utils.flop_counter`` (batch 1, per image), drift with the torch models on
the same images, latency per (backend, batch size) with the merged and unmerged models interleaved.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import runtime
from ..config import MergeConfig
from ..data.sources import load_images
from ..errors import TmergeError
from ..export import Manifest, export_onnx, read_manifest
from ..export.input_checks import merge_form_for
from ..export.manifest import check_describes
from ..export.verify import recheck_file
from ..merging.ops import check_form
from ..models.flops import FLOPS_CONVENTION, count_flops
from ..models.forward import forward_with_features, has_classifier, input_shape
from ..models.hashing import weights_sha256
from ..models.memory import check_batch_fits
from ..models.merged import build_pair
from ..models.spec import ModelSpec
from ..patch import merge_info, using_merge_form
from ..runtime.torch_eager import autocast, check_precision
from . import latency as lat
from .drift import knn_agreement, output_drift
from .report import KIND, SCHEMA_VERSION, environment, now_iso

MAX_THREADS = 4 * (os.cpu_count() or 1) + 64  # beyond this a thread count is a typo, not a setting


@dataclass
class ProfileConfig:
    backends: list[str] = field(default_factory=lambda: ["torch"])
    device: str = "cpu"
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    warmup: int = 10
    iters: int = 50
    threads: int | None = None
    compile: bool = False
    data: str | None = "samples"  # image source for drift; None skips drift
    num_images: int | None = None
    seed: int = 0
    memory: bool = True
    flops: bool = True
    onnx_merged: str | None = None  # an exported merged model to time instead of exporting one
    onnx_merged_parity: dict | None = None  # re-checked when the file was loaded (pair_from_manifest)
    onnx_unmerged: str | None = None
    workdir: str | None = None  # where exported ONNX files go (default: a temp dir, removed)
    precision: str = "fp32"  # torch backends and drift: fp32, or fp16/bf16 autocast
    cuda_graphs: bool = True  # torch backends on CUDA: capture each batch once and replay it
    merge_form: str | None = None  # merge ops of the merged model and its exports (None: the export default)

    @property
    def needs_onnx(self) -> bool:
        """Whether a backend runs exported graphs (ONNX Runtime, OpenVINO, TensorRT)."""
        return any(runtime.find_backend(b).takes == "onnx" for b in self.backends)

    def __post_init__(self) -> None:
        """Bad settings fail here, before any model is loaded."""
        self.backends = [runtime.check_backend(backend, self.device).name for backend in self.backends]
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise TmergeError(f"--batch-sizes must be positive integers, got {self.batch_sizes}")
        if len(set(self.batch_sizes)) < len(self.batch_sizes):
            raise TmergeError(f"--batch-sizes repeats a batch size: {','.join(map(str, self.batch_sizes))}")
        if self.iters < 1 or self.warmup < 0:
            raise TmergeError("--iters must be >= 1 and --warmup >= 0")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise TmergeError(f"--threads must be between 1 and {MAX_THREADS}, got {self.threads}")
        if self.num_images is not None:
            if self.data is None:
                raise TmergeError("--num-images is for drift: drop it or --no-drift")
            if self.num_images < 1:
                raise TmergeError(f"--num-images must be at least 1, got {self.num_images}")
        check_precision(self.precision)
        if self.merge_form is not None:
            check_form(self.merge_form)
        if self.precision != "fp32" and self.needs_onnx:
            raise TmergeError(f"--precision {self.precision} is autocast in the torch backends; ONNX backends run "
                              "the exported fp32 graph: time them in a separate profile")
        if self.compile and "torch" not in self.backends:
            raise TmergeError("--compile applies to the torch backend: add it with --backends, or drop --compile")
        if self.workdir is not None and not set(self.backends) & {"onnxruntime", "tensorrt"}:
            raise TmergeError("--onnx-dir keeps the ONNX files of the onnxruntime/tensorrt backends: add one with "
                              "--backends, or drop --onnx-dir")


class Progress:
    """What the profiler reports as it goes; the CLI renders it with rich on stderr."""

    def step(self, description: str, total: int | None = None) -> Callable[[int], None]:
        return lambda done: None

    def lazy_step(self, description: str) -> Callable[[int, int], None]:
        """Like :meth:`step`, but shown from the first ``update(done, total)`` on: a loop that first
        checks its input and fails prints nothing but its error."""
        update = None

        def first_then_update(done: int, total: int) -> None:
            nonlocal update
            if update is None:
                update = self.step(description, total)
            update(done)

        return first_then_update

    def log(self, message: str) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# the pair an exported model came from


def pair_from_manifest(onnx_path: str | Path, model: ModelSpec | None = None, *, adapter: str | None = None
                       ) -> tuple[nn.Module, nn.Module, str, Manifest]:
    """Rebuild the torch merged/unmerged pair an exported model came from (for FLOPs, drift, the
    unmerged ONNX counterpart and the torch backend): (merged, unmerged, model name, manifest).

    The manifest must describe the file (its sha256 and merge nodes, :func:`check_describes`) and
    the file must compute what the rebuilt model computes (:func:`recheck_file`); the returned
    manifest's ``parity`` is that re-check, never the one stored at export time.
    From the manifest: model name, method, options, proportional attention, the per-block r and the
    adapter that ran (:meth:`MergeConfig.from_manifest`); the checkpoint and model kwargs from the
    manifest when the exporter recorded them, else from ``model`` (whose name, when given, replaces
    the manifest's), and ``adapter`` (a file) when given. The rebuilt models must hash to the manifest's
    ``weights_sha256`` (backbone) and ``merged_weights_sha256``, so a mismatched rebuild is an
    error, never a silent comparison against other weights.
    """
    manifest = read_manifest(onnx_path)
    model = model or ModelSpec()
    # "model_name" is what was asked for (e.g. "dinov2-s14"); "model" is a human-readable label
    name = model.name or manifest.model_name or manifest.model
    check_describes(onnx_path, manifest)
    merge = MergeConfig.from_manifest(manifest.as_dict())
    if adapter is not None:
        merge = replace(merge, adapter=adapter)
    spec = ModelSpec(name, model.kwargs or manifest.model_kwargs or {}, model.checkpoint or manifest.checkpoint)
    merged, unmerged = build_pair(spec, merge)
    if weights_sha256(unmerged) != manifest.weights_sha256 or (
            manifest.merged_weights_sha256 and weights_sha256(merged) != manifest.merged_weights_sha256):
        raise TmergeError(f"rebuilding {name} here gives other weights than {onnx_path} was exported with "
                          "(weights_sha256 mismatch); pass the --model/--model-kwargs/--checkpoint/--adapter "
                          "it was exported from")
    batch = 2 if manifest.dynamic_batch else int(manifest.export_batch)
    with using_merge_form(merged, manifest.merge_form):
        manifest.parity = recheck_file(merged, onnx_path, batch_size=batch,
                                       atol=float((manifest.parity or {}).get("atol") or 1e-4))
    return merged, unmerged, spec.display_name, manifest


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ----------------------------------------------------------------------------------------------
# FLOPs and drift


def flops_section(merged: nn.Module, unmerged: nn.Module) -> dict:
    shape = input_shape(unmerged)
    fm = count_flops(merged, shape)
    fu = count_flops(unmerged, shape)
    info = merge_info(merged)
    tokens = info["tokens"] or [None] * (len(info["r"]) + 1)
    per_layer = [
        {"layer": i, "tokens_in": tokens[i], "r": info["r"][i], "tokens_out": tokens[i + 1],
         "merged": fm["per_layer"][i] if i < len(fm.get("per_layer", [])) else None,
         "unmerged": fu["per_layer"][i] if i < len(fu.get("per_layer", [])) else None}
        for i in range(len(info["r"]))
    ]
    return {"merged": fm["per_image"], "unmerged": fu["per_image"], "ratio": fm["per_image"] / fu["per_image"],
            "per_image": True, "convention": FLOPS_CONVENTION, "per_layer": per_layer}


@torch.no_grad()
def model_outputs(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, pre-logits features) for ``images``; outputs = logits, or the features when headless."""
    pairs = [forward_with_features(model, batch) for batch in images.split(batch_size)]
    return torch.cat([o.float() for o, _ in pairs]), torch.cat([f.float() for _, f in pairs])


def drift_between(merged: nn.Module, unmerged: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
                  class_names: list[str] | None = None, *,
                  reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Drift of the merged model from the unmerged one on ``images`` (metrics that do not apply: None).

    ``reference``: the unmerged model's :func:`model_outputs` on ``images``, when already computed."""
    logits = has_classifier(unmerged)
    ref_out, ref_feat = reference if reference is not None else model_outputs(unmerged, images)
    mer_out, mer_feat = model_outputs(merged, images)
    use_labels = (labels is not None and logits and class_names is not None
                  and len(class_names) == int(unmerged.num_classes))
    d = output_drift(ref_out, mer_out, labels if use_labels else None, logits=logits)
    feat = output_drift(ref_feat, mer_feat, logits=False)
    out = {
        "outputs": "logits" if logits else "features",
        "n": d["n"],
        "agreement_top1": d.get("agreement_top1"),
        "kl_mean": d.get("kl_mean"),
        "cosine_mean": d["cosine_mean"],
        "cosine_min": d["cosine_min"],
        "cosine_distance_mean": d["cosine_distance_mean"],
        "max_abs_diff": d["max_abs_diff"],
        "feature_cosine_mean": feat["cosine_mean"],
        "knn_agreement": knn_agreement(ref_feat, mer_feat),
        "accuracy_top1_reference": d.get("accuracy_top1_reference"),
        "accuracy_top1_merged": d.get("accuracy_top1_merged"),
        "accuracy_top1_delta": d.get("accuracy_top1_delta"),
        "labels": "used" if use_labels else ("ignored: classes differ from the model's head" if labels is not None
                                             else None),
    }
    return out


# ----------------------------------------------------------------------------------------------
# ONNX export for the onnxruntime / tensorrt backends


def export_for_runtime(model: nn.Module, path: Path, *, model_name: str | None, batch_size: int = 2,
                       verify: bool = True, merge_form: str | None = None) -> dict:
    """Export ``model`` (merged or not) to ONNX with the project exporter (verified against torch
    unless ``verify`` is False; merging with ``merge_form``'s ops); returns {path, parity}."""
    result = export_onnx(model, str(path), batch_size=batch_size, dynamic_batch=True, verify=verify,
                         model_name=model_name, merge_form=merge_form)
    return {"path": str(result.path), "parity": result.parity}


# ----------------------------------------------------------------------------------------------
# the whole profile


def profile_pair(merged: nn.Module, unmerged: nn.Module, config: ProfileConfig, *, model_name: str,
                 model_info: dict | None = None, progress: Progress | None = None,
                 drift_images: Any = None) -> dict:
    """Measure a merged model against its unmerged twin; the report dict (schema version 1).

    ``drift_images``: an already loaded ImageSet (images, labels, class_names) to reuse (sweeps);
    else ``config.data`` is loaded.
    """
    progress = progress or Progress()
    for bs in config.batch_sizes:
        check_batch_fits(unmerged, bs, "--batch-sizes")
    torch_threads = lat.set_torch_threads(config.threads)
    # Without --threads every runtime gets torch's default count, set explicitly and recorded: a
    # report always says how many threads its timings used.
    config = replace(config, threads=torch_threads)
    images = labels = class_names = None  # loaded first: bad data fails before any work or output
    if drift_images is not None:
        images, labels, class_names = drift_images
    elif config.data is not None:
        images, labels, class_names = load_images(config.data, unmerged, n=config.num_images, seed=config.seed,
                                                  progress=progress.lazy_step("preparing drift images"))
    merged.eval()
    unmerged.eval()
    info = merge_info(merged)
    config = replace(config, merge_form=merge_form_for(info["method"], config.merge_form))

    # the merged model runs the merge ops its exports use, in every measurement (FLOPs, drift, latency)
    with using_merge_form(merged, config.merge_form):
        report: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "kind": KIND,
            "created": now_iso(),
            "model": model_name,
            "model_info": {
                "input_size": list(input_shape(unmerged)[1:]),
                "num_prefix_tokens": int(getattr(unmerged, "num_prefix_tokens", 0)),
                "num_classes": int(getattr(unmerged, "num_classes", 0) or 0),
                "head": "classifier" if has_classifier(unmerged) else "none (features)",
                "depth": len(unmerged.blocks),
                **(model_info or {}),
            },
            "method": info["method"],
            "method_options": info.get("options", {}),
            **({"adapter": info["adapter"]} if "adapter" in info else {}),
            "prop_attn": info.get("prop_attn"),
            "merge_form": config.merge_form,
            "schedule_spec": info.get("schedule"),
            "schedule": list(info["r"]),
            "tokens_per_layer": list(info["tokens"] or [])
            or [unmerged.patch_embed.num_patches + unmerged.num_prefix_tokens] * (len(unmerged.blocks) + 1),
            "params": {"merged": count_params(merged), "unmerged": count_params(unmerged)},
        }

        if config.flops:
            progress.log("counting FLOPs")
            report["flops"] = flops_section(merged, unmerged)

        if images is not None:
            progress.log(f"drift on {len(images)} images")
            with autocast("cpu", config.precision):
                drift = drift_between(merged, unmerged, images, labels, class_names)
            drift = {"source": str(config.data), "seed": config.seed, "precision": config.precision, **drift}
            report["drift"] = drift
        else:
            report["drift"] = None

        report["latency"] = _latency(merged, unmerged, config, images, progress, model_name)
        ort_threads = config.threads if "onnxruntime" in config.backends else None
        report["env"] = environment(torch_threads, ort_threads)
        report["warnings"] = lat.interval_warnings(report["latency"], report["env"]["loadavg"])
        report["config"] = {"warmup": config.warmup, "iters": config.iters, "batch_sizes": list(config.batch_sizes),
                            "backends": list(config.backends), "device": config.device, "threads": config.threads,
                            "precision": config.precision, "cuda_graphs": config.cuda_graphs and config.device == "cuda",
                            "compile": config.compile, "data": config.data}
        return report


def _batch(images: torch.Tensor | None, batch_size: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if images is None or len(images) == 0:
        return torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(seed))
    reps = -(-batch_size // len(images))
    return images.repeat(reps, 1, 1, 1)[:batch_size].contiguous()


def _latency(merged, unmerged, config: ProfileConfig, images, progress: Progress, model_name: str) -> list[dict]:
    entries: list[dict] = []
    if not config.backends or config.iters == 0:
        return entries
    shape = input_shape(unmerged)[1:]
    backends = [runtime.find_backend(b) for b in config.backends]
    if config.compile:  # --compile: the torch backend compiled
        backends = [runtime.find_backend("torch.compile") if b.name == "torch" else b for b in backends]
    artifacts: dict[str, dict] = {}
    tmp = None
    created = None  # the --onnx-dir folder when this run created it: removed again if the run fails
    try:
        if config.needs_onnx:
            if config.workdir:
                workdir = Path(config.workdir)
                if not workdir.exists():
                    workdir.mkdir(parents=True)
                    created = workdir
            else:
                tmp = tempfile.TemporaryDirectory(prefix="tmerge-profile-")
                workdir = Path(tmp.name)
            for name, model, given in (("merged", merged, config.onnx_merged),
                                       ("unmerged", unmerged, config.onnx_unmerged)):
                if given:
                    if not Path(given).is_file():
                        raise TmergeError(f"{given} does not exist")
                    parity = config.onnx_merged_parity if name == "merged" else None
                    artifacts[name] = {"path": str(given), "parity": parity, "exported": False}
                else:
                    progress.log(f"exporting the {name} model to ONNX")
                    form = config.merge_form if name == "merged" else None
                    artifacts[name] = {**export_for_runtime(model, workdir / f"{name}.onnx", model_name=model_name,
                                                            merge_form=form), "exported": True}
        for backend in backends:
            sources = {"merged": merged, "unmerged": unmerged}
            if backend.takes == "onnx":
                sources = {k: v["path"] for k, v in artifacts.items()}
                ir = [p for p in sources.values() if Path(p).suffix.lower() == ".xml"]
                if ir and backend.name != "openvino":
                    raise TmergeError(f"{ir[0]} is an OpenVINO IR: only the openvino backend runs it")
            torch_options = ({"precision": config.precision, "cuda_graphs": config.cuda_graphs}
                             if backend.takes == "torch" else {})
            runners = {k: runtime.create(backend.name, v, device=config.device, threads=config.threads, timing=True,
                                         **torch_options) for k, v in sources.items()}
            for bs in config.batch_sizes:
                x = _batch(images, bs, shape, config.seed)
                update = progress.step(f"{backend.name} {config.device} batch {bs}", total=config.iters)
                result = lat.measure_pair(runners["merged"].prepare(x), runners["unmerged"].prepare(x), bs,
                                          device=config.device, backend=backend.name, warmup=config.warmup,
                                          iters=config.iters,
                                          memory=config.memory, progress=update)
                entry = {"backend": backend.name, "device": config.device, "batch_size": bs,
                         "threads": config.threads if backend.name != "tensorrt" else None,
                         "compile": backend.name == "torch.compile" if backend.takes == "torch" else None,
                         "runtime": runners["merged"].describe(), "iters": config.iters, **result}
                if backend.takes == "onnx":
                    entry["artifacts"] = {k: {kk: vv for kk, vv in v.items() if kk != "path" or not tmp}
                                          for k, v in artifacts.items()}
                entries.append(entry)
            del runners
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        if tmp is not None:
            tmp.cleanup()
    return entries
