"""Hooks into the one training loop (``train/loop.py``) for what watches a run without changing its maths:
experiment tracking (MLflow), a sweep's pruner (Optuna), reports. The loop calls them on rank 0 only, in
order; a hook never sees tensors, only the records the loop also writes to ``metrics.jsonl``.

A hook stops a run early by raising ``StopTraining(reason)`` (e.g. an Optuna pruner): the loop publishes the
current result as it would at the end and returns with ``stopped=reason``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorakit.config import RunConfig


@dataclass
class TrainResult:
    output: Path
    steps: int  # optimizer steps taken in total (including those before a resume)
    loss: float | None  # the last logged training loss
    eval_loss: float | None  # the last evaluation's loss (None without validation data)
    stopped: str  # "done", "early_stopping", or the reason a callback gave (StopTraining)
    peak_rss_bytes: int | None = None  # this process's peak resident memory (None where unknown)
    peak_gpu_bytes: int | None = None  # torch's peak CUDA allocation (None on CPU)
    best_step: int | None = None  # the step of the lowest eval_loss (None without validation data)
    best_eval_loss: float | None = None  # that eval_loss; with keep_best, the published weights are that step's


class StopTraining(Exception):
    """Raised by a callback to end the run at the current step; ``reason`` becomes ``TrainResult.stopped``."""

    def __init__(self, reason: str = "stopped"):
        super().__init__(reason)
        self.reason = reason


class Callback:
    """Base class: override what you need. ``state`` in ``on_start`` is the loop's resumable state (``step``
    > 0 when the run resumed from a checkpoint)."""

    def on_start(self, cfg: RunConfig, output: Path, state: dict[str, Any]) -> None:
        """After the output folder holds config.yaml (and, on resume, the checkpoint's metrics.jsonl)."""

    def on_log(self, record: dict[str, Any]) -> None:
        """Each record appended to metrics.jsonl: training steps (loss, lr, ...) and evaluations (eval_*)."""

    def on_end(self, result: TrainResult) -> None:
        """After the published files are written (also after early stopping / a StopTraining)."""

    def on_error(self, error: BaseException) -> None:
        """The run ends with an error or an interruption (the checkpoint, if any, is written)."""
