"""Training settings: which methods can be trained, and one-line errors for settings that cannot
work, checked before any data or model is loaded (by the ``tmerge train`` command and by
:func:`~tmerge.training.train_adapter` alike)."""

from __future__ import annotations

import math

from ..errors import TmergeError
from ..merging import MergeMethod, available


def trainable_methods() -> tuple[str, ...]:
    """Registered methods with learned modules (those overriding ``trainable_layers``)."""
    return tuple(name for name, cls in available().items()
                 if cls.trainable_layers is not MergeMethod.trainable_layers)


def check_training_options(*, lr: float, ib_weight: float = 0.0, batch_size: int = 1, steps: int | None = None,
                           epochs: int | None = None, eval_every: int = 0, checkpoint_every: int = 0,
                           r_range: tuple[int, int] | None = None, balance_r: bool | None = None,
                           anneal: dict[str, tuple[float, float]] | None = None, stop_after: int | None = None,
                           max_seconds: float | None = None) -> None:
    """One-line errors for training settings that cannot work, before any data or model is loaded
    (the option names a method declares are checked once the method is built)."""
    if steps is not None and epochs is not None:
        raise TmergeError("give --steps or --epochs, not both")
    if not (math.isfinite(lr) and lr > 0):
        raise TmergeError(f"--lr must be a finite number > 0, got {lr}")
    if not (math.isfinite(ib_weight) and ib_weight >= 0):
        raise TmergeError(f"--ib-weight must be a finite number >= 0, got {ib_weight}")
    if batch_size < 1:
        raise TmergeError(f"--batch-size must be at least 1, got {batch_size}")
    if (steps is not None and steps < 1) or (epochs is not None and epochs < 1):
        raise TmergeError("--steps/--epochs must be >= 1")
    if eval_every < 0 or checkpoint_every < 0:
        raise TmergeError("--eval-every and --checkpoint-every must be >= 0")
    if r_range is not None and not 0 < r_range[0] <= r_range[1]:
        raise TmergeError(f"--r-range must be LO:HI with 0 < LO <= HI, got {r_range[0]}:{r_range[1]}")
    if balance_r and r_range is None:
        raise TmergeError("--balance-r needs --r-range (it balances the r drawn per step)")
    for name, pair in (anneal or {}).items():
        if len(pair) != 2 or any(not (math.isfinite(v) and v > 0) for v in pair):
            raise TmergeError(f"--anneal {name}: values must be START:END, finite and > 0, got {pair}")
    if stop_after is not None:
        if stop_after < 1:
            raise TmergeError(f"--stop-after must be at least 1, got {stop_after}")
        if steps is not None and stop_after > steps:
            raise TmergeError(f"--stop-after {stop_after} is past the planned --steps {steps}")
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        raise TmergeError(f"--max-minutes must be a finite number > 0, got {max_seconds / 60:g}")


def parse_r_range(text: str) -> tuple[int, int]:
    """``"LO:HI"`` -> (LO, HI) (checked by :func:`check_training_options`)."""
    lo, sep, hi = text.partition(":")
    try:
        if sep:
            return int(lo), int(hi)
    except ValueError:
        pass
    raise TmergeError(f"--r-range takes LO:HI (e.g. 4:16), got {text!r}")


def parse_anneal(items: list[str] | None) -> dict[str, tuple[float, float]]:
    """``["tau2=1:0.01", ...]`` -> {"tau2": (1.0, 0.01), ...}: an option annealed from START at the first
    step to END at the last planned one."""
    out: dict[str, tuple[float, float]] = {}
    for item in items or []:
        name, eq, values = item.partition("=")
        start, sep, end = values.partition(":")
        try:
            pair = (float(start), float(end)) if eq and sep and name.strip() else None
        except ValueError:
            pair = None
        if pair is None:
            raise TmergeError(f"--anneal takes OPTION=START:END (e.g. tau2=1:0.01), got {item!r}")
        if name.strip() in out:
            raise TmergeError(f"--anneal {name.strip()} given twice")
        out[name.strip()] = pair
    return out
