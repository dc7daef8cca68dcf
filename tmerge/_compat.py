"""Import-time workarounds that must run before timm (and through it torchvision) is imported."""

import importlib.util
import sys

import torch

MISSING_SCHEMA = "operator torchvision::nms does not exist"


def import_torchvision() -> None:
    """Import torchvision, declaring its operator schemas first only where that is what it lacks.

    PyPI's torchvision wheels are CUDA builds; on the CPU torch wheel their C++ extension does not
    register its operator schemas, and `import torchvision` (pulled in by timm) fails with
    "operator torchvision::nms does not exist" when torchvision registers its fake kernels. Declaring
    the two schemas and importing again is enough there: timm never calls these ops. Where
    torchvision's own extension loads (a CUDA install, or a CPU torch with a matching CPU build), it
    registers those schemas itself and a second declaration would abort the process, so nothing is
    declared unless the import has failed for exactly that reason.
    """
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as e:
        if MISSING_SCHEMA not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import_torchvision.library = lib  # keep the registration alive
    import torchvision  # noqa: F401,F811


import_torchvision()
