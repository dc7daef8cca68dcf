"""Optional dependencies, imported lazily: a missing one is a one-line error naming the extra.

``require("onnxruntime")`` returns the module or raises :class:`~tmerge.errors.TmergeError` with
"onnxruntime is not installed: pip install 'tmerge[onnx]'". Commands that do not need a package
never import it, so a missing extra never breaks them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import TmergeError

# import name -> (name users know it by, extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "onnx": ("onnx", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "onnx_ir": ("onnxscript", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "openvino": ("openvino", "onnx"),
    "tensorrt": ("tensorrt", "trt"),
    "matplotlib": ("matplotlib", "report"),
    "skimage": ("scikit-image", "data"),
    "sklearn": ("scikit-learn", "data"),
    "PIL": ("pillow", "data"),
}


def missing_extra(module: str, extra: str | None = None) -> TmergeError:
    """The error for an optional dependency that is not installed."""
    known = EXTRAS.get(module.split(".")[0])
    name = known[0] if known else module
    extra = extra or (known[1] if known else None)
    hint = f": pip install 'tmerge[{extra}]'" if extra else ""
    return TmergeError(f"{name} is not installed{hint}")


def require(*modules: str) -> ModuleType:
    """Import ``modules`` (in order) and return the first; a missing one raises :func:`missing_extra`."""
    loaded = []
    for name in modules:
        try:
            loaded.append(importlib.import_module(name))
        except ImportError as e:
            missing = (getattr(e, "name", None) or name).split(".")[0]
            raise missing_extra(missing if missing in EXTRAS else name.split(".")[0]) from e
    return loaded[0]


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (extra ``report``)."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg", force=False)
    return importlib.import_module("matplotlib.pyplot")
