"""The :class:`Runner` contract every runtime implements."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


class Runner:
    """One model on one runtime. Subclasses implement :meth:`load`, :meth:`prepare`,
    :meth:`versions` and :meth:`settings`; :meth:`run` and :meth:`describe` come from here.

    ``threads``: the intra-op threads asked for; ``None`` leaves the runtime's default (what a
    deployment that sets nothing gets), which :meth:`settings` reports as it is in effect.
    """

    name: str = ""

    def __init__(self, model: Any, *, device: str = "cpu", threads: int | None = None) -> None:
        self.model = model
        self.device = device
        self.threads = threads

    @classmethod
    def check_device(cls, device: str) -> None:
        """Raise TmergeError when ``device`` cannot be used by this runtime here (the registry has
        already checked that the runtime imports and lists the device)."""

    def load(self) -> Runner:
        """Build what the runtime needs (session, compiled model, engine); returns self."""
        return self

    def prepare(self, images: torch.Tensor) -> Callable[[], list[np.ndarray] | Any]:
        """Stage ``images`` once (host -> device, dtype) and return a zero-argument callable that runs
        one synchronous forward on them. Called repeatedly by latency timing."""
        raise NotImplementedError

    def prepare_feeds(self, feeds: dict[str, Any]) -> Callable[[], Any]:
        """:meth:`prepare` for graphs with several named inputs (ONNX runtimes)."""
        raise NotImplementedError(f"the {self.name} runner takes one image batch")

    def outputs(self, result: Any) -> list[np.ndarray]:
        """The forward's result as float32/int64 NumPy arrays, in output order."""
        if isinstance(result, torch.Tensor):
            return [result.detach().float().cpu().numpy()]
        if isinstance(result, (list, tuple)):
            return [r.detach().cpu().numpy() if isinstance(r, torch.Tensor) else np.asarray(r) for r in result]
        return [np.asarray(result)]

    def run(self, images: torch.Tensor) -> list[np.ndarray]:
        """All outputs of one forward on ``images`` as NumPy arrays."""
        return self.outputs(self.prepare(images)())

    def versions(self) -> dict[str, str | None]:
        return {}

    def settings(self) -> dict[str, Any]:
        """Threads (asked for and in effect), precision, providers: what a report should record."""
        return {"threads": self.threads}

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, **self.settings(), "versions": self.versions()}


def as_array(value: Any) -> np.ndarray:
    """A contiguous NumPy array (float tensors as float32, integer tensors as int64)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value.long()
        value = value.numpy()
    return np.ascontiguousarray(value)


def artifact_bytes(model: Any) -> bytes | str:
    """An ONNX model as runtimes take it: a path (str) for files, serialized bytes otherwise."""
    if isinstance(model, (str, os.PathLike)):
        return str(Path(model))
    if isinstance(model, bytes):
        return model
    return model.SerializeToString()
