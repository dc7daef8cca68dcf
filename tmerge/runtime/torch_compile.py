"""torch.compile (inductor) of the model; compiled on the first forward of each input shape. On CUDA
with CUDA graphs on, inductor's ``reduce-overhead`` mode captures and replays them."""

from __future__ import annotations

import torch

from .torch_eager import TorchRunner


class TorchCompileRunner(TorchRunner):
    captures_graphs = False

    def compiled(self, module: torch.nn.Module):
        return torch.compile(module, mode="reduce-overhead" if self.cuda_graphs else None)

    def versions(self) -> dict[str, str | None]:
        return {"torch": torch.__version__, "compiler": "inductor"}
