"""PyTorch eager: the model as it is, in ``inference_mode``; on CUDA, captured once per batch as a CUDA
graph and replayed (shapes are static for a fixed schedule, and the merged forward does no host work)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..errors import TmergeError
from .runner import Runner

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAPH_WARMUP = 3  # eager forwards on a side stream before capture (lazy init, autotuning)


def check_precision(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for fp32); a TmergeError for anything else."""
    if precision not in AUTOCAST_DTYPES:
        raise TmergeError(f"--precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")
    return AUTOCAST_DTYPES[precision]


def autocast(device: str, precision: str):
    """The context a forward runs in at ``precision``: autocast to fp16/bf16, or nothing for fp32."""
    dtype = check_precision(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device, dtype=dtype)


class TorchRunner(Runner):
    """``threads`` sets ``torch.set_num_threads`` (process-wide: torch has no per-model setting).
    ``precision``: fp32, or fp16/bf16 through autocast (weights stay fp32, as deployments that
    autocast run them). ``cuda_graphs`` (CUDA only, default on): each prepared batch is captured once
    and replayed, so the timing has no kernel-launch cost."""

    def __init__(self, model: Any, *, device: str = "cpu", threads: int | None = None, precision: str = "fp32",
                 cuda_graphs: bool = True) -> None:
        super().__init__(model, device=device, threads=threads)
        check_precision(precision)
        self.precision = precision
        self.cuda_graphs = bool(cuda_graphs) and device == "cuda"

    @classmethod
    def check_device(cls, device: str) -> None:
        if device == "cuda" and not torch.cuda.is_available():
            raise TmergeError("--device cuda: torch sees no CUDA device")

    def load(self) -> TorchRunner:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.module = self.model.to(self.device).eval()
        self.forward = self.compiled(self.module)
        return self

    def compiled(self, module: torch.nn.Module):
        return module

    def _forward(self, x: torch.Tensor):
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.forward(x)

    def prepare(self, images: torch.Tensor):
        x = images.to(self.device, torch.float32)
        if self.cuda_graphs and self.captures_graphs:
            return self._graphed(x)
        sync = torch.cuda.synchronize if self.device == "cuda" else None

        def run():
            out = self._forward(x)
            if sync is not None:
                sync()
            return out

        return run

    captures_graphs = True  # False where the compiler captures them itself

    def _graphed(self, x: torch.Tensor):
        """Capture one forward on ``x`` as a CUDA graph; the callable replays it."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP):
                self._forward(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward(x)
        torch.cuda.synchronize()

        def run():
            graph.replay()
            torch.cuda.synchronize()
            return out

        return run

    def versions(self) -> dict[str, str | None]:
        return {"torch": torch.__version__}

    def settings(self) -> dict[str, Any]:
        return {"threads": self.threads, "threads_in_effect": torch.get_num_threads() if self.device == "cpu" else None,
                "precision": self.precision, "cuda_graphs": self.cuda_graphs}
