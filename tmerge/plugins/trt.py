"""TensorRT plugin definitions for the merge nodes, generated from :mod:`tmerge.plugins.spec`.

Design choice: TensorRT's Python ``tensorrt.plugin`` API (Quickly Deployable Plugins, "QDP"), not
an IPluginV3 C++ library.

* One plugin per merge op of :func:`tmerge.plugins.spec.plugin_methods` (``tmerge::BipartiteMerge``,
  ``tmerge::PiToMeMerge``, ...). Its functions are generated from the op's attribute list, so a
  method that declares ``plugin_op`` / ``plugin_attrs`` in its own file gets a plugin with no code here.
* The output shapes are symbolic expressions of the input shapes and integer attributes (``N - r``),
  computed by :func:`tmerge.plugins.spec.output_shapes`, the function the ONNX exporter and the tests use.
* The implementation is ``@trtp.impl`` (JIT: a Python callback at run time). It runs
  :func:`tmerge.plugins.reference.reference_merge`, the shared PyTorch merge core, on TensorRT's
  buffers and stream, so an engine with these plugins needs Python, PyTorch and tmerge (with
  :func:`register_tensorrt_plugins` called) wherever it is deserialized and run; trtexec or Triton
  Inference Server alone cannot run it. An ahead-of-time implementation (``@trtp.aot_impl``, a
  compiled kernel embedded in the engine) would lift that; it needs a GPU merge kernel, not written yet.

What TensorRT's own code requires (read in NVIDIA/TensorRT ``python/packaging/bindings_wheel/tensorrt/
plugin/`` 10.9 - 11.4 and onnx-tensorrt; checked in CI by ``tests/plugins/test_trt_contract.py``, which
runs that code on CPU):

* The decorators read annotations with ``inspect.signature`` and call ``issubclass`` on them: real
  classes, so no ``from __future__ import annotations`` in this module. Parameter names are checked
  too (tensors, then attributes in registration order, then ``outputs`` / ``stream``).
* The ONNX parser forwards only the attributes the plugin declares, INT as int32[1], FLOAT as
  float32[1] and STRING as its bytes plus a trailing NUL. Numbers are declared as one-element numpy
  arrays: with ``int``/``float`` annotations TensorRT < 11.3 converts them with ``int(array)``, which
  NumPy >= 2.4 rejects. :func:`tmerge.plugins.spec.check_attrs` unwraps them and strips the NUL.
* The parser binds a node carrying ``plugin_namespace`` to the registered plugin; ONNX local functions
  are looked up by op type only, so the per-layer function bodies would all collapse to the first
  layer's. :func:`prepare_onnx_for_trt` therefore drops them: without the plugins, parsing fails
  with TensorRT's "Plugin not found" instead of building a wrong engine.
* The parser turns a node attribute ``aot`` into the creation request: ``aot=0`` asks for the JIT
  implementation strictly, whatever the network's ``PREFER_*_PYTHON_PLUGINS`` flags say (see
  :func:`prepare_onnx_for_trt`).

Nothing here imports TensorRT at module import; :func:`register_tensorrt_plugins` does.
"""

import inspect
from typing import Any, Callable, List, Tuple

import numpy as np
import numpy.typing as npt

from ..errors import TmergeError
from .reference import reference_merge
from .spec import DOMAIN, INPUTS, PLUGIN_NAMESPACE, PLUGIN_VERSION, attributes, check_attrs, output_shapes, plugin_methods

TRT_MISSING = ("TensorRT is not installed: pip install 'tmerge[trt]' (tensorrt>=10.9,<11) on a machine with an "
               "NVIDIA GPU")
# How each attribute type is declared to TensorRT (see the module docstring).
TRT_ANNOTATIONS = {int: npt.NDArray[np.int32], float: npt.NDArray[np.float32], str: str}


def plugin_id(op_type: str) -> str:
    return f"{PLUGIN_NAMESPACE}::{op_type}"


def trt_attributes(op_type: str) -> dict[str, type]:
    """The attributes TensorRT hands the plugin, in signature order (the parser consumes
    plugin_namespace / plugin_version to find the plugin)."""
    return {k: t for k, t in attributes(op_type).items() if k not in ("plugin_namespace", "plugin_version")}


def full_attrs(op_type: str, trt_attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes as TensorRT hands them to the plugin -> the checked attribute dict of
    :mod:`tmerge.plugins.spec`."""
    return check_attrs(op_type, {**trt_attrs, "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION})


def _dim(expr):
    """A TensorRT shape expression as an int when it is a build-time constant, else unchanged."""
    if isinstance(expr, int) or getattr(expr, "is_fake", True) or not expr.is_constant:
        return expr
    return int(expr.constant_value())


def output_dims(op_type: str, trt_attrs: dict[str, Any], x_dims, size_dims, keys_dims) -> list[tuple]:
    """Output dims from input dims (ints or TensorRT shape expressions)."""
    return output_shapes(op_type, full_attrs(op_type, trt_attrs), *(tuple(_dim(d) for d in dims)
                                                                    for dims in (x_dims, size_dims, keys_dims)))


def type_combinations() -> str:
    """The autotune type string: every input and output fp32, or every one fp16."""
    return ", ".join(["FP32|FP16"] * (len(INPUTS) + 2))


def _output_descs(op_type: str, x, size, keys, attrs: dict):
    (_, n_out, _), _ = output_dims(op_type, attrs, x.shape_expr, size.shape_expr, keys.shape_expr)
    x_out, size_out = x.like(), size.like()
    x_out.shape_expr[1] = n_out
    size_out.shape_expr[1] = n_out
    return x_out, size_out


def _jit(op_type: str, x, size, keys, attrs: dict, outputs, stream: int) -> None:
    import torch

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        xt, st, kt = (torch.as_tensor(t, device="cuda") for t in (x, size, keys))
        out, out_size = reference_merge(op_type, full_attrs(op_type, attrs), xt, st, kt)
        torch.as_tensor(outputs[0], device="cuda").copy_(out)
        torch.as_tensor(outputs[1], device="cuda").copy_(out_size)


def _function(name: str, params: list, returns, body: Callable[[dict], Any]):
    """A function whose signature is exactly ``params`` (name, annotation) -> ``returns`` (TensorRT
    inspects both) and that passes its arguments to ``body`` as one dict by name."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature([inspect.Parameter(n, kind, annotation=a) for n, a in params],
                                  return_annotation=returns)

    def function(*args, **kwargs):
        return body(signature.bind(*args, **kwargs).arguments)

    function.__signature__ = signature
    function.__name__ = function.__qualname__ = name
    return function


def plugin_functions(trtp, op_type: str) -> dict[str, Callable]:
    """The functions of one plugin, by decorator name: register (output descriptors), autotune
    and impl (JIT)."""
    attrs = [(k, TRT_ANNOTATIONS[t]) for k, t in trt_attributes(op_type).items()]
    descs = [(n, trtp.TensorDesc) for n in INPUTS]
    out_descs = ("outputs", Tuple[trtp.TensorDesc, trtp.TensorDesc])

    def attr_values(a: dict) -> dict:
        return {k: a[k] for k, _ in attrs}

    return {
        "register": _function(
            f"{op_type}_outputs", descs + attrs, Tuple[trtp.TensorDesc, trtp.TensorDesc],
            lambda a: _output_descs(op_type, a["x"], a["size"], a["keys"], attr_values(a))),
        "autotune": _function(
            f"{op_type}_autotune", [*descs, out_descs], List[trtp.AutoTuneCombination],
            lambda a: [trtp.AutoTuneCombination(type_combinations(), "LINEAR")]),
        "impl": _function(
            f"{op_type}_jit", [(n, trtp.Tensor) for n in INPUTS] + attrs
            + [("outputs", Tuple[trtp.Tensor, trtp.Tensor]), ("stream", int)], None,
            lambda a: _jit(op_type, a["x"], a["size"], a["keys"], attr_values(a), a["outputs"], a["stream"])),
    }


def _is_registered(trtp, op_type: str) -> bool:
    return hasattr(getattr(trtp.op, PLUGIN_NAMESPACE, None), op_type)


def register_tensorrt_plugins() -> list[str]:
    """Register every merge plugin (its JIT implementation) with TensorRT: what building or running
    an engine of a plugin graph needs first. Safe to call again, also after a failed attempt.
    Returns the plugin ids."""
    try:
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise TmergeError(TRT_MISSING) from e
    for op_type in plugin_methods():
        pid = plugin_id(op_type)
        functions = plugin_functions(trtp, op_type)
        if not _is_registered(trtp, op_type):  # a plugin name can be registered once per process
            trtp.register(pid)(functions["register"])
        trtp.autotune(pid)(functions["autotune"])
        trtp.impl(pid)(functions["impl"])
    return [plugin_id(op) for op in plugin_methods()]


def prepare_onnx_for_trt(proto):
    """A copy of a plugin graph for TensorRT's parser: every ``tmerge`` node gets ``aot=0`` and the
    ``tmerge`` local functions are dropped (the parser keys them by op type only: every layer would
    run layer 0's body).

    ``aot=0``: onnx-tensorrt (``createPlugin`` in importerUtils.cpp) maps a node's ``aot`` attribute
    to a strict request, 0 -> ``QuickPluginCreationRequest.STRICT_JIT``, ahead of the network's
    ``PREFER_AOT/JIT_PYTHON_PLUGINS`` flags. Without it the request is left to those flags, which
    TensorRT documents as choosing only for a plugin that has both implementations. STRICT_JIT names
    the implementation these engines run, whatever else is registered under the plugin's id, and
    TensorRT fails the parse ("JIT implementation requested, but not defined") if it is missing. The
    parser does not forward ``aot`` to the plugin (it is not a declared attribute)."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    count = 0
    for node in out.graph.node:
        if node.domain != DOMAIN:
            continue
        for i, a in enumerate(node.attribute):
            if a.name == "aot":
                del node.attribute[i]
                break
        node.attribute.append(helper.make_attribute("aot", 0))
        count += 1
    if count == 0:
        raise TmergeError("the ONNX graph has no tmerge plugin nodes; export it with --graph plugin")
    keep = [fn for fn in out.functions if fn.domain != DOMAIN]
    del out.functions[:]
    out.functions.extend(keep)
    return out
