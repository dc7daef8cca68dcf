"""Import-time workarounds that must run before timm (and through it torchvision) is imported."""

import torch


def declare_torchvision_ops() -> None:
    """Let a CUDA build of torchvision import on a CPU-only torch.

    PyPI's torchvision wheels are CUDA builds; on the CPU torch wheel their C++ extension does not
    register its operator schemas, and `import torchvision` (pulled in by timm) fails with
    "operator torchvision::nms does not exist" when torchvision registers its fake kernels. Declaring
    the two schemas first is enough: timm never calls these ops.
    """
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return
    except RuntimeError:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    declare_torchvision_ops.library = lib  # keep the registration alive


declare_torchvision_ops()
