"""Merge plugins: node specs shared by the ONNX exporter and TensorRT (:mod:`tmerge.plugins.spec`),
and the TensorRT plugin definitions (:mod:`tmerge.plugins.trt`, imported lazily: needs tensorrt)."""

from .spec import (DOMAIN, OP_TYPES, PLUGIN_NAMESPACE, PLUGIN_VERSION, MergeNodeSpec, check_attrs, node_spec,
                   output_shapes)

__all__ = ["DOMAIN", "OP_TYPES", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "MergeNodeSpec", "check_attrs",
           "node_spec", "output_shapes"]
