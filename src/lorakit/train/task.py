"""What the one training loop (``train/loop.py``) trains: a ``Task``.

The loop owns everything that is the same for every kind of model — the output folder, optimizer, learning
rate schedule, gradient accumulation, clipping, the NaN guard, evaluation cadence, checkpoints and exact
resume, metrics. A task owns what differs: which model, which examples, how a micro-batch is made and
what its loss is, what is evaluated and what files are published. Text (causal LM, ``train/text.py``) and
text-to-image (``diffusion/``) are tasks; neither copies the loop.

Exact resume needs one thing of a task: everything random it does (data order, noise, timesteps,
dropout) comes from ``batch_order(epoch, batch_size)`` (a pure function of the seed, epoch and batch size) or from torch's and
Python's global generators, which checkpoints save and restore.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lorakit.config import RunConfig


class Task(Protocol):
    cfg: RunConfig  # resolved (e.g. the model path made absolute): what config.yaml records
    model: nn.Module  # its ``requires_grad`` parameters are what the loop optimizes and checkpoints
    unit: str  # what ``tokens`` counts, as the progress line says it per second: "tok" or "img"

    def batch_order(self, epoch: int, batch_size: int) -> list[list[int]]:
        """The micro-batches of ``epoch``, ``batch_size`` example indices each (the last may be short); a pure
        function of (seed, epoch, batch_size). Under torchrun the loop asks for the global micro-batch
        (``--batch-size`` × ranks), the order one process with that batch would walk, and gives each rank
        its part: the task itself never needs to know about ranks."""

    def collate(self, indices: list[int]) -> Any:
        """One micro-batch from example indices (on CPU; the task moves it to the model's device)."""

    def count(self, batch: Any) -> int:
        """Units the loss is averaged over (label tokens; images). The step's loss is the mean over all
        units of all its micro-batches, so the loop sums ``count`` before the first backward."""

    def tokens(self, batch: Any) -> int:
        """Throughput units of a batch, logged as tokens_per_s (input tokens; images)."""

    def split(self, batch: Any, parts: int) -> list[Any] | None:
        """``batch`` as up to ``parts`` smaller batches whose ``loss_sum``s add up to the batch's, to run side
        by side on the CPU cores (``train/cores.py``), or None where that would change what is computed
        (anything drawn at random in ``loss_sum``: the slices would interleave their draws)."""

    def loss_sum(self, batch: Any) -> torch.Tensor:
        """The batch's loss summed over its ``count`` units: a scalar the loop divides and backwards."""

    def evaluate(self) -> dict[str, float] | None:
        """Validation metrics (``eval_loss`` at least), or None without validation data."""

    def save_result(self, folder: Path) -> None:
        """Write the published result into ``folder`` (an adapter, or a model for full fine-tuning); also
        called for every checkpoint so any checkpoint can be used like the final result."""


def build_task(cfg: RunConfig) -> Task:
    """Load and check everything the run needs (model, data) and return its task. Nothing is written."""
    task = cfg.model.task
    if task == "auto":
        from lorakit.diffusion.pipeline import is_pipeline_folder

        task = "text-to-image" if is_pipeline_folder(cfg.model.name_or_path) else "text"
    if task == "text-to-image":
        from lorakit.diffusion.task import TextToImageTask

        return TextToImageTask(cfg)
    from lorakit.train.text import CausalLMTask

    return CausalLMTask(cfg)
