"""Merge plugins: node specs shared by the ONNX exporter and TensorRT (:mod:`tmerge.plugins.spec`),
and the TensorRT plugin definitions (:mod:`tmerge.plugins.trt`; TensorRT is imported only by
:func:`register_tensorrt_plugins`, the one call that building or running a plugin engine needs)."""

from .spec import DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION, MergeNodeSpec, attributes, check_attrs, node_spec, op_types, output_shapes, plugin_methods
from .trt import register_tensorrt_plugins

__all__ = ["DOMAIN", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "MergeNodeSpec", "attributes", "check_attrs",
           "node_spec", "op_types", "output_shapes", "plugin_methods", "register_tensorrt_plugins"]
