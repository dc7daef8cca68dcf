"""TensorRT: the one place tmerge builds an engine (from an ONNX graph; TF32 off, so fp32 is fp32).

Not run on the build machines (TensorRT cannot be installed there): the calls follow the TensorRT
10.9+ Python API. Plugin graphs need the tmerge plugins registered first (:mod:`tmerge.plugins.trt`),
which :func:`build_engine` does; portable graphs run with TensorRT's own ops. The plugins run their
JIT (Python) implementation, so running a plugin engine needs Python, PyTorch and tmerge too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import TmergeError
from ..plugins.spec import DOMAIN
from ..plugins.trt import TRT_MISSING, prepare_onnx_for_trt, register_tensorrt_plugins
from .runner import Runner, artifact_bytes

MIN_TRT = (10, 9)
NEXT_UNSUPPORTED_TRT = (11, 0)


def require_tensorrt():
    """Import tensorrt (10.9 - 10.x, with tensorrt.plugin) and check for a CUDA device, or TmergeError."""
    try:
        import tensorrt as trt
        import tensorrt.plugin  # noqa: F401  (QDP API, TensorRT >= 10.6)
    except ImportError as e:
        raise TmergeError(TRT_MISSING) from e
    version = tuple(int(p) for p in trt.__version__.split(".")[:2])
    if version < MIN_TRT:
        raise TmergeError(f"TensorRT {trt.__version__} is too old: the merge plugins need >= 10.9 "
                          "(tensorrt.plugin is stable from 10.9, the oldest release they are checked against); "
                          "pip install 'tmerge[trt]'")
    if version >= NEXT_UNSUPPORTED_TRT:
        raise TmergeError(f"TensorRT {trt.__version__} is not supported yet (TensorRT 11 builds strongly typed "
                          "networks and has no fp16 builder flag); pip install 'tmerge[trt]' (tensorrt<11)")
    DEVICE.check_available()
    return trt


class CudaDevice:
    """Where the engine's inputs and outputs live: CUDA device memory and a CUDA stream, as in
    TensorRT's Python samples. The runner touches the device only through :data:`DEVICE` (the tests
    put a host-memory stand-in there to run a stand-in TensorRT on CPU)."""

    def check_available(self) -> None:
        if not torch.cuda.is_available():
            raise TmergeError("TensorRT needs an NVIDIA GPU (torch.cuda.is_available() is False)")

    def name(self) -> str:
        return torch.cuda.get_device_name()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A device buffer; its ``data_ptr()`` is the address handed to ``set_tensor_address``."""
        return torch.empty(shape, dtype=dtype, device="cuda")

    def stream(self) -> torch.cuda.Stream:
        """A stream (``cuda_stream`` handle, ``synchronize()``) ordered after the current one, where
        the buffers were filled; TensorRT warns about (and serialises on) the default stream."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        return stream


DEVICE = CudaDevice()


def profile_shapes(input_shape: tuple[int, ...], batch: int, max_batch: int | None) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) shapes of the optimisation profile; only the batch dimension varies."""
    max_batch = max(batch, max_batch if max_batch is not None else 4 * batch)
    if batch < 1 or max_batch < batch:
        raise TmergeError(f"invalid batch range: batch {batch}, max batch {max_batch}")
    rest = tuple(input_shape[1:])
    return (1, *rest), (batch, *rest), (max_batch, *rest)


def build_engine(onnx_model: Any, input_shape: tuple[int, ...], *, batch: int, max_batch: int | None = None,
                 fp16: bool = False, workspace_gb: float = 4.0) -> tuple[bytes, dict]:
    """Parse ``onnx_model`` (plugin or portable graph) and build a serialized engine; returns
    (engine bytes, build info). Plugin graphs get the tmerge plugins registered first."""
    import onnx

    trt = require_tensorrt()
    source = artifact_bytes(onnx_model)
    proto = onnx.load(source) if isinstance(source, str) else onnx.load_from_string(source)
    python_plugins = any(node.domain == DOMAIN for node in proto.graph.node)  # a plugin graph
    if python_plugins:
        register_tensorrt_plugins()
        proto = prepare_onnx_for_trt(proto)  # its nodes ask for the JIT implementation (aot=0)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # No network flags. Explicit batch is the only mode in TensorRT 10, and PREFER_JIT/AOT_PYTHON_PLUGINS
    # only choose between the two implementations of a plugin that has both; the merge plugins have
    # the JIT one alone, and each node's aot=0 attribute already makes the parser ask for it.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(proto.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TmergeError(f"TensorRT could not parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.clear_flag(trt.BuilderFlag.TF32)  # fp32 parity must be fp32
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    lo, opt, hi = profile_shapes(input_shape, batch, max_batch)
    profile.set_shape(network.get_input(0).name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TmergeError("TensorRT failed to build the engine (see the TensorRT log above)")
    return bytes(serialized), {"python_plugins": python_plugins, "tf32": False, "fp16": fp16,
                               "profile": {"min": lo, "opt": opt, "max": hi}}


class TensorRTRunner(Runner):
    """An engine for the ONNX graph ``model``, built here for the batch of the first prepared input
    (``fp16`` for a half-precision engine), or ``engine`` (serialized bytes) as built before."""

    def __init__(self, model: Any, *, device: str = "cuda", threads: int | None = None, fp16: bool = False,
                 batch: int | None = None, max_batch: int | None = None, engine: bytes | None = None) -> None:
        super().__init__(model, device=device, threads=threads)
        self.fp16, self.batch, self.max_batch, self.serialized = fp16, batch, max_batch, engine
        self.engine = None
        self.build_info: dict = {}

    @classmethod
    def check_device(cls, device: str) -> None:
        require_tensorrt()

    def _engine(self, input_shape: tuple[int, ...]):
        if self.engine is None:
            trt = require_tensorrt()
            if self.serialized is None:
                self.serialized, self.build_info = build_engine(self.model, input_shape, batch=self.batch or input_shape[0],
                                                     max_batch=self.max_batch, fp16=self.fp16)
            else:
                register_tensorrt_plugins()  # a saved plugin engine needs its plugin creators in this process
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(self.serialized)
            self.context = self.engine.create_execution_context()
        return self.engine

    def prepare(self, images: torch.Tensor):
        trt = require_tensorrt()
        engine = self._engine(tuple(images.shape))
        context = self.context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        x = DEVICE.empty(tuple(images.shape), torch.float32)
        x.copy_(images)
        if not context.set_input_shape(inputs[0], tuple(x.shape)):
            raise TmergeError(f"input shape {tuple(x.shape)} is outside the engine's optimisation profile")
        context.set_tensor_address(inputs[0], x.data_ptr())
        buffers = []
        for name in outputs:
            dtype = torch.float16 if engine.get_tensor_dtype(name) == trt.DataType.HALF else torch.float32
            buf = DEVICE.empty(tuple(context.get_tensor_shape(name)), dtype)
            context.set_tensor_address(name, buf.data_ptr())
            buffers.append(buf)
        stream = DEVICE.stream()

        def run():
            if not context.execute_async_v3(stream.cuda_stream):
                raise TmergeError("TensorRT execution failed")
            stream.synchronize()
            return buffers

        run.keepalive = x  # the staged input lives as long as the callable
        return run

    def outputs(self, result) -> list[np.ndarray]:
        return [b.float().cpu().numpy() for b in result]

    def versions(self) -> dict[str, str | None]:
        import tensorrt as trt

        return {"tensorrt": trt.__version__}

    def settings(self) -> dict:
        return {"threads": None, "precision": "fp16" if self.fp16 else "fp32 (TF32 off)", **self.build_info,
                "gpu": DEVICE.name()}

