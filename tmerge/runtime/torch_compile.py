"""torch.compile (inductor) of the model; compiled on the first forward of each input shape."""

from __future__ import annotations

import torch

from .torch_eager import TorchRunner


class TorchCompileRunner(TorchRunner):
    def compiled(self, module: torch.nn.Module):
        return torch.compile(module)

    def versions(self) -> dict[str, str | None]:
        return {"torch": torch.__version__, "compiler": "inductor"}
