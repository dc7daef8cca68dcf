"""What a merge plugin node is: op name, attributes, inputs/outputs and output shapes.

Pure Python (no TensorRT, no ONNX): the ONNX exporter writes nodes from these specs, the TensorRT
plugin definitions (:mod:`tmerge.plugins.trt`) read the same attributes back and compute the same
output shapes, and both are unit-tested against each other without TensorRT.

One merge = one node ``tmerge::<op_type>`` with

* inputs ``x`` (B, N, C) tokens after the attention residual, ``size`` (B, N, 1) token sizes,
  ``keys`` (B, H, N, head_dim) attention keys after the block's q/k norm (the metric source);
* outputs ``x_out`` (B, N - r, C), ``size_out`` (B, N - r, 1); the verification graph has a third
  output ``slots`` (B, N) int64 (where each input token went), stripped before the file is written;
* attributes: ``plugin_namespace`` ("tmerge"), ``plugin_version`` ("1"), ``r``, ``num_tokens`` (N),
  ``num_prefix`` (class/distillation/register tokens that never merge), ``class_token`` (0/1),
  ``layer``, ``depth``, ``merge_form`` ("gather"/"scatter"/"onehot") and the method's own
  ``plugin_attrs`` (declared in its file under :mod:`tmerge.merging.methods`; PiToMe: ``margin`` of
  this layer, ``alpha``, ``bsm``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import TmergeError
from ..merging import registry
from ..merging.ops import DEFAULT_FORM, check_form

PLUGIN_NAMESPACE = "tmerge"
PLUGIN_VERSION = "1"
DOMAIN = "tmerge"
DOMAIN_VERSION = 1

INPUTS = ("x", "size", "keys")
OUTPUTS = ("x_out", "size_out")
VERIFY_OUTPUTS = (*OUTPUTS, "slots")

# attributes every merge node carries (name -> python type); each op adds its method's plugin_attrs
COMMON_ATTRS: dict[str, type] = {
    "plugin_namespace": str, "plugin_version": str, "r": int, "num_tokens": int, "num_prefix": int,
    "class_token": int, "layer": int, "depth": int, "merge_form": str,
}


def plugin_methods() -> dict[str, type]:
    """ONNX op type (= TensorRT plugin name) -> the method class that declares it (its
    ``plugin_op``; subclasses that inherit it, like DTEM from ToMe, export the same node)."""
    owners: dict[str, type] = {}
    for cls in registry.available().values():
        op = cls.__dict__.get("plugin_op")
        if op is None:
            continue
        if op in owners and owners[op] is not cls:
            raise TmergeError(f"merge op {op!r} is declared by both {owners[op].name} and {cls.name}")
        owners[op] = cls
    return owners


def op_types() -> dict[str, str]:
    """Method name -> op type of its merge node, for the methods that have one."""
    return {name: cls.plugin_op for name, cls in registry.available().items() if cls.plugin_op}


def attributes(op_type: str) -> dict[str, type]:
    """Attribute name -> python type of an op's node, in node (and TensorRT signature) order."""
    owners = plugin_methods()
    if op_type not in owners:
        raise TmergeError(f"unknown merge op {op_type!r}; known: {', '.join(owners)}")
    return {**COMMON_ATTRS, **owners[op_type].plugin_attrs}


def __getattr__(name: str):
    # live views over the registered methods (a method registered later appears too)
    if name == "OP_TYPES":
        return op_types()
    if name == "ATTRIBUTES":
        return {op: attributes(op) for op in plugin_methods()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class MergeNodeSpec:
    """One merge node: op type and its attributes (all ONNX-serialisable scalars)."""

    op_type: str
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def overload(self) -> str:
        """ONNX function overload name: one body per layer (shapes are static per layer)."""
        return f"layer{self.attrs['layer']}"

    @property
    def num_out(self) -> int:
        return int(self.attrs["num_tokens"]) - int(self.attrs["r"])


def node_spec(method, *, layer: int, depth: int, r: int, num_tokens: int, num_prefix: int,
              class_token: bool, merge_form: str = DEFAULT_FORM) -> MergeNodeSpec:
    """The plugin node for ``method`` (a :class:`tmerge.merging.MergeMethod`) at one block."""
    name = getattr(method, "name", str(method))
    op_type = getattr(method, "plugin_op", None)
    if op_type is None:
        raise TmergeError(
            f"method {name!r} has no merge plugin (plugins exist for {', '.join(op_types())}); use --graph portable"
        )
    if not 0 < r <= (num_tokens - num_prefix) // 2:
        raise TmergeError(f"layer {layer}: r={r} is impossible for {num_tokens} tokens with {num_prefix} prefix tokens")
    attrs: dict[str, Any] = {
        "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION, "r": int(r),
        "num_tokens": int(num_tokens), "num_prefix": int(num_prefix), "class_token": int(bool(class_token)),
        "layer": int(layer), "depth": int(depth), "merge_form": str(merge_form),
    }
    attrs.update(method.plugin_attr_values(layer))
    return MergeNodeSpec(op_type, attrs)


def check_attrs(op_type: str, attrs: dict[str, Any]) -> dict[str, Any]:
    """Validate and normalise the attributes of a node (as read back from ONNX or by TensorRT).

    Strings may arrive as bytes and with the trailing NUL that TensorRT's ONNX parser appends;
    numbers may arrive as one-element arrays (the parser's plugin fields)."""
    expected = attributes(op_type)
    missing = sorted(set(expected) - set(attrs))
    extra = sorted(set(attrs) - set(expected))
    if missing or extra:
        raise TmergeError(f"{op_type}: missing attributes {missing}, unexpected {extra}")
    out = {}
    for key, typ in expected.items():
        value = attrs[key]
        if typ is str:
            value = (value.decode() if isinstance(value, bytes) else str(value)).rstrip("\x00")
        elif getattr(value, "ndim", 0):  # a one-element numpy array
            if value.size != 1:
                raise TmergeError(f"{op_type}: attribute {key} has {value.size} values, expected one")
            value = value.reshape(-1)[0]
        out[key] = typ(value)
    if out["plugin_namespace"] != PLUGIN_NAMESPACE or out["plugin_version"] != PLUGIN_VERSION:
        raise TmergeError(f"{op_type}: plugin {out['plugin_namespace']}/{out['plugin_version']} is not "
                          f"{PLUGIN_NAMESPACE}/{PLUGIN_VERSION}")
    if not 0 < out["r"] <= (out["num_tokens"] - out["num_prefix"]) // 2:
        raise TmergeError(f"{op_type}: r={out['r']} is impossible for {out['num_tokens']} tokens")
    check_form(out["merge_form"])
    return out


def output_shapes(op_type: str, attrs: dict[str, Any], x_shape, size_shape, keys_shape,
                  with_slots: bool = False) -> list[tuple]:
    """Output shapes from input shapes; dims may be ints or symbolic objects supporting ``- int``
    (TensorRT shape expressions). Batch (dim 0) passes through unchanged."""
    a = check_attrs(op_type, attrs)
    b, n, c = x_shape
    if isinstance(n, int) and n != a["num_tokens"]:
        raise TmergeError(f"{op_type}: x has {n} tokens, the node was built for {a['num_tokens']}")
    if len(size_shape) != 3 or len(keys_shape) != 4:
        raise TmergeError(f"{op_type}: size must be (B, N, 1) and keys (B, H, N, D)")
    n_out = n - a["r"]
    shapes = [(b, n_out, c), (b, n_out, 1)]
    if with_slots:
        shapes.append((b, n))
    return shapes
