"""The resumable checkpoint ``<out>.ckpt.pt`` of a training run: written atomically by rank 0,
read back only by the same run (same identity: method, schedule, model, data size, batch size, lr,
seed, world size...)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .._io import atomic_paths
from ..errors import TmergeError


def checkpoint_path(out: str | Path) -> Path:
    """Where training on ``out`` keeps its resumable checkpoint (removed once the adapter is written)."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt.pt")


def fingerprint(identity: dict) -> str:
    """The run's identity as the checkpoint records it."""
    return json.dumps(identity, sort_keys=True, default=str)


def save_checkpoint(path: Path, identity: dict, *, step: int, method: dict, optimizer: dict, history: list,
                    drift: list) -> None:
    with atomic_paths([path], mkdir=True) as (tmp,):
        torch.save({"identity": fingerprint(identity), "step": step, "method": method, "optimizer": optimizer,
                    "history": history, "drift": drift}, tmp)


def load_checkpoint(path: Path, identity: dict) -> dict:
    """The checkpoint at ``path`` of the run ``identity`` (a one-line error for anything else)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a checkpoint: torch raises many kinds
        raise TmergeError(f"checkpoint {path} cannot be read ({type(e).__name__}); "
                          "remove it or drop --resume") from e
    if not isinstance(state, dict) or state.get("identity") != fingerprint(identity):
        raise TmergeError(
            f"checkpoint {path} belongs to a different run (method, schedule, model, data size, "
            "batch size, lr, seed or world size differ); remove it or drop --resume"
        )
    return state
