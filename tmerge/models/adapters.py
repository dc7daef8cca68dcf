"""Adapters: the learned parameters of a DTEM / LTM merge, as a small safetensors file.

The file holds the method module's state dict (:func:`tmerge.patch.merge_method`) and string metadata:
``format`` ("tmerge-adapter"), ``format_version``, and JSON-encoded ``method``, ``options``,
``weights_sha256`` (of the unmerged backbone), ``arch``, ``schedule`` (spec), ``r`` (per block),
``tokens``, ``prop_attn``, plus whatever the trainer adds (model name, training data summary, steps,
final loss, held-out drift, seed...). :func:`load_adapter` refuses an adapter whose method, backbone
weights, per-block schedule (or, for an adapter trained on a range of r, whose ``r_range`` the
schedule exceeds) or proportional-attention setting differ from the patched model's.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .._io import atomic_paths, existing_file
from ..errors import TmergeError
from ..patch import merge_info, merge_method
from .hashing import backbone_sha256, file_sha256

FORMAT = "tmerge-adapter"
FORMAT_VERSION = 1
# adapters trained for the embedded default model ship with the package (benchmarks/train_default_adapters.py)
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "models" / "adapters"


def shipped_adapter_name(method: str) -> str:
    return f"dinov2-s14-{method}.safetensors"


def shipped_adapter(model: nn.Module, method: str) -> Path | None:
    """The adapter shipped for ``method`` when ``model`` has the weights it was trained on, else None."""
    from safetensors import safe_open

    path = SHIPPED_DIR / shipped_adapter_name(method)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        trained_on = json.loads((f.metadata() or {}).get("weights_sha256", "null"))
    return path if trained_on == backbone_sha256(model) else None


def training_only_options(method) -> set[str]:
    """Options of a merge method (class or instance) that only shape training (their help starts with
    "training:"); an adapter loads whatever their values, since the inference merge ignores them."""
    return {name for name, opt in method.options.items() if opt.help.startswith("training:")}


def _arch(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture")


def _require_patched(model: nn.Module, what: str):
    info = merge_info(model)
    if info["method"] == "none":
        raise TmergeError(f"{what} needs a merged model: pass --method dtem or --method ltm with the adapter")
    return info


def save_adapter(model: nn.Module, path: str | Path, metadata: dict | None = None, *,
                 weights_sha256: str | None = None) -> Path:
    """Write the learned parameters of ``model``'s merge method and ``metadata`` to ``path``."""
    info = _require_patched(model, "saving an adapter")
    state = {k: v.detach().to("cpu").contiguous() for k, v in merge_method(model).state_dict().items()}
    if not state:
        raise TmergeError(f"method {info['method']} has no learned parameters to save")
    meta = dict(metadata or {})
    meta.update({
        "method": info["method"], "options": info["options"], "schedule": info["schedule"], "r": info["r"],
        "tokens": info["tokens"], "prop_attn": info["prop_attn"], "arch": _arch(model),
        "weights_sha256": weights_sha256 or backbone_sha256(model),
    })
    strings = {k: json.dumps(v, default=str) for k, v in meta.items()}
    strings.update(format=FORMAT, format_version=str(FORMAT_VERSION))
    path = Path(path)
    with atomic_paths([path], mkdir=True) as (tmp,):
        save_file(state, str(tmp), metadata=strings)
        _sort_header(Path(tmp))
    return path


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys: safetensors writes its metadata map in a
    random order per process, and the same training must give the same bytes."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + size:])


def read_adapter(path: str | Path) -> tuple[dict, dict]:
    """(state dict, metadata) of an adapter file; a TmergeError when it is missing or not an adapter."""
    path = existing_file(path, "adapter")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise TmergeError(f"adapter {path} could not be read ({type(e).__name__}: {e})") from e
    if raw.get("format") != FORMAT:
        raise TmergeError(f"{path} is not a tmerge adapter (no '{FORMAT}' metadata); make one with `tmerge train`")
    if int(raw.get("format_version", "0")) > FORMAT_VERSION:
        raise TmergeError(f"adapter {path} has format version {raw['format_version']}; this tmerge reads <= {FORMAT_VERSION}")
    meta = {}
    for k, v in raw.items():
        if k in ("format", "format_version"):
            continue
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return state, meta


def load_adapter(model: nn.Module, path: str | Path) -> dict:
    """Load an adapter into a model patched with the same method and schedule; returns its metadata.

    Errors (TmergeError, one line each) when the model is not merged, or the adapter was trained for
    another method, other backbone weights, another per-block schedule, proportional-attention
    setting or method options, or its tensors do not fit the method.
    """
    info = _require_patched(model, "--adapter")
    state, meta = read_adapter(path)
    name = Path(path).name
    if meta.get("method") != info["method"]:
        raise TmergeError(
            f"adapter {name} was trained for method {meta.get('method')!r} but the model uses {info['method']!r}; "
            f"pass --method {meta.get('method')}"
        )
    sha = backbone_sha256(model)
    if meta.get("weights_sha256") != sha:
        trained_on = meta.get("model") or meta.get("arch") or "another model"
        raise TmergeError(
            f"adapter {name} was trained on {trained_on} (weights sha256 {str(meta.get('weights_sha256'))[:12]}) "
            f"but this model's weights are {sha[:12]} ({_arch(model)}); train an adapter for this model"
        )
    r_range = meta.get("r_range")
    if r_range:  # trained with r sampled from a range: serves any schedule whose r stays within it
        if max(info["r"]) > r_range[1]:
            raise TmergeError(f"adapter {name} was trained for r = {r_range[0]}..{r_range[1]} but the model "
                              f"merges up to {max(info['r'])} tokens per block; pass --r <= {r_range[1]}")
    elif list(meta.get("r") or []) != list(info["r"]):
        raise TmergeError(
            f"adapter {name} was trained with schedule {meta.get('schedule')} (r per block {meta.get('r')}) "
            f"but the model uses {info['schedule']} (r per block {info['r']}); pass the same --r/--schedule"
        )
    if bool(meta.get("prop_attn")) != bool(info["prop_attn"]):
        flag = "--prop-attn" if meta.get("prop_attn") else "--no-prop-attn"
        raise TmergeError(f"adapter {name} was trained with proportional attention "
                          f"{'on' if meta.get('prop_attn') else 'off'}; pass {flag}")
    ignored = training_only_options(merge_method(model))
    trained_with = {k: v for k, v in (meta.get("options") or {}).items() if k not in ignored}
    if meta.get("options") is not None and trained_with != {k: v for k, v in info["options"].items() if k not in ignored}:
        given = " ".join(f"-o {k}={json.dumps(v)}" for k, v in trained_with.items() if v is not None)
        raise TmergeError(f"adapter {name} was trained with method options {meta['options']} but the model "
                          f"uses {info['options']}; pass {given or 'the same options'}")
    method = merge_method(model)
    expected = method.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        detail = "; ".join(x for x in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            f"shape {', '.join(shapes[:3])}" if shapes else "",
        ) if x)
        raise TmergeError(f"adapter {name} does not fit this {info['method']} configuration "
                          f"(options {meta.get('options')} vs {info['options']}): {detail}")
    ref = next(iter(expected.values()))
    method.load_state_dict({k: v.to(device=ref.device, dtype=expected[k].dtype) for k, v in state.items()})
    method.adapter = {"path": str(path), "sha256": file_sha256(path),
                      "shipped": Path(path).resolve().parent == SHIPPED_DIR,
                      **{k: meta.get(k) for k in ("model", "steps", "final_loss", "data", "r_range")}}
    return meta
