"""`lorakit lr-find`: the learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks", §3.3; fastai's ``lr_find``).

A fresh adapter trains for up to ``steps`` optimizer steps while the learning rate climbs exponentially from
``start_lr`` to ``end_lr``, one value per step; the test stops once the smoothed loss passes ``diverge`` × its
best. The suggestion is the steepest descent of the smoothed loss against log(lr), before its minimum: where
a step of lr buys the most loss. Beside it, a prior from the model's size (``size_prior``).

The step is the training loop's (``train/loop.py``): the run's Task gives the micro-batches and the loss, the
loop's optimizer and batch stream are used as they are; only the lr and the stopping rule differ. Nothing is
kept of the weights: the output folder gets lr_find.png and lr_find.json only.
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorakit.config import RunConfig
from lorakit.device import cpu_threads
from lorakit.errors import LorakitError
from lorakit.fileio import write_atomic

SMOOTHING = 0.9  # the stopping rule's moving average of the loss (bias-corrected): a time constant of 10 steps


@dataclass
class LrFindResult:
    lrs: list[float]  # the lr of each step taken
    losses: list[float]  # each step's training loss
    smoothed: list[float]  # its centered moving average (``centered``)
    suggestion: float  # the steepest descent of ``smoothed`` against log(lr)
    prior: float  # the usual LoRA lr for this model's size (``size_prior``)
    parameters: int  # the base model's parameters
    stopped: str  # "diverged at lr X" or "end of the ramp"


def size_prior(parameters: int) -> float:
    """The usual LoRA learning rate for a model of ``parameters`` weights: 2e-4 at 7B (QLoRA, Dettmers et al.
    2023, and most recipes), 1e-4 at 65B (QLoRA's), scaled as N^-1/4 between and beyond: 1.3e-3 at the bundled
    4.2M-parameter model, whose quickstart uses 1e-3. A heuristic to compare the measurement with."""
    return 2e-4 * (7e9 / max(parameters, 1)) ** 0.25


def centered(values: list[float], steps: int) -> list[float]:
    """A centered moving average over about a fifteenth of the ramp (half a decade of lr on 100 steps from
    1e-7 to 1). Centered, not exponential: an exponential average lags, and its steepest point would sit at a
    higher lr than the loss's (by ~0.7 decade at fastai's 0.98 on 100 steps)."""
    half = max(2, steps // 30)
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def steepest(lrs: list[float], smoothed: list[float]) -> float:
    """The lr where the smoothed loss falls fastest per decade of lr, among the steps before its minimum
    (the first tenth skipped: the average is still settling)."""
    end = min(range(len(smoothed)), key=smoothed.__getitem__)
    start = min(len(lrs) // 10, max(0, end - 2))
    if end - start < 2:
        return lrs[end]
    logs = [math.log10(lr) for lr in lrs[start:end + 1]]
    ys = smoothed[start:end + 1]
    # central differences (one-sided at the ends), as numpy.gradient
    slopes = [(ys[min(i + 1, len(ys) - 1)] - ys[max(i - 1, 0)]) / (logs[min(i + 1, len(ys) - 1)] - logs[max(i - 1, 0)])
              for i in range(len(ys))]
    return lrs[start + min(range(len(slopes)), key=slopes.__getitem__)]


def lr_find(cfg: RunConfig, start_lr: float = 1e-7, end_lr: float = 1.0, steps: int = 100,
            diverge: float = 4.0) -> LrFindResult:
    """Run the range test on ``cfg``'s model and data (see the module docstring); writes nothing."""
    from lorakit.train.loop import BatchStream
    from lorakit.train.optim import build_optimizer
    from lorakit.train.task import build_task

    if not 0 < start_lr < end_lr:
        raise LorakitError(f"--start-lr {start_lr:g} and --end-lr {end_lr:g}: need 0 < start < end")
    if steps < 10:
        raise LorakitError(f"--steps {steps}: the ramp needs at least 10 steps (100-300 is usual)")
    if diverge <= 1:
        raise LorakitError(f"--diverge {diverge:g}: must be > 1 (the loss's multiple of its best that ends the test)")
    t = cfg.train
    torch.set_num_threads(t.threads or cpu_threads())
    random.seed(t.seed)
    torch.manual_seed(t.seed)
    task = build_task(cfg)
    model = task.model
    parameters = sum(p.numel() for p in model.parameters() if not p.requires_grad) if t.method == "lora" else \
        sum(p.numel() for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, t)
    stream = BatchStream(task, t.batch_size)
    lrs, losses = [], []
    average, best, stopped = 0.0, math.inf, "end of the ramp"
    for i in range(steps):
        lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [stream.next() for _ in range(t.grad_accum)]
        n_units = max(1, sum(task.count(b) * w for b, w in micro))
        loss = 0.0
        for b, w in micro:  # the loop's step: the loss per unit of the whole step, one backward per micro-batch
            batch_loss = task.loss_sum(b) * w
            (batch_loss / n_units).backward()
            loss += batch_loss.item() / n_units
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss):
            stopped = f"loss not finite at lr {lr:.3g}"
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        lrs.append(lr)
        losses.append(loss)
        current = average / (1 - SMOOTHING ** (i + 1))
        best = min(best, current)
        if current > diverge * best:
            stopped = f"diverged at lr {lr:.3g}"
            break
    if len(lrs) < 3:
        raise LorakitError(f"lr-find: the loss diverged within {len(lrs)} steps (from --start-lr {start_lr:g}); "
                           "start lower")
    smoothed = centered(losses, steps)
    return LrFindResult(lrs, losses, smoothed, steepest(lrs, smoothed), size_prior(parameters), parameters, stopped)


def plot(result: LrFindResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses, alpha=0.3, label="loss")
    ax.plot(result.lrs, result.smoothed, label="smoothed")
    ax.axvline(result.suggestion, color="C2", linestyle="--", label=f"steepest descent {result.suggestion:.2g}")
    ax.axvline(result.prior, color="C3", linestyle=":", label=f"size prior {result.prior:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_ylim(top=max(result.smoothed) * 1.1)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def lr_find_command(cfg: RunConfig, start_lr: float, end_lr: float, steps: int, diverge: float) -> int:
    from lorakit.track.sweep import require_track_extra

    require_track_extra("lorakit lr-find")
    output = Path(cfg.train.output)
    if output.exists() and not output.is_dir():
        raise LorakitError(f"--output {output}: exists and is not a folder")
    result = lr_find(cfg, start_lr, end_lr, steps, diverge)
    output.mkdir(parents=True, exist_ok=True)
    plot(result, output / "lr_find.png")
    write_atomic(output / "lr_find.json", lambda p: p.write_text(json.dumps(asdict(result), indent=1) + "\n"))
    full = " (LoRA's; full fine-tuning usually wants about 10x less)" if cfg.train.method == "full" else ""
    print(f"lr-find: {len(result.lrs)} steps from {result.lrs[0]:.1g} to {result.lrs[-1]:.3g} ({result.stopped}); "
          f"suggested lr {result.suggestion:.2g} (steepest descent of the smoothed loss); prior for a "
          f"{result.parameters / 1e6:.1f}M-parameter model {result.prior:.2g}{full}; plot: {output / 'lr_find.png'}",
          file=sys.stdout)
    return 0
