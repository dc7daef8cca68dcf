"""The manifest written next to every exported artifact (``<file>.json``): what the file is, how it
was made and how well it matched PyTorch. One typed record, one writer (:func:`manifest_bytes`
through the atomic writer) and one reader (:func:`read_manifest`).

Hashes: ``weights_sha256`` is the backbone's state dict (the unmerged model, as in profile reports
and adapters); ``merged_weights_sha256`` adds the merge method's learned parameters (DTEM/LTM).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import json_bytes
from ..config import upgrade_adapter_keys
from ..errors import TmergeError
from ..models.flops import count_flops
from ..models.forward import input_shape
from ..models.hashing import backbone_sha256, file_sha256, weights_sha256
from ..patch import merge_info, unmerged
from ..plugins import spec as plugin_spec
from .plugin_nodes import describe_plugin_nodes

VERSIONED_PACKAGES = ("tmerge", "torch", "timm", "onnx", "onnxruntime", "onnxscript", "openvino")


@dataclass
class ExportResult:
    """What an export wrote: the artifact, its manifest (path and content) and the parity record."""

    path: Path
    manifest_path: Path
    manifest: dict
    parity: dict
    model_proto: Any = field(default=None, repr=False)  # the written onnx.ModelProto


@dataclass
class Manifest:
    format: str  # "onnx", "openvino" or "trt"
    file: str
    model: str  # human-readable label
    weights_sha256: str  # backbone only
    merged_weights_sha256: str  # backbone + the method's learned parameters
    input: dict
    output: dict
    dynamic_batch: bool
    export_batch: int
    graph: str  # "portable" or "plugin"
    opset: int
    ir_version: int
    method: str
    options: dict
    prop_attn: bool
    merge_form: str | None
    schedule: str | None
    capped: list
    layers: list[dict]  # {layer, r, tokens_in, tokens_out}
    tokens: list[int] | None
    flops: dict
    parity: dict
    versions: dict
    created_unix: int
    model_name: str | None = None  # what was asked for (e.g. "dinov2-s14"); rebuilds the model
    checkpoint: str | None = None
    pretrained: bool = False
    adapter: dict | str | None = None  # learned methods: the adapter that ran ({path, sha256, ...}; export() gives the path absolute) or "untrained"
    model_kwargs: dict | None = None
    file_sha256: str | None = None
    file_bytes: int | None = None
    plugin_nodes: list[dict] | None = None
    plugin: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific additions (TensorRT, ...)

    def as_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        data = {k: v for k, v in data.items() if v is not None or k in _REQUIRED}
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: dict, where: str = "manifest") -> Manifest:
        data = upgrade_adapter_keys(data)  # manifests written before "adapter_used" became "adapter"
        missing = sorted(_REQUIRED - set(data))
        if missing:
            raise TmergeError(f"{where} is not a tmerge manifest (missing {', '.join(missing)})")
        layers = data.get("layers")
        if not isinstance(layers, list) or not all(isinstance(l, dict) and "r" in l for l in layers):
            raise TmergeError(f"{where} has no per-block schedule (layers[].r)")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    @property
    def per_block_r(self) -> list[int]:
        return [int(l["r"]) for l in self.layers]


_REQUIRED = {f.name for f in dataclasses.fields(Manifest)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def manifest_path(path: str | Path) -> Path:
    """Where the manifest of ``path`` lives: ``<path>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def manifest_bytes(manifest: Manifest | dict) -> bytes:
    data = manifest.as_dict() if isinstance(manifest, Manifest) else manifest
    return json_bytes(data)


def read_manifest(path: str | Path) -> Manifest:
    """The manifest next to an exported file (``<PATH>.json``, or PATH with its suffix replaced by
    .json); a one-line TmergeError when there is none or it is unreadable."""
    path = Path(path)
    for candidate in (manifest_path(path), path.with_suffix(".json")):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise TmergeError(f"manifest {candidate} is unreadable ({e})") from e
            if not isinstance(data, dict):
                raise TmergeError(f"manifest {candidate} is not a JSON object")
            return Manifest.from_dict(data, f"manifest {candidate}")
    raise TmergeError(f"{path} has no manifest ({manifest_path(path)}); export it with `tmerge export`")


def check_describes(path: str | Path, manifest: Manifest) -> None:
    """A one-line TmergeError unless ``manifest`` describes the file at ``path``: the file's sha256
    must be the recorded one, and a plugin graph's merge nodes must carry the recorded per-block r
    and token counts. (Whether the graph computes what the manifest's model computes is checked by
    running it: :func:`tmerge.export.verify.recheck_file`.)"""
    path = Path(path)
    if not manifest.file_sha256:
        raise TmergeError(f"the manifest of {path} records no file_sha256, so it cannot be checked against the "
                          "file; re-export it")
    digest = file_sha256(path)
    if digest != manifest.file_sha256:
        raise TmergeError(f"{path} is not the file its manifest describes (file_sha256 {digest[:12]} vs "
                          f"{str(manifest.file_sha256)[:12]} in {manifest_path(path).name}); re-export it, or keep "
                          "each .onnx with the manifest written beside it")
    if manifest.graph == "plugin":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        nodes = describe_plugin_nodes(proto)
        found = [(int(n["attributes"].get("r", -1)), int(n["attributes"].get("num_tokens", -1))) for n in nodes]
        expected = [(int(l["r"]), int(l.get("tokens_in") or -1)) for l in manifest.layers if int(l["r"]) > 0]
        if [r for r, _ in found] != [r for r, _ in expected] or any(
                e != -1 and f != e for (_, f), (_, e) in zip(found, expected)):
            raise TmergeError(f"the merge nodes of {path} (r, tokens: {found}) are not the manifest's schedule "
                              f"({expected}); re-export it")


def versions() -> dict:
    out = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if out["onnxruntime"] is None:
        try:
            out["onnxruntime"] = md.version("onnxruntime-gpu")
        except md.PackageNotFoundError:
            pass
    return out


def build_manifest(model: nn.Module, *, model_label: str | None, graph: str, opset: int, batch_size: int,
                   dynamic_batch: bool, parity: dict, proto, path: Path, merge_form: str | None = None,
                   model_name: str | None = None, checkpoint: str | None = None, pretrained: bool = False,
                   model_kwargs: dict | None = None) -> Manifest:
    """The manifest of an ONNX export of ``model`` whose merges use ``merge_form`` (FLOPs counted
    here, merged and unmerged)."""
    info = merge_info(model)
    shape = input_shape(model, 1)
    with torch.no_grad():
        flops_merged = count_flops(model, shape)
        with unmerged(model):
            flops_unmerged = count_flops(model, shape)
    tokens = info.get("tokens")
    layers = [{"layer": l, "r": r, "tokens_in": tokens[l] if tokens else None,
               "tokens_out": tokens[l + 1] if tokens else None} for l, r in enumerate(info["r"])]
    label = (model_label or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
             or type(model).__name__)
    batch_dim = "batch" if dynamic_batch else batch_size
    out_dims = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim[1:]]
    merged_per_image, unmerged_per_image = flops_merged["per_image"], flops_unmerged["per_image"]
    manifest = Manifest(
        format="onnx", file=path.name, model=label,
        weights_sha256=backbone_sha256(model), merged_weights_sha256=weights_sha256(model),
        input={"name": "images", "shape": [batch_dim, *shape[1:]], "dtype": "float32"},
        output={"name": "output", "shape": [batch_dim, *out_dims]},
        dynamic_batch=dynamic_batch, export_batch=batch_size, graph=graph, opset=opset,
        ir_version=proto.ir_version, method=info["method"], options=info.get("options", {}),
        adapter=info.get("adapter"),
        prop_attn=info.get("prop_attn", False), merge_form=merge_form, schedule=info.get("schedule"),
        capped=info.get("capped", []), layers=layers, tokens=tokens,
        flops={
            "merged_per_image": merged_per_image,
            "unmerged_per_image": unmerged_per_image,
            "ratio": merged_per_image / unmerged_per_image if unmerged_per_image else None,
            "merged_per_layer": flops_merged.get("per_layer"),
            "unmerged_per_layer": flops_unmerged.get("per_layer"),
            "convention": flops_merged["convention"],
        },
        parity=parity, versions=versions(), created_unix=int(time.time()),
        model_name=model_name, checkpoint=checkpoint, pretrained=pretrained, model_kwargs=model_kwargs,
    )
    if graph == "plugin":
        manifest.plugin_nodes = describe_plugin_nodes(proto)
        manifest.plugin = {"namespace": plugin_spec.PLUGIN_NAMESPACE, "version": plugin_spec.PLUGIN_VERSION,
                           "domain": plugin_spec.DOMAIN}
    return manifest
