"""A stand-in for TensorRT's compiled core (``tensorrt.so``), just enough to run TensorRT's own
pure-Python plugin layer (``tensorrt.plugin`` from the ``tensorrt-cu12-bindings`` wheel) on CPU.

It holds only what plugin registration, plugin creation and the shape / type / format / launch
callbacks touch, with the behaviour of the pybind11 bindings (NVIDIA/TensorRT
``python/src/infer/pyPlugin.cpp``): a ``PluginField``'s ``data`` is a numpy array of ``size`` entries
whose dtype follows the field type (``CHAR`` -> int8), the plugin registry finds a creator by name,
version and namespace, and shape expressions are built by an expression builder. Shape expressions
here are small symbolic trees that a test evaluates for a given batch size.

:func:`plugin_layer` loads a wheel's ``tensorrt_bindings/plugin`` package as ``tensorrt.plugin`` on
top of a fresh stand-in (a fresh plugin registry each time) and removes both afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import importlib.util
import operator
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


float32, float16, int8, int32, int64, bfloat16 = (DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32,
                                                  DataType.INT64, DataType.BF16)

_NP_TYPES = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
             DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}


def nptype(dtype: DataType):
    return _NP_TYPES[dtype]


class TensorFormat(enum.IntEnum):
    LINEAR = 0
    CHW2 = 1
    HWC8 = 2
    CHW4 = 3
    CHW16 = 4
    CHW32 = 5
    DHWC8 = 6
    CDHW32 = 7
    HWC = 8
    DLA_LINEAR = 9
    DLA_HWC4 = 10
    HWC16 = 11
    DHWC = 12


class PluginFieldType(enum.IntEnum):
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10
    FP8 = 11
    INT4 = 12
    FP4 = 13


_FIELD_DTYPES = {PluginFieldType.INT32: np.int32, PluginFieldType.UNKNOWN: np.int8, PluginFieldType.INT8: np.int8,
                 PluginFieldType.INT16: np.int16, PluginFieldType.FLOAT32: np.float32,
                 PluginFieldType.FLOAT64: np.float64, PluginFieldType.INT64: np.int64,
                 PluginFieldType.CHAR: np.int8}


class PluginField:
    """name, the caller's buffer and its number of entries; ``data`` reads the buffer as the type says."""

    def __init__(self, name: str = "", data=None, type: PluginFieldType = PluginFieldType.UNKNOWN):  # noqa: A002
        self.name, self.type = name, type
        buffer = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else np.asarray(data)
        self.size = int(buffer.size)
        self._bytes = buffer.tobytes()

    @property
    def data(self) -> np.ndarray:
        if self.type not in _FIELD_DTYPES:
            raise AttributeError("No known conversion for returning data from PluginField")
        return np.frombuffer(self._bytes, _FIELD_DTYPES[self.type], count=self.size).copy()


class PluginFieldCollection(list):
    pass


class TensorRTPhase(enum.IntEnum):
    BUILD = 0
    RUNTIME = 1


class QuickPluginCreationRequest(enum.IntEnum):
    UNKNOWN = 0
    PREFER_JIT = 1
    PREFER_AOT = 2
    STRICT_JIT = 3
    STRICT_AOT = 4


class DimensionOperation(enum.IntEnum):
    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    EQUAL = 5
    LESS = 6
    FLOOR_DIV = 7
    CEIL_DIV = 8


_OPS = {DimensionOperation.SUM: operator.add, DimensionOperation.PROD: operator.mul, DimensionOperation.MAX: max,
        DimensionOperation.MIN: min, DimensionOperation.SUB: operator.sub,
        DimensionOperation.EQUAL: lambda a, b: int(a == b), DimensionOperation.LESS: lambda a, b: int(a < b),
        DimensionOperation.FLOOR_DIV: operator.floordiv, DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b)}


class IDimensionExpr:
    """A constant, a named symbol (e.g. the batch), or an operation on two expressions."""

    def __init__(self, value: int | None = None, symbol: str | None = None, op=None, args=()):
        self._value, self._symbol, self._op, self._args = value, symbol, op, args

    def is_constant(self) -> bool:
        return self._value is not None

    def get_constant_value(self) -> int:
        return self._value

    def evaluate(self, **symbols: int) -> int:
        if self._value is not None:
            return self._value
        if self._symbol is not None:
            return symbols[self._symbol]
        return _OPS[self._op](*(a.evaluate(**symbols) for a in self._args))


class IExprBuilder:
    def constant(self, value: int) -> IDimensionExpr:
        return IDimensionExpr(int(value))

    def operation(self, op: DimensionOperation, first: IDimensionExpr, second: IDimensionExpr) -> IDimensionExpr:
        if first.is_constant() and second.is_constant():
            return IDimensionExpr(_OPS[op](first.get_constant_value(), second.get_constant_value()))
        return IDimensionExpr(op=op, args=(first, second))


class DimsExprs(list):
    def __init__(self, length_or_exprs=0):
        super().__init__([None] * length_or_exprs if isinstance(length_or_exprs, int) else length_or_exprs)


class Dims(tuple):
    MAX_DIMS = 8

    def __new__(cls, shape=()):
        return super().__new__(cls, [0] * shape if isinstance(shape, int) else shape)


class PluginTensorDesc:
    def __init__(self, dims=(), type=DataType.FLOAT, format=TensorFormat.LINEAR, scale=1.0):  # noqa: A002
        self.dims, self.type, self.format, self.scale = Dims(dims), type, format, scale


class DynamicPluginTensorDesc:
    def __init__(self, desc: PluginTensorDesc | None = None, min=(), opt=(), max=()):  # noqa: A002
        self.desc, self.min, self.opt, self.max = desc or PluginTensorDesc(), min, opt, max


class _Interface:
    """Base of the binding's interface classes (their C++ side holds nothing the plugin layer reads)."""

    def __init__(self, *args, **kwargs):
        pass


class ITensor(_Interface):
    pass


class ISymExpr(_Interface):  # the plugin layer subclasses it at import (its symbolic kernel arguments)
    pass


class IPluginV3(_Interface):
    pass


class IPluginV3QuickCore(_Interface):
    pass


class IPluginV3QuickBuild(_Interface):
    pass


class IPluginV3QuickRuntime(_Interface):
    pass


class IPluginV3QuickAOTBuild(_Interface):  # the plugin layer's AOT plugin class is defined on it at import
    pass


class IPluginCreatorV3Quick(_Interface):
    pass


class IPluginRegistry:
    def __init__(self):
        self._creators: dict[tuple[str, str, str], IPluginCreatorV3Quick] = {}

    def register_creator(self, creator, namespace: str) -> bool:
        key = (creator.name, creator.plugin_version, namespace)
        if key in self._creators:
            return False
        self._creators[key] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = ""):
        return self._creators.get((name, version, namespace))

    @property
    def all_creators(self):
        return list(self._creators.values())


_REGISTRY = IPluginRegistry()  # one per loaded stand-in, like the process-wide registry


def get_plugin_registry() -> IPluginRegistry:
    return _REGISTRY


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = 2):
        self.min_severity = min_severity

    def log(self, severity: int, msg: str) -> None:
        pass



# ----------------------------------------------------------------------------------------------
# the builder side (NVIDIA/TensorRT python/src/infer/pyCore.cpp, pyGraph.cpp; onnx-tensorrt's parser):
# every call is recorded in CALLS so a test can check what tmerge asked TensorRT to do


CALLS: list[tuple] = []


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1
    PREFER_JIT_PYTHON_PLUGINS = 2
    PREFER_AOT_PYTHON_PLUGINS = 3


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    DEBUG = 2
    GPU_FALLBACK = 3
    REFIT = 5
    DISABLE_TIMING_CACHE = 6
    TF32 = 7


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class _Tensor:
    def __init__(self, name: str, shape: tuple, mode: TensorIOMode):
        self.name, self.shape, self.mode = name, shape, mode


class INetworkDefinition:
    def __init__(self, flags: int):
        self.flags = flags
        self.inputs: list[_Tensor] = []
        self.outputs: list[_Tensor] = []
        self.plugin_layers: list[tuple[str, object]] = []  # (op type, the plugin TensorRT created)
        self.onnx = b""

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> _Tensor:
        return self.inputs[index]


def _plugin_field(name: str, attribute) -> PluginField:
    """A node attribute as the parser hands it to a plugin creator (onnx-tensorrt loadFields /
    copyField): INT -> int32[1], FLOAT -> float32[1], STRING -> its bytes + NUL."""
    from onnx import AttributeProto

    if attribute.type == AttributeProto.INT:
        return PluginField(name, np.array([attribute.i], np.int32), PluginFieldType.INT32)
    if attribute.type == AttributeProto.FLOAT:
        return PluginField(name, np.array([attribute.f], np.float32), PluginFieldType.FLOAT32)
    if attribute.type == AttributeProto.STRING:
        return PluginField(name, np.frombuffer(attribute.s + b"\0", np.int8), PluginFieldType.CHAR)
    raise NotImplementedError(f"attribute {name} of type {attribute.type}")


def parse_plugin_node(node, network_flags: int = 0, phase: TensorRTPhase = TensorRTPhase.BUILD):
    """The plugin TensorRT's ONNX parser creates for a node of a custom domain (onnx-tensorrt
    ``createPlugin`` in importerUtils.cpp, quickly deployable plugins): the creator by (op type,
    ``plugin_version``, ``plugin_namespace``); only the creator's declared fields, from the node's
    attributes; the request from the node's ``aot`` attribute (1 -> STRICT_AOT, 0 -> STRICT_JIT),
    else from the network's PREFER_JIT / PREFER_AOT_PYTHON_PLUGINS flag (neither -> UNKNOWN)."""
    attrs = {a.name: a for a in node.attribute}
    version = attrs["plugin_version"].s.decode() if "plugin_version" in attrs else "1"
    namespace = attrs["plugin_namespace"].s.decode() if "plugin_namespace" in attrs else ""
    creator = get_plugin_registry().get_creator(node.op_type, version, namespace)
    if creator is None:
        raise LookupError(f"no plugin creator for {node.op_type} version {version} in {namespace!r}")
    fields = PluginFieldCollection(_plugin_field(f.name, attrs[f.name]) for f in creator.field_names
                                   if f.name in attrs)
    if "aot" in attrs:
        request = QuickPluginCreationRequest.STRICT_AOT if attrs["aot"].i else QuickPluginCreationRequest.STRICT_JIT
    else:
        prefer_aot = bool(network_flags >> int(NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS) & 1)
        prefer_jit = bool(network_flags >> int(NetworkDefinitionCreationFlag.PREFER_JIT_PYTHON_PLUGINS) & 1)
        if prefer_aot and prefer_jit:
            raise ValueError("Both NetworkDefinitionCreationFlag::kPREFER_AOT_PYTHON_PLUGINS and "
                             "NetworkDefinitionCreationFlag::kPREFER_JIT_PYTHON_PLUGINS cannot be specified at the same time.")
        request = (QuickPluginCreationRequest.PREFER_JIT if prefer_jit else
                   QuickPluginCreationRequest.PREFER_AOT if prefer_aot else QuickPluginCreationRequest.UNKNOWN)
    return creator.create_plugin(node.op_type, namespace, fields, phase, request)


class OnnxParser:
    """Reads the graph as onnx-tensorrt does what matters here: inputs / outputs with -1 for dynamic
    dimensions, and each node of a custom domain made a plugin layer by :func:`parse_plugin_node`
    (an error when no creator is registered or TensorRT's plugin code refuses the node)."""

    def __init__(self, network: INetworkDefinition, logger: Logger):
        self.network, self.errors = network, []

    def parse(self, model: bytes, path: str | None = None) -> bool:
        import onnx

        CALLS.append(("parse", len(model)))
        proto = onnx.load_from_string(bytes(model))
        self.network.onnx = bytes(model)

        def shape(value_info) -> tuple:
            return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim)

        initializers = {i.name for i in proto.graph.initializer}
        self.network.inputs = [_Tensor(v.name, shape(v), TensorIOMode.INPUT) for v in proto.graph.input
                               if v.name not in initializers]
        self.network.outputs = [_Tensor(v.name, shape(v), TensorIOMode.OUTPUT) for v in proto.graph.output]
        for node in proto.graph.node:
            if node.domain in ("", "ai.onnx"):
                continue
            try:
                plugin = parse_plugin_node(node, self.network.flags)
            except (LookupError, ValueError) as e:  # what the parser reports for the node
                self.errors.append(str(e))
                return False
            self.network.plugin_layers.append((node.op_type, plugin))
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> str:
        return self.errors[index]


class IOptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, min: tuple, opt: tuple, max: tuple) -> None:  # noqa: A002
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class IBuilderConfig:
    def __init__(self):
        self.flags = {BuilderFlag.TF32}  # on by default, as in TensorRT
        self.pools: dict[MemoryPoolType, int] = {}
        self.profiles: list[IOptimizationProfile] = []

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: BuilderFlag) -> None:
        self.flags.discard(flag)

    def get_flag(self, flag: BuilderFlag) -> bool:
        return flag in self.flags

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class IHostMemory(bytes):
    pass


class Builder:
    def __init__(self, logger: Logger):
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        CALLS.append(("create_network", flags))
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        """The "engine": a JSON record of what was built and the parsed graph (the real one is a
        binary TensorRT plan)."""
        import base64
        import json

        if not network.inputs or not config.profiles:
            return None
        for tensor in network.inputs:  # a dynamic input needs a range in every profile
            if -1 in tensor.shape and any(tensor.name not in p.shapes for p in config.profiles):
                return None
        record = {"inputs": [[t.name, list(t.shape)] for t in network.inputs],
                  "outputs": [[t.name, list(t.shape)] for t in network.outputs],
                  "flags": sorted(f.name for f in config.flags), "network_flags": network.flags,
                  "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
                  "profiles": [{k: [list(x) for x in v] for k, v in p.shapes.items()} for p in config.profiles],
                  "plugins": [op for op, _ in network.plugin_layers],
                  "plugin_classes": sorted({type(plugin).__name__ for _, plugin in network.plugin_layers})}
        CALLS.append(("build_serialized_network", record))
        record = {**record, "onnx": base64.b64encode(network.onnx).decode()}
        return IHostMemory(json.dumps(record).encode())


class Runtime:
    def __init__(self, logger: Logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> "ICudaEngine":
        import json

        return ICudaEngine(json.loads(bytes(data)))


class ICudaEngine:
    def __init__(self, record: dict):
        self.record = record
        self.tensors = [(name, TensorIOMode.INPUT) for name, _ in record["inputs"]] + [
            (name, TensorIOMode.OUTPUT) for name, _ in record["outputs"]]

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, index: int) -> str:
        return self.tensors[index][0]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return dict(self.tensors)[name]

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType.FLOAT

    def create_execution_context(self) -> "IExecutionContext":
        return IExecutionContext(self)


class IExecutionContext:
    """Runs the engine on the memory it is given, as TensorRT does: every I/O tensor needs an address
    (``set_tensor_address``), every input a shape inside the profile (``set_input_shape``);
    ``execute_async_v3`` reads the inputs at their addresses, computes the parsed graph (plugin
    layers with :func:`plugin_layer_outputs`) and writes each output at its address. The addresses
    are host memory here (see :class:`HostDevice`), device memory in TensorRT."""

    def __init__(self, engine: ICudaEngine):
        self.engine, self.shapes, self.addresses = engine, {}, {}
        self._graph = None

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        low, _, high = self.engine.record["profiles"][0][name]
        if not all(lo <= s <= hi for lo, s, hi in zip(low, shape, high)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        batch = next(iter(self.shapes.values()))[0]
        shape = dict(self.engine.record["outputs"])[name]
        return tuple(batch if d == -1 else d for d in shape)

    def set_tensor_address(self, name: str, address: int) -> bool:
        CALLS.append(("set_tensor_address", name, address))
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        CALLS.append(("execute_async_v3", stream_handle, dict(self.shapes)))
        inputs = [name for name, _ in self.engine.record["inputs"]]
        outputs = [name for name, _ in self.engine.record["outputs"]]
        if set(inputs) - set(self.shapes) or set(inputs + outputs) - set(self.addresses):
            return False
        if self._graph is None:
            self._graph = _evaluator(self.engine.record["onnx"])
        feeds = {name: _at(self.addresses[name], self.shapes[name]).copy() for name in inputs}
        for name, value in zip(outputs, self._graph.run(outputs, feeds)):
            if value.shape != self.get_tensor_shape(name):
                return False
            _at(self.addresses[name], value.shape)[...] = value
        return True


def _at(address: int, shape: tuple) -> np.ndarray:
    """The float32 array of ``shape`` at ``address`` (a tensor's memory, as TensorRT addresses it)."""
    count = int(np.prod(shape))
    return np.frombuffer((ctypes.c_float * count).from_address(address), np.float32, count).reshape(shape)


def plugin_layer_outputs(op_type: str, attrs: dict, x, size, keys) -> tuple:
    """What a tmerge plugin layer computes: the reference merge its JIT implementation runs on
    TensorRT's buffers (:mod:`tmerge.plugins.trt`), here on host arrays."""
    from tmerge.plugins.reference import reference_merge

    import torch

    out, out_size = reference_merge(op_type, attrs, *(torch.from_numpy(np.ascontiguousarray(a)) for a in (x, size, keys)))
    return out.numpy(), out_size.numpy()


def _evaluator(onnx_b64: str):
    """The parsed graph, run with ONNX Runtime, or with plugin layers by ONNX's reference evaluator
    (ONNX Runtime has no way to run them): both have ``run(output names, feeds)``."""
    import base64

    import onnx
    import onnxruntime
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    model = base64.b64decode(onnx_b64)
    proto = onnx.load_from_string(model)
    plugins = {(n.domain, n.op_type) for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
    if not plugins:
        return onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])

    class PluginLayer(OpRun):
        def _run(self, x, size, keys, **attrs):
            attrs = {k: v for k, v in attrs.items() if k != "aot"}
            return plugin_layer_outputs(self.onnx_node.op_type, attrs, x, size, keys)

    ops = [type(op_type, (PluginLayer,), {"op_domain": domain}) for domain, op_type in plugins]
    return ReferenceEvaluator(proto, new_ops=ops)


class HostDevice:
    """The CUDA device of :data:`tmerge.runtime.tensorrt.DEVICE`, in host memory: buffers are CPU
    tensors (their ``data_ptr()`` is what the execution context reads and writes), the stream a
    handle whose ``synchronize`` is recorded in CALLS."""

    STREAM = 0x5EA  # a non-default stream handle

    def check_available(self) -> None:
        pass

    def name(self) -> str:
        return "stand-in (host memory)"

    def empty(self, shape: tuple, dtype):
        import torch

        return torch.empty(shape, dtype=dtype)

    def stream(self):
        class Stream:
            cuda_stream = self.STREAM

            def synchronize(self) -> None:
                CALLS.append(("synchronize", self.cuda_stream))

        return Stream()


@contextlib.contextmanager
def plugin_layer(wheel: Path, workdir: Path, version: str):
    """``import tensorrt`` and ``import tensorrt.plugin`` give a fresh stand-in and the wheel's own
    plugin package while inside; whatever was imported under those names before comes back after."""
    plugin_dir = workdir / "tensorrt_bindings" / "plugin"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(workdir, [m for m in archive.namelist()
                                     if m.startswith("tensorrt_bindings/plugin/") and m.endswith(".py")])
    if not (plugin_dir / "__init__.py").is_file():
        raise FileNotFoundError(f"{wheel.name} has no tensorrt_bindings/plugin package")

    def ours(name: str) -> bool:
        return name == "tensorrt" or name.startswith("tensorrt.")

    saved = {name: sys.modules.pop(name) for name in [n for n in sys.modules if ours(n)]}
    try:
        core_spec = importlib.util.spec_from_file_location("tensorrt", Path(__file__))
        core = importlib.util.module_from_spec(core_spec)
        sys.modules["tensorrt"] = core
        core_spec.loader.exec_module(core)
        core.__version__ = version
        spec = importlib.util.spec_from_file_location("tensorrt.plugin", plugin_dir / "__init__.py",
                                                      submodule_search_locations=[str(plugin_dir)])
        plugin = importlib.util.module_from_spec(spec)
        sys.modules["tensorrt.plugin"] = plugin
        core.plugin = plugin
        with warnings.catch_warnings():  # TensorRT's docstrings have invalid escapes (\s)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", SyntaxWarning)
            spec.loader.exec_module(plugin)
        yield core, plugin
    finally:
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
