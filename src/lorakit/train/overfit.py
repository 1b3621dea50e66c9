"""The overfitting warning: validation loss rose at two evaluations in a row while training loss kept falling.

Training loss here is the mean step loss since the previous evaluation (single steps are too noisy to say
"falling"); the gap is the last eval_loss minus that mean. The warning is given once per run: after it,
validation loss rising further is the same overfitting (``--keep-best`` already publishes the best eval's
weights, ``--patience`` stops the run). Its state is a JSON-able dict kept in the loop's checkpointed state,
so a resumed run warns at the same step as one that never stopped, and not twice.
"""

from __future__ import annotations

from typing import Any


class OverfitWatch:
    def __init__(self, state: dict[str, Any]):
        """``state``: the loop's ``state["overfit"]`` (filled in here when new), updated in place."""
        for key, value in (("train_sum", 0.0), ("train_steps", 0), ("evals", []), ("warned_step", None)):
            state.setdefault(key, value)
        self.state = state

    def step(self, loss: float) -> None:
        """One optimizer step's training loss."""
        self.state["train_sum"] += loss
        self.state["train_steps"] += 1

    def evaluated(self, step: int, eval_loss: float) -> dict[str, Any] | None:
        """After an evaluation at ``step``: the overfitting event record the first time the pattern shows
        (``{"step", "event": "overfitting", "message", "gap"}``), else None."""
        s = self.state
        if s["train_steps"] == 0:
            return None
        train_loss = s["train_sum"] / s["train_steps"]
        s["train_sum"], s["train_steps"] = 0.0, 0
        s["evals"] = (s["evals"] + [[eval_loss, train_loss]])[-3:]  # (eval_loss, mean train loss) per eval
        if s["warned_step"] is not None or len(s["evals"]) < 3:
            return None
        (e0, t0), (e1, t1), (e2, t2) = s["evals"]
        if not (e0 < e1 < e2 and t0 > t1 > t2):
            return None
        s["warned_step"] = step
        gap = e2 - t2
        message = (f"step {step}: overfitting: validation loss rose at two evals in a row ({e0:.4f} -> {e1:.4f} "
                   f"-> {e2:.4f}) while training loss fell ({t0:.4f} -> {t1:.4f} -> {t2:.4f}); gap eval_loss - "
                   f"train loss {gap:.4f}")
        return {"step": step, "event": "overfitting", "message": message, "gap": gap}
