"""``tmerge profile`` as a library: build the merged/unmerged pair, measure, return a report dict.

The report follows :mod:`tmerge.profiling.report` (schema version 1). Everything is measured in this
process: FLOPs with ``torch.utils.flop_counter`` (batch 1, per image), drift with the torch models on
the same images, latency per (backend, batch size) with the merged and unmerged models interleaved.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import TmergeError
from . import latency as lat
from .report import KIND, SCHEMA_VERSION, environment, now_iso


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
    onnx_unmerged: str | None = None
    workdir: str | None = None  # where exported ONNX files go (default: a temp dir, removed)


class Progress:
    """What the profiler reports as it goes; the CLI renders it with rich on stderr."""

    def step(self, description: str, total: int | None = None) -> Callable[[int], None]:
        return lambda done: None

    def log(self, message: str) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# building the pair


def parse_kv(items: str | list[str] | None, what: str = "--model-kwargs") -> dict[str, Any]:
    """"img_size=32,patch_size=8" (or a list of such) -> {"img_size": 32, "patch_size": 8}."""
    from ..cli.options import parse_key_values

    return parse_key_values(items, what, split_commas=True)


def build_pair(model: str | None = None, *, checkpoint: str | None = None, pretrained: bool = False,
               method: str = "tome", r: int | None = None, inflection: float | None = None,
               schedule: str | None = None, keep_ratio: float | None = None, prop_attn: bool | None = None,
               options: list[str] | None = None, adapter: str | None = None,
               model_kwargs: dict | None = None, seed: int | None = 0) -> tuple[nn.Module, nn.Module]:
    """(merged, unmerged): one load, a deep copy, the copy patched. Same weights, eval mode.

    ``seed`` seeds torch before the model is built, so random-init models (no --pretrained, no
    --checkpoint) get the same weights in every run and reports stay comparable."""
    from ..cli.options import patch_model
    from ..models import load_model

    if seed is not None:
        torch.manual_seed(seed)
    unmerged = load_model(model, checkpoint=checkpoint, pretrained=pretrained, **(model_kwargs or {}))
    merged = patch_model(copy.deepcopy(unmerged), method, r, inflection, schedule, keep_ratio, prop_attn,
                         options, adapter)
    return merged, unmerged.eval()


def input_size(model: nn.Module) -> tuple[int, int, int]:
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        return (3, int(img[0]), int(img[1]))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def has_classifier(model: nn.Module) -> bool:
    """Class logits (``num_classes > 0``) -> logits drift; else the output is a feature vector."""
    return int(getattr(model, "num_classes", 0) or 0) > 0


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ----------------------------------------------------------------------------------------------
# FLOPs and drift


def flops_section(merged: nn.Module, unmerged: nn.Module) -> dict:
    from .. import merge_info
    from .flops import FLOPS_CONVENTION, count_flops

    shape = (1, *input_size(unmerged))
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
def _outputs(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, pre-logits features) for ``images``; outputs = logits, or the features when headless."""
    outs, feats = [], []
    for batch in images.split(batch_size):
        f = model.forward_head(model.forward_features(batch), pre_logits=True)
        feats.append(f.float())
        outs.append(model.get_classifier()(f).float() if has_classifier(model) else f.float())
    return torch.cat(outs), torch.cat(feats)


def drift_between(merged: nn.Module, unmerged: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
                  class_names: list[str] | None = None) -> dict:
    """Drift of the merged model from the unmerged one on ``images`` (metrics that do not apply: None)."""
    from .drift import knn_agreement, output_drift

    logits = has_classifier(unmerged)
    ref_out, ref_feat = _outputs(unmerged, images)
    mer_out, mer_feat = _outputs(merged, images)
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


def load_drift_images(source: str, model: nn.Module, n: int | None, seed: int):
    from ..data import load_images

    return load_images(source, model, n=n, seed=seed)


# ----------------------------------------------------------------------------------------------
# ONNX export for the onnxruntime / tensorrt backends


def export_for_runtime(model: nn.Module, path: Path, *, model_name: str | None, batch_size: int = 2) -> dict:
    """Export ``model`` (merged or not) to ONNX with the project exporter (verified against torch);
    returns {path, parity}. Falls back to a plain dynamo export when the exporter is unavailable."""
    try:
        from ..export.onnx import export_onnx
    except ImportError:
        export_onnx = None
    if export_onnx is not None:
        result = export_onnx(model, str(path), batch_size=batch_size, dynamic_batch=True, verify=True,
                             model_name=model_name)
        parity = getattr(result, "parity", None)
        if parity is not None and not isinstance(parity, (dict, float, int, str)):
            parity = getattr(parity, "__dict__", str(parity))
        return {"path": str(getattr(result, "path", path)), "parity": parity}
    import warnings

    x = torch.randn(batch_size, *input_size(model), generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18,
                          dynamic_shapes=({0: batch},), verbose=False)
    return {"path": str(path), "parity": None}


# ----------------------------------------------------------------------------------------------
# the whole profile


def profile_pair(merged: nn.Module, unmerged: nn.Module, config: ProfileConfig, *, model_name: str,
                 model_info: dict | None = None, progress: Progress | None = None,
                 drift_images: Any = None) -> dict:
    """Measure a merged model against its unmerged twin; the report dict (schema version 1).

    ``drift_images``: an already loaded ImageSet (images, labels, class_names) to reuse (sweeps);
    else ``config.data`` is loaded.
    """
    from .. import merge_info

    progress = progress or Progress()
    for backend in config.backends:
        lat.check_backend(backend, config.device)
    if not config.batch_sizes or any(b < 1 for b in config.batch_sizes):
        raise TmergeError(f"--batch-sizes must be positive integers, got {config.batch_sizes}")
    torch_threads = lat.set_torch_threads(config.threads)
    # Without --threads every runtime gets torch's default count, set explicitly and recorded: a
    # report always says how many threads its timings used.
    config = replace(config, threads=torch_threads)
    images = labels = class_names = None  # loaded first: bad data fails before any work or output
    if drift_images is not None:
        images, labels, class_names = drift_images
    elif config.data is not None:
        images, labels, class_names = load_drift_images(config.data, unmerged, config.num_images, config.seed)
    merged.eval()
    unmerged.eval()
    info = merge_info(merged)

    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "created": now_iso(),
        "model": model_name,
        "model_info": {
            "input_size": list(input_size(unmerged)),
            "num_prefix_tokens": int(getattr(unmerged, "num_prefix_tokens", 0)),
            "num_classes": int(getattr(unmerged, "num_classes", 0) or 0),
            "head": "classifier" if has_classifier(unmerged) else "none (features)",
            "depth": len(unmerged.blocks),
            **(model_info or {}),
        },
        "method": info["method"],
        "method_options": info.get("options", {}),
        "prop_attn": info.get("prop_attn"),
        "merge_form": info.get("merge_form"),
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
        drift = drift_between(merged, unmerged, images, labels, class_names)
        drift = {"source": str(config.data) if drift_images is None else str(config.data), "seed": config.seed,
                 **drift}
        report["drift"] = drift
    else:
        report["drift"] = None

    report["latency"] = _latency(merged, unmerged, config, images, progress, model_name)
    ort_threads = config.threads if "onnxruntime" in config.backends else None
    report["env"] = environment(torch_threads, ort_threads)
    report["config"] = {"warmup": config.warmup, "iters": config.iters, "batch_sizes": list(config.batch_sizes),
                        "backends": list(config.backends), "device": config.device, "threads": config.threads,
                        "compile": config.compile, "data": config.data}
    return report


def _manifest_parity(onnx_path: str):
    import json

    try:
        return json.loads(Path(str(onnx_path) + ".json").read_text()).get("parity")
    except (OSError, ValueError, AttributeError):
        return None


def _batch(images: torch.Tensor | None, batch_size: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if images is None or len(images) == 0:
        return torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(seed))
    reps = -(-batch_size // len(images))
    return images.repeat(reps, 1, 1, 1)[:batch_size].contiguous()


def _latency(merged, unmerged, config: ProfileConfig, images, progress: Progress, model_name: str) -> list[dict]:
    entries: list[dict] = []
    if not config.backends or config.iters == 0:
        return entries
    shape = input_size(unmerged)
    onnx_paths: dict[str, dict] = {}
    tmp = None
    try:
        if any(b in ("onnxruntime", "tensorrt") for b in config.backends):
            if config.workdir:
                workdir = Path(config.workdir)
                workdir.mkdir(parents=True, exist_ok=True)
            else:
                tmp = tempfile.TemporaryDirectory(prefix="tmerge-profile-")
                workdir = Path(tmp.name)
            for name, model, given in (("merged", merged, config.onnx_merged),
                                       ("unmerged", unmerged, config.onnx_unmerged)):
                if given:
                    if not Path(given).is_file():
                        raise TmergeError(f"{given} does not exist")
                    onnx_paths[name] = {"path": str(given), "parity": _manifest_parity(given), "exported": False}
                else:
                    progress.log(f"exporting the {name} model to ONNX")
                    onnx_paths[name] = {**export_for_runtime(model, workdir / f"{name}.onnx", model_name=model_name),
                                        "exported": True}
        for backend in config.backends:
            for bs in config.batch_sizes:
                x = _batch(images, bs, shape, config.seed)
                if backend == "torch":
                    m = lat.torch_runner(merged, x, config.device, compile=config.compile)
                    u = lat.torch_runner(unmerged, x, config.device, compile=config.compile)
                elif backend == "onnxruntime":
                    m = lat.ort_runner(onnx_paths["merged"]["path"], x, config.device, config.threads)
                    u = lat.ort_runner(onnx_paths["unmerged"]["path"], x, config.device, config.threads)
                else:
                    m = lat.tensorrt_runner(onnx_paths["merged"]["path"], x, config.device)
                    u = lat.tensorrt_runner(onnx_paths["unmerged"]["path"], x, config.device)
                update = progress.step(f"{backend} {config.device} batch {bs}", total=config.iters)
                result = lat.measure_pair(m, u, bs, warmup=config.warmup, iters=config.iters,
                                          memory=config.memory, progress=update)
                entry = {"backend": backend, "device": config.device, "batch_size": bs,
                         "threads": config.threads if backend != "tensorrt" else None,
                         "compile": bool(config.compile) if backend == "torch" else None,
                         "iters": config.iters, **result}
                if backend != "torch":
                    entry["artifacts"] = {k: {kk: vv for kk, vv in v.items() if kk != "path" or not tmp}
                                          for k, v in onnx_paths.items()}
                entries.append(entry)
                del m, u
    finally:
        if tmp is not None:
            tmp.cleanup()
    return entries
