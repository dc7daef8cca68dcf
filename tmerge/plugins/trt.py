"""TensorRT plugin definitions for the merge nodes (``tmerge::BipartiteMerge``, ``tmerge::PiToMeMerge``).

Design choice: TensorRT's Python ``tensorrt.plugin`` API (Quickly Deployable Plugins, "QDP"), not
an IPluginV3 C++ library.

* The node's output shapes are symbolic expressions of its input shapes and integer attributes
  (``N - r``); with ``@trtp.register`` they are a few lines of Python that reuse
  :func:`tmerge.plugins.spec.output_shapes` — the same function the ONNX exporter and the tests
  use — instead of a second C++ implementation of the shape logic, the attribute parsing
  (PluginFieldCollection) and serialisation that IPluginV3 needs per op.
* ``@trtp.aot_impl`` (TensorRT >= 10.9) embeds a compiled kernel (PTX from Triton) in the engine:
  the serialized engine then runs without Python, from C++ (trtexec, Triton Inference Server) —
  the property that made a C++ library attractive. The kernel is the Triton merge kernel of the
  GPU issue; this module only defines the launch contract (:data:`AOT_KERNEL_MODULE`).
* ``@trtp.impl`` (JIT, Python at run time) runs :func:`tmerge.plugins.reference.reference_merge`,
  the shared PyTorch merge core, on TensorRT's buffers: correct by construction, for parity
  checks and for machines without the AOT kernel; engines built with it need Python + tmerge.
* The ONNX parser binds a node to a QDP plugin through ``plugin_namespace`` / ``plugin_version``
  (the node's op type is the plugin name; parsing QDP nodes needs TensorRT >= 10.6, and since
  10.10 the namespace may also come from the node's domain, ``tmerge`` here). Since TensorRT 10.7
  the parser prefers a registered plugin over an ONNX local function of the same name (before,
  it always inlined the function); without the plugin it still falls back to the function body,
  i.e. the portable merge. A node attribute ``aot`` (int) picks the AOT implementation when both
  exist. :func:`prepare_onnx_for_trt` sets it on a copy of the graph.

Nothing here imports TensorRT at module import; :func:`register_plugins` does, once.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import TmergeError
from .spec import ATTRIBUTES, OP_TYPES, PLUGIN_NAMESPACE, PLUGIN_VERSION, check_attrs, output_shapes

# The module that provides the ahead-of-time kernels (GPU issue). Contract:
#   compile_merge_kernel(op_type: str, attrs: dict, dtype: "float32"|"float16")
#       -> (kernel_name: bytes, ptx: bytes, launch: dict(grid=(gx, gy, gz) ints or callables of
#          the symbolic batch, block=(bx, by, bz), shared_mem=int), extra_args: list[int | str])
#   where an extra arg "B" means the batch size (a symbolic shape expression at build time).
AOT_KERNEL_MODULE = "tmerge.plugins.triton_merge"

TRT_ATTRS = {op: {k: t for k, t in attrs.items() if k not in ("plugin_namespace", "plugin_version")}
             for op, attrs in ATTRIBUTES.items()}
_REGISTERED: dict[str, bool] = {}


def plugin_id(op_type: str) -> str:
    return f"{PLUGIN_NAMESPACE}::{op_type}"


def full_attrs(op_type: str, trt_attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes as TensorRT hands them to the plugin (the parser consumes plugin_namespace and
    plugin_version) -> the checked attribute dict of :mod:`tmerge.plugins.spec`."""
    attrs = {k: v for k, v in trt_attrs.items() if k in TRT_ATTRS[op_type]}
    attrs.update(plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)
    return check_attrs(op_type, attrs)


def output_dims(op_type: str, trt_attrs: dict[str, Any], x_dims, size_dims, keys_dims) -> list[tuple]:
    """Output dims from input dims (ints or TensorRT ShapeExpr objects)."""
    return output_shapes(op_type, full_attrs(op_type, trt_attrs), tuple(x_dims), tuple(size_dims), tuple(keys_dims))


def type_combinations() -> str:
    """The autotune type/format string: 3 inputs + 2 outputs, all fp32 or all fp16, linear."""
    return ", ".join(["FP32|FP16"] * 5)


def aot_kernel_available() -> bool:
    return importlib.util.find_spec(AOT_KERNEL_MODULE) is not None


def _dims(desc) -> list:
    return [desc.shape_expr[i] for i in range(desc.ndim)]


def _descs(op_type: str, x, size, keys, attrs: dict):
    x_out_dims, size_out_dims = output_dims(op_type, attrs, _dims(x), _dims(size), _dims(keys))
    x_out, size_out = x.like(), size.like()
    x_out.shape_expr[1] = x_out_dims[1]
    size_out.shape_expr[1] = size_out_dims[1]
    return x_out, size_out


def _jit(op_type: str, x, size, keys, attrs: dict, outputs, stream: int) -> None:
    import torch

    from .reference import reference_merge

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        xt, st, kt = (torch.as_tensor(t, device="cuda") for t in (x, size, keys))
        out, out_size = reference_merge(op_type, full_attrs(op_type, attrs), xt, st, kt)
        torch.as_tensor(outputs[0], device="cuda").copy_(out)
        torch.as_tensor(outputs[1], device="cuda").copy_(out_size)


def _aot(op_type: str, x, size, keys, attrs: dict, outputs):
    import tensorrt as trt
    import tensorrt.plugin as trtp

    try:
        kernels = importlib.import_module(AOT_KERNEL_MODULE)
    except ImportError as e:
        raise TmergeError(
            f"no ahead-of-time kernel for {plugin_id(op_type)} ({AOT_KERNEL_MODULE} is missing); "
            "build with aot=False to use the Python (JIT) plugin"
        ) from e
    dtype = "float16" if x.dtype == trt.float16 else "float32"
    name, ptx, launch, extra = kernels.compile_merge_kernel(op_type, full_attrs(op_type, attrs), dtype)
    batch = x.shape_expr[0]
    params = trtp.KernelLaunchParams()
    grid = [g(batch) if callable(g) else g for g in launch["grid"]]
    params.grid_x, params.grid_y, params.grid_z = grid
    params.block_x, params.block_y, params.block_z = launch["block"]
    params.shared_mem = launch.get("shared_mem", 0)
    args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(batch if a == "B" else a) for a in extra])
    return name, ptx, params, args


def register_plugins(aot: bool | None = None) -> dict[str, bool]:
    """Register both merge plugins with TensorRT (idempotent). ``aot`` None: AOT when the kernel
    module exists. Returns {plugin_id: aot}."""
    try:
        import tensorrt.plugin as trtp
    except ImportError as e:
        from ..export.tensorrt import TRT_MISSING

        raise TmergeError(TRT_MISSING) from e
    from typing import Tuple

    if aot is None:
        aot = aot_kernel_available()
    if _REGISTERED:
        return dict(_REGISTERED)

    # --- tmerge::BipartiteMerge (ToMe) ---
    @trtp.register(plugin_id("BipartiteMerge"))
    def _bm_desc(x: trtp.TensorDesc, size: trtp.TensorDesc, keys: trtp.TensorDesc, r: int, num_tokens: int,
                 num_prefix: int, class_token: int, layer: int, depth: int, merge_form: str
                 ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _descs("BipartiteMerge", x, size, keys, dict(
            r=r, num_tokens=num_tokens, num_prefix=num_prefix, class_token=class_token, layer=layer, depth=depth,
            merge_form=merge_form))

    @trtp.autotune(plugin_id("BipartiteMerge"))
    def _bm_tune(x, size, keys, outputs):
        return [trtp.AutoTuneCombination(type_combinations(), "LINEAR")]

    @trtp.impl(plugin_id("BipartiteMerge"))
    def _bm_impl(x: trtp.Tensor, size: trtp.Tensor, keys: trtp.Tensor, r: int, num_tokens: int, num_prefix: int,
                 class_token: int, layer: int, depth: int, merge_form: str, outputs: Tuple[trtp.Tensor],
                 stream: int) -> None:
        _jit("BipartiteMerge", x, size, keys, dict(
            r=r, num_tokens=num_tokens, num_prefix=num_prefix, class_token=class_token, layer=layer, depth=depth,
            merge_form=merge_form), outputs, stream)

    @trtp.aot_impl(plugin_id("BipartiteMerge"))
    def _bm_aot(x: trtp.TensorDesc, size: trtp.TensorDesc, keys: trtp.TensorDesc, r: int, num_tokens: int,
                num_prefix: int, class_token: int, layer: int, depth: int, merge_form: str,
                outputs: Tuple[trtp.TensorDesc], tactic: int):
        return _aot("BipartiteMerge", x, size, keys, dict(
            r=r, num_tokens=num_tokens, num_prefix=num_prefix, class_token=class_token, layer=layer, depth=depth,
            merge_form=merge_form), outputs)

    # --- tmerge::PiToMeMerge ---
    @trtp.register(plugin_id("PiToMeMerge"))
    def _pm_desc(x: trtp.TensorDesc, size: trtp.TensorDesc, keys: trtp.TensorDesc, r: int, num_tokens: int,
                 num_prefix: int, class_token: int, layer: int, depth: int, merge_form: str, margin: float,
                 alpha: float, bsm: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _descs("PiToMeMerge", x, size, keys, dict(
            r=r, num_tokens=num_tokens, num_prefix=num_prefix, class_token=class_token, layer=layer, depth=depth,
            merge_form=merge_form, margin=margin, alpha=alpha, bsm=bsm))

    @trtp.autotune(plugin_id("PiToMeMerge"))
    def _pm_tune(x, size, keys, outputs):
        return [trtp.AutoTuneCombination(type_combinations(), "LINEAR")]

    @trtp.impl(plugin_id("PiToMeMerge"))
    def _pm_impl(x: trtp.Tensor, size: trtp.Tensor, keys: trtp.Tensor, r: int, num_tokens: int, num_prefix: int,
                 class_token: int, layer: int, depth: int, merge_form: str, margin: float, alpha: float, bsm: int,
                 outputs: Tuple[trtp.Tensor], stream: int) -> None:
        _jit("PiToMeMerge", x, size, keys, dict(
            r=r, num_tokens=num_tokens, num_prefix=num_prefix, class_token=class_token, layer=layer, depth=depth,
            merge_form=merge_form, margin=margin, alpha=alpha, bsm=bsm), outputs, stream)

    @trtp.aot_impl(plugin_id("PiToMeMerge"))
    def _pm_aot(x: trtp.TensorDesc, size: trtp.TensorDesc, keys: trtp.TensorDesc, r: int, num_tokens: int,
                num_prefix: int, class_token: int, layer: int, depth: int, merge_form: str, margin: float,
                alpha: float, bsm: int, outputs: Tuple[trtp.TensorDesc], tactic: int):
        return _aot("PiToMeMerge", x, size, keys, dict(
            r=r, num_tokens=num_tokens, num_prefix=num_prefix, class_token=class_token, layer=layer, depth=depth,
            merge_form=merge_form, margin=margin, alpha=alpha, bsm=bsm), outputs)

    for op in OP_TYPES.values():
        _REGISTERED[plugin_id(op)] = bool(aot)
    return dict(_REGISTERED)


def prepare_onnx_for_trt(proto, *, aot: bool):
    """A copy of a plugin graph for TensorRT's parser: every ``tmerge`` node gets ``aot`` (int), so
    the parser picks the ahead-of-time or the JIT implementation. The function bodies stay (the
    parser prefers the registered plugin for a node carrying ``plugin_namespace``)."""
    import onnx
    from onnx import helper

    from .spec import DOMAIN

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
        node.attribute.append(helper.make_attribute("aot", int(bool(aot))))
        count += 1
    for fn in out.functions:
        if fn.domain == DOMAIN and "aot" not in fn.attribute:
            fn.attribute.append("aot")
    if count == 0:
        raise TmergeError("the ONNX graph has no tmerge plugin nodes; export it with --ops plugin")
    return out
