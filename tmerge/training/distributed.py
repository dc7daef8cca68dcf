"""Distributed training under ``torchrun``: this process's rank and world, and the collective steps
the training loop needs (all ranks stop together, a barrier)."""

from __future__ import annotations

import os
import time

import torch


class Dist:
    """Rank/world of this process; initialised from torchrun's environment variables."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if device in (None, "auto"):
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend)
            self.owns_group = True
        if self.world > 1:
            self.world, self.rank = dist.get_world_size(), dist.get_rank()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (so all ranks stop together)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            # A gloo worker thread frees each finished collective (the last barrier's) on its own,
            # and needs the GIL for that; the group's destructor joins those threads while holding
            # the GIL. Released right after a barrier, the two deadlocked (one rank hung at exit).
            # Sleeping releases the GIL so the workers finish first.
            time.sleep(0.2)
            dist.destroy_process_group()
