"""One backend layer for every runtime tmerge runs a model on (in the style of Polygraphy's runners).

A :class:`Runner` wraps one model on one runtime: :meth:`~Runner.load` builds what the runtime
needs (compiled module, session, compiled model, engine), :meth:`~Runner.prepare` stages one input
batch and returns a zero-argument synchronous forward (what latency timing calls),
:meth:`~Runner.run` returns the outputs as NumPy arrays, :meth:`~Runner.describe` says which
versions, device and thread settings were in effect. Export verification, ``profile``, ``sweep``
and ``check`` all get their runners from :func:`create`.

Adding a runtime: write ``tmerge/runtime/<name>.py`` with a :class:`Runner` subclass and add one
:func:`register_backend` line below (imports stay lazy: a missing optional dependency only matters when that
runtime is asked for).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
from dataclasses import dataclass
from typing import Any

from .._optional import require
from ..errors import TmergeError
from .runner import Runner, artifact_bytes

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Backend:
    """A registered runtime: ``takes`` is what it runs, a torch module ("torch") or an ONNX graph
    ("onnx"); ``runner`` is "module:Class", imported on first use; ``needs`` the Python module that
    must import (its extra is named by :mod:`tmerge._optional`); ``timing`` the runner options latency timing
    uses (two runners timed interleaved must not steal each other's cores)."""

    name: str
    runner: str
    takes: str
    devices: tuple[str, ...]
    needs: str | None = None
    aliases: tuple[str, ...] = ()
    summary: str = ""
    timing: tuple[tuple[str, Any], ...] = ()

    def runner_class(self) -> type[Runner]:
        module, cls = self.runner.split(":")
        return getattr(importlib.import_module(module), cls)


REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    REGISTRY[backend.name] = backend
    return backend


register_backend(Backend("torch", "tmerge.runtime.torch_eager:TorchRunner", "torch", ("cpu", "cuda"), aliases=("eager",),
                 summary="PyTorch eager"))
register_backend(Backend("torch.compile", "tmerge.runtime.torch_compile:TorchCompileRunner", "torch", ("cpu", "cuda"),
                 aliases=("compile", "torch-compile", "inductor"), summary="torch.compile (inductor)"))
register_backend(Backend("onnxruntime", "tmerge.runtime.ort:OnnxRuntimeRunner", "onnx", ("cpu", "cuda"),
                 needs="onnxruntime", aliases=("ort",), timing=(("spinning", False),),
                 summary="ONNX Runtime (CPU; CUDA / TensorRT execution providers when present)"))
register_backend(Backend("openvino", "tmerge.runtime.openvino:OpenVINORunner", "onnx", ("cpu",), needs="openvino",
                 aliases=("ov",), summary="OpenVINO (CPU plugin, f32)"))
register_backend(Backend("tensorrt", "tmerge.runtime.tensorrt:TensorRTRunner", "onnx", ("cuda",), needs="tensorrt",
                 aliases=("trt",), summary="TensorRT engine built from the ONNX graph"))


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def find_backend(name: str) -> Backend:
    """The backend called ``name`` (or one of its aliases); a TmergeError listing them otherwise."""
    key = name.strip().lower()
    for backend in REGISTRY.values():
        if key == backend.name or key in backend.aliases:
            return backend
    raise TmergeError(f"unknown backend {name!r}; use one of {', '.join(REGISTRY)}")


def check_backend(name: str, device: str = "cpu") -> Backend:
    """A one-line TmergeError when the backend, or the device for it, is not usable here."""
    backend = find_backend(name)
    if device not in DEVICES:
        raise TmergeError(f"unknown device {device!r}; use cpu or cuda")
    if device not in backend.devices:
        raise TmergeError(f"the {backend.name} backend runs on {' or '.join(backend.devices)}, not {device}")
    if backend.needs is not None:
        require(backend.needs)
    backend.runner_class().check_device(device)
    return backend


def available_backends(device: str = "cpu", takes: str | None = None) -> list[str]:
    """Registered backends usable here on ``device`` (optionally only those that run ``takes``)."""
    out = []
    for name, backend in REGISTRY.items():
        if takes is not None and backend.takes != takes:
            continue
        try:
            check_backend(name, device)
        except TmergeError:
            continue
        out.append(name)
    return out


def create(name: str, model: Any, *, device: str = "cpu", threads: int | None = None, timing: bool = False,
           **options: Any) -> Runner:
    """A loaded runner of backend ``name`` for ``model`` (an nn.Module for torch backends; an ONNX
    ModelProto, bytes or file path for ONNX backends; OpenVINO also takes an IR ``.xml``).
    ``timing=True`` adds the backend's options for interleaved latency timing."""
    backend = check_backend(name, device)
    if timing:
        options = {**dict(backend.timing), **options}
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise TmergeError(f"--threads must be a positive integer, got {threads!r}")
    runner = backend.runner_class()(model, device=device, threads=threads, **options)
    runner.name = backend.name
    return runner.load()


def package_version(*packages: str) -> str | None:
    for package in packages:
        try:
            return md.version(package)
        except md.PackageNotFoundError:
            continue
    return None


__all__ = ["Backend", "DEVICES", "REGISTRY", "Runner", "artifact_bytes", "available_backends", "check_backend", "create",
           "find_backend", "names", "package_version", "register_backend"]
