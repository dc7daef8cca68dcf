"""The training progress bar (stderr): steps, running loss, latest held-out drift."""

from __future__ import annotations

import sys


class TrainingProgress:
    """A rich progress bar on stderr with the running loss and the latest held-out drift."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.enabled = enabled
        self.progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("held-out drift {task.fields[drift]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(file=sys.stderr),
        )
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", drift="-")
        self.progress.start()
        self.ema: float | None = None

    def advance(self, loss: float) -> None:
        if self.progress is None:
            return
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        self.progress.update(self.task, advance=1, loss=f"{self.ema:.4g}")

    def set_drift(self, drift: dict | None) -> None:
        if self.progress is None or drift is None:
            return
        self.progress.update(self.task, drift=f"{drift['cosine_distance_mean']:.4g} (cos dist)")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
