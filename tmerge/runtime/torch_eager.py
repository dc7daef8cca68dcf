"""PyTorch eager: the model as it is, in ``inference_mode``."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TmergeError
from .base import Runner


class TorchRunner(Runner):
    """``threads`` sets ``torch.set_num_threads`` (process-wide: torch has no per-model setting)."""

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

    def prepare(self, images: torch.Tensor):
        x = images.to(self.device, torch.float32)
        forward = self.forward
        sync = torch.cuda.synchronize if self.device == "cuda" else None

        def run():
            with torch.inference_mode():
                out = forward(x)
            if sync is not None:
                sync()
            return out

        return run

    def versions(self) -> dict[str, str | None]:
        return {"torch": torch.__version__}

    def settings(self) -> dict[str, Any]:
        return {"threads": self.threads, "threads_in_effect": torch.get_num_threads() if self.device == "cpu" else None,
                "precision": "fp32"}
