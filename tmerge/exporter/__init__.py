"""Export merged models: ONNX (portable / plugin nodes) and TensorRT engines."""

from .onnx import ExportResult, export_onnx


def export(*args, **kwargs):
    from .api import export as _export

    return _export(*args, **kwargs)


__all__ = ["ExportResult", "export", "export_onnx"]
