"""Local checkpoints: a state dict read from .safetensors or a weights-only torch pickle, loaded strictly."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from .._io import existing_file
from ..errors import TmergeError, first_line

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch pickle, unwrapping {"state_dict": ...},
    {"model": ...} and the ``module.`` prefix that DataParallel/DDP adds."""
    path = existing_file(path, "checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message suggests weights_only=False: arbitrary code, never
        raise TmergeError(f"checkpoint {path} could not be read: it is not a weights-only PyTorch state dict "
                          "(torch.load with weights_only=True refuses it); save it with "
                          "torch.save(model.state_dict(), ...) or as .safetensors") from e
    except Exception as e:  # safetensors, zip and torch errors all mean: unreadable file
        raise TmergeError(f"checkpoint {path} could not be read ({first_line(e)})") from e
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or not _is_tensor_dict(obj):
        raise TmergeError(f"checkpoint {path} does not hold a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _is_tensor_dict(obj: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_checkpoint(model: nn.Module, path: str | Path, *, arch: str = "the model", assign: bool = False) -> None:
    """Load a local state dict into ``model`` strictly; any key or shape mismatch is a TmergeError.
    ``assign``: the checkpoint's tensors become the parameters (for a model built on the meta device)."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    problems = [
        _count(missing, "missing key"),
        _count(unexpected, "unexpected key"),
        _count(wrong_shape, "shape mismatch", plural="shape mismatches"),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise TmergeError(f"checkpoint {path} does not match {arch}: {', '.join(problems)}")
    if assign:
        state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)


def _count(items: list[str], noun: str, *, plural: str | None = None, shown: int = 3) -> str:
    if not items:
        return ""
    words = noun if len(items) == 1 else (plural or noun + "s")
    more = ", ..." if len(items) > shown else ""
    return f"{len(items)} {words} ({', '.join(items[:shown])}{more})"
