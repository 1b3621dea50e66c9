"""`lorakit train`: the one training loop, read top to bottom in ``train``.

The loop is the same for every kind of model; what differs (the model, its data, its loss, what is
published) is the run's ``Task`` (``train/task.py``: text in ``train/text.py``, text-to-image in
``diffusion/``).

Everything that can be wrong with the input (config, model, data, output folder) is checked before the
first byte is written to the output folder. The loop is deterministic for a seed, and a run resumed from
``checkpoints/step-N`` computes the same weights as one that never stopped: the checkpoint holds the
weights, AdamW moments, RNG states and the position in the data order, and the learning rate is a pure
function of the step.

Under torchrun (``train/distributed.py``) every rank runs this same loop on its part of each micro-batch; the
loop asks ``dist`` for that part, the step's global sums and whether it is rank 0, the one that writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lorakit.config import RunConfig, config_to_dict, load_config, save_config
from lorakit.device import peak_rss_bytes
from lorakit.errors import Interrupted, LorakitError
from lorakit.fileio import write_atomic
from lorakit.train.best import has_best, publish_best, restore_best, save_best, with_best
from lorakit.train.callbacks import Callback, StopTraining, TrainResult
from lorakit.train.checkpoint import (
    complete_checkpoints,
    load_checkpoint,
    publish_files,
    save_checkpoint,
)
from lorakit.train.cores import CoreSplit, batch_backward, core_split
from lorakit.train.distributed import Distributed
from lorakit.train.distributed import setup as setup_distributed
from lorakit.train.optim import build_optimizer, lr_at
from lorakit.train.overfit import OverfitWatch
from lorakit.train.stop import StopSignals
from lorakit.train.task import Task, build_task

# Settings a resumed run may change: they do not alter the weights computed up to the checkpoint.
RESUMABLE_CHANGES = {"resume", "overwrite", "max_steps", "epochs", "save_every", "keep_last", "eval_every",
                     "patience", "log_every", "threads", "strategy", "dist_timeout", "eval_generate"}


class BatchStream:
    """Micro-batches in the task's ``batch_order`` (length-grouped or random), epoch after epoch, as
    ``(batch, weight)``. The order is made at the global micro-batch size (``batch_size`` × ranks) and each
    rank collates its part (``dist.shard``). A rank whose part is empty (fewer examples than ranks) gets the
    first example with weight 0, so its collectives still happen but it adds nothing; the weight is 1 else.
    ``(epoch, index)`` is the position a checkpoint stores: the next micro-batch to read, the same on all ranks."""

    def __init__(self, task: Task, batch_size: int, epoch: int = 0, index: int = 0, dist: Distributed | None = None):
        self.task, self.dist = task, dist or Distributed()
        self.batch_size = batch_size * self.dist.world_size
        self.epoch, self.index, self.batches = epoch, index, task.batch_order(epoch, self.batch_size)

    def next(self) -> tuple[Any, float]:
        if self.index == len(self.batches):
            self.epoch, self.index = self.epoch + 1, 0
            self.batches = self.task.batch_order(self.epoch, self.batch_size)
        ids = self.batches[self.index]
        self.index += 1
        part = self.dist.shard(ids)
        return (self.task.collate(part), 1.0) if part else (self.task.collate(ids[:1]), 0.0)

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.index / len(self.batches)


def run_config(path: str | None, flags: dict[str, Any]) -> RunConfig:
    """``load_config(path, flags)``; with ``--resume`` and no CONFIG file, the run's own
    ``OUTPUT/config.yaml`` is the base, so ``lorakit train --output DIR --resume`` needs no other flag."""
    output = flags.get("output")
    if path is None and flags.get("resume") and output and (Path(output) / "config.yaml").is_file():
        path = str(Path(output) / "config.yaml")
    return load_config(path, flags)


def train(cfg: RunConfig, callbacks: list[Callback] | tuple[Callback, ...] = ()) -> TrainResult:
    """Train ``cfg`` into ``cfg.train.output``; see the module docstring. Raises LorakitError on bad input
    (nothing written) and on a non-finite loss (the last good weights written, then the error), and
    ``Interrupted`` on SIGINT/SIGTERM once the current step is done and checkpointed (``train/stop.py``).
    ``callbacks`` (``train/callbacks.py``) watch the run on rank 0, after ``default_callbacks(cfg)``.
    Under torchrun, every rank calls this; see ``train/distributed.py``."""
    dist = setup_distributed(cfg)  # one process (no torchrun): a stand-in that changes nothing
    hooks = [*default_callbacks(cfg), *callbacks] if dist.is_main else []
    try:
        with StopSignals() as stop:
            try:
                return _train(cfg, stop, dist, hooks)
            except RuntimeError as e:
                if not dist.lost_peer(e):
                    raise
                raise LorakitError(f"rank {dist.rank}: lost the other ranks ({dist.describe(e)}); the newest "
                                   f"complete checkpoint in {cfg.train.output} is intact: rerun with --resume") from None
    except BaseException as e:
        for hook in hooks:
            hook.on_error(e)
        raise
    finally:
        dist.close()


def default_callbacks(cfg: RunConfig) -> list[Callback]:
    """The hooks every run gets from its config: MLflow tracking (``track/mlflow.py``) unless ``--no-track``
    or ``LORAKIT_TRACK=0`` in the environment (a switch for a whole test suite or CI)."""
    hooks: list[Callback] = []
    if cfg.track.enabled and os.environ.get("LORAKIT_TRACK", "1").lower() not in ("0", "false", "no", "off"):
        from lorakit.track.mlflow import MLflowCallback

        hooks.append(MLflowCallback())
    return hooks


def _train(cfg: RunConfig, stop: StopSignals, dist: Distributed, hooks: list[Callback]) -> TrainResult:
    t = cfg.train
    output = Path(t.output)
    # a torchrun restart (--max-restarts) reruns the same command: it continues the run, never replaces it
    resume, overwrite = t.resume or dist.restarts > 0, t.overwrite and not dist.restarts
    checkpoint = dist.together(lambda: _check_output(output, resume, overwrite))
    dist.check_same(cfg, checkpoint)

    # --- load and check everything before writing anything -------------------------------------------
    torch.set_num_threads(t.threads or dist.cpu_threads())
    random.seed(t.seed)
    torch.manual_seed(t.seed)  # LoRA init and dropout draw from it; CUDA generators are seeded too
    task = dist.together(lambda: build_task(cfg))  # the model (LoRA added), its data: text or text-to-image
    cfg, model = task.cfg, task.model
    if checkpoint is not None:
        dist.together(lambda: _check_same_run(output / "config.yaml", cfg))
    dist.seed_ranks(t.seed)
    dist.wrap(model)  # DDP or FSDP2 in place (several processes)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, t)
    # on CPU, each micro-batch's rows in slices side by side, a core each, where the task allows it
    parts, threads_each = core_split(torch.get_num_threads(), t.batch_size)
    cores = CoreSplit(parts, threads_each) if parts > 1 and dist.world_size == 1 and (
        params[0].device.type == "cpu") else None
    n_batches = len(task.batch_order(0, t.batch_size * dist.world_size))
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * n_batches / t.grad_accum))

    # --- the output folder: fresh, or restored to the newest checkpoint (rank 0 writes) ----------------
    state = {"step": 0, "epoch": 0, "batch_index": 0, "best_eval_loss": None, "best_step": None, "bad_evals": 0,
             "overfit": {}, "world_size": dist.world_size}
    if overwrite and output.exists() and dist.is_main:
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    saved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=False, overwrite=False))  # as resolved by the task
    if dist.is_main:
        write_atomic(output / "config.yaml", lambda p: save_config(saved, p))
    if checkpoint is not None:
        with dist.loading(model, optimizer):
            state = {**state, **load_checkpoint(checkpoint, model, optimizer, dist.rank)}  # older ones lack keys
        if state.get("world_size", 1) != dist.world_size:
            raise dist.error(f"{checkpoint}: written by {state.get('world_size', 1)} processes, resumed by "
                             f"{dist.world_size}: the global batch would change; resume with as many processes")
        if dist.is_main:  # the log and the best result as of the checkpoint: steps after it are recomputed
            write_atomic(output / "metrics.jsonl", lambda p: shutil.copyfile(checkpoint / "metrics.jsonl", p))
            restore_best(checkpoint, output)
            print(f"resuming from {checkpoint} (step {state['step']} of {total_steps})", file=sys.stderr)
    elif dist.is_main:
        write_atomic(output / "metrics.jsonl", lambda p: p.write_text(""))
    stream = BatchStream(task, t.batch_size, state["epoch"], state["batch_index"], dist)
    metrics = open(output / "metrics.jsonl" if dist.is_main else os.devnull, "a")  # rank 0 logs
    overfit = OverfitWatch(state["overfit"])
    save_result = with_best(task.save_result, output)  # a checkpoint carries the best result so far too

    halt: list[str] = []  # a hook's StopTraining reason: the run ends after this step

    def log(record: dict[str, Any]) -> None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        for hook in hooks:
            try:
                hook.on_log(record)
            except StopTraining as e:
                halt.append(e.reason)

    def finish() -> int | None:
        """Close the metrics and the progress line, publish the weights: the best eval's (its step returned), or
        the last (also when a checkpoint from before --keep-best had none)."""
        metrics.close()
        progress.close()
        if cores is not None:
            cores.close()
        best = state["best_step"] if t.keep_best and has_best(output) else None
        with dist.saving(model, optimizer):
            if dist.is_main:
                _publish(task, output, best)
        return best

    for hook in hooks:
        hook.on_start(cfg, output, dict(state))
    progress = _Progress(total_steps, state["step"], shown=dist.is_main, unit=task.unit)  # its clock starts here

    # --- the loop: one optimizer step per iteration ----------------------------------------------------
    step, loss, eval_loss, stopped = state["step"], None, None, "done"
    tokens, last_log = 0, time.perf_counter()
    stop.armed = True
    while step < total_steps:
        micro = [stream.next() for _ in range(t.grad_accum)]  # (this rank's batch, weight 1; 0: a stand-in)
        # The step's loss is the mean over all its units (label tokens, images) on all ranks, not a mean of
        # micro-batch means: each micro-batch's summed loss is divided by the step's total count before backward.
        n_units = max(1, dist.all_sum(sum(task.count(b) * w for b, w in micro))[0])
        step_loss, n_tokens = 0.0, sum(task.tokens(b) * w for b, w in micro)
        for i, (b, w) in enumerate(micro):
            dist.sync_gradients(i == len(micro) - 1)  # one all-reduce per step, after the last micro-batch
            # × ranks: DDP/FSDP average the ranks' gradients, and the average of N·(partial) is the sum;
            # on CPU the rows may run as slices side by side (train/cores.py), gradients added in slice order
            batch_loss = batch_backward(lambda s, w=w: task.loss_sum(s) * w, b, params, n_units, dist.world_size,
                                        cores, task.split)
            step_loss += batch_loss / n_units
        step_loss, n_tokens = dist.all_sum(step_loss, n_tokens)
        n_tokens = int(n_tokens)
        tokens += n_tokens
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf))

        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            # Do not apply this step: the weights are still those of step `step`, the last good state.
            what = f"loss {step_loss}" if not math.isfinite(step_loss) else f"gradient norm {grad_norm}"
            best = finish()
            kept = f"the best eval's weights (step {best})" if best is not None else f"the last good weights (step {step})"
            raise dist.error(f"step {step + 1}: {what} is not finite; training stopped and {kept} are in {output}; "
                             "lower --lr or check the data")

        lr = lr_at(step, t, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, loss = step + 1, step_loss
        overfit.step(loss)

        if step % t.log_every == 0 or step == total_steps:
            now = time.perf_counter()
            log({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                 "tokens_per_s": round(tokens / max(now - last_log, 1e-9), 1),
                 "epoch": round(stream.epoch_progress, 4)})
            tokens, last_log = 0, now
        progress.update(step, loss, lr, n_tokens)

        if (t.eval_every and step % t.eval_every == 0) or step == total_steps:
            result = task.evaluate()
            if result is not None:
                eval_loss = result["eval_loss"]
                log({"step": step, **result})
                if state["best_eval_loss"] is None or eval_loss < state["best_eval_loss"]:
                    state.update(best_eval_loss=eval_loss, best_step=step, bad_evals=0)
                    if t.keep_best:
                        with dist.saving(model, optimizer):  # every rank: FSDP gathers; rank 0 writes
                            if dist.is_main:
                                save_best(task.save_result, output, step, eval_loss)
                else:
                    state["bad_evals"] += 1
                warning = overfit.evaluated(step, eval_loss)
                if warning is not None:
                    log(warning)
                    if dist.is_main:
                        print(f"lorakit: warning: {warning['message']}", file=sys.stderr, flush=True)
                if t.patience and state["bad_evals"] >= t.patience:
                    stopped = "early_stopping"
        # a hook (on rank 0) asked to stop, or a signal came (SIGINT/SIGTERM on any rank): every rank stops at
        # this step; both asked in one all-reduce
        halted, signalled = dist.any_rank(bool(halt), stop.received is not None)
        if halted:
            stopped = halt[0] if halt else "stopped"

        state.update(step=step, epoch=stream.epoch, batch_index=stream.index)
        if t.save_every and step % t.save_every == 0:
            metrics.flush()
            with dist.saving(model, optimizer) as rng:  # every rank: FSDP gathers, each rank's RNG state
                if dist.is_main:
                    save_checkpoint(output, model, optimizer, state, save_result, t.keep_last, rng)
        if stopped != "done":
            break
        if signalled and step < total_steps:
            if not (t.save_every and step % t.save_every == 0):
                metrics.flush()
                with dist.saving(model, optimizer) as rng:
                    if dist.is_main:
                        save_checkpoint(output, model, optimizer, state, save_result, t.keep_last, rng)
            metrics.close()
            progress.close()  # before the message: the progress line is not drawn again after it
            raise Interrupted(f"interrupted ({stop.name or 'on another rank'}) at step {step} of {total_steps}: "
                              f"checkpoint written to {output / 'checkpoints' / f'step-{step}'}; continue with: "
                              f"lorakit train --output {shlex.quote(str(output))} --resume" if dist.is_main else "",
                              128 + (stop.received or signal.SIGTERM))

    best = finish()
    note = f" ({stopped.replace('_', ' ')})" if stopped != "done" else ""
    peak = peak_rss_bytes()
    device = next(model.parameters()).device
    peak_gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if dist.is_main:
        print(f"trained {step} steps{note}; " + (f"loss {loss:.4f}; " if loss is not None else "")
              + (f"eval_loss {eval_loss:.4f}; " if eval_loss is not None else "")
              + (f"published the best eval (step {best}, eval_loss {state['best_eval_loss']:.4f}); "
                 if best is not None else "")
              + (f"peak RSS {peak / 2**20:.1f} MiB; " if peak is not None else "")
              + (f"peak GPU memory {peak_gpu / 2**20:.1f} MiB; " if peak_gpu is not None else "")
              + f"saved to {output}")
    result = TrainResult(output=output, steps=step, loss=loss, eval_loss=eval_loss, stopped=stopped,
                         peak_rss_bytes=peak, peak_gpu_bytes=peak_gpu, best_step=state["best_step"],
                         best_eval_loss=state["best_eval_loss"])
    for hook in hooks:
        hook.on_end(result)
    return result


# --- helpers: the output folder, the final files, progress -------------------------------------------


def _publish(task: Task, output: Path, best: int | None) -> None:
    """The run's result into ``output``: the best eval's (``best``: its step, with --keep-best) or the current."""
    if best is not None:
        publish_best(output)
    else:
        publish_files(task.save_result, output)


def _check_output(output: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (or None for a fresh run); refuse to mix runs in one folder."""
    if output.exists() and not output.is_dir():
        raise LorakitError(f"--output {output}: exists and is not a folder")
    if not output.exists() or not any(output.iterdir()):
        if resume:
            print(f"--resume: nothing to resume in {output}; starting a new run", file=sys.stderr)
        return None
    if resume:
        found = complete_checkpoints(output)
        if found:
            return found[-1]
        if not (output / "config.yaml").is_file():
            raise LorakitError(f"--output {output}: not a lorakit run folder (no config.yaml); nothing to resume")
        # the run stopped before its first checkpoint: start it again, and say so
        print(f"--resume: no checkpoint in {output}; starting over from step 1", file=sys.stderr)
        return None
    if overwrite:
        if not (output / "config.yaml").is_file():
            raise LorakitError(f"--output {output}: not a lorakit run folder (no config.yaml); --overwrite only "
                               "replaces earlier runs; choose a new --output")
        return None
    raise LorakitError(f"--output {output}: not empty; pass --resume to continue that run, --overwrite to "
                       "replace it, or choose a new folder")


def _check_same_run(saved_path: Path, cfg: RunConfig) -> None:
    """A resumed run must compute what the original would have: only RESUMABLE_CHANGES and the tracking
    settings (``track``: where the record goes) may differ."""
    saved = config_to_dict(load_config(saved_path))
    now = config_to_dict(cfg)
    for section, fields in now.items():
        for name, value in fields.items():
            before = saved[section][name]
            if before != value and not ((section == "train" and name in RESUMABLE_CHANGES) or section == "track"):
                raise LorakitError(f"--resume: {section}.{name} is {value!r} but the run in {saved_path.parent} "
                                   f"used {before!r}; resume with the same settings or start with --overwrite")


class _Progress:
    """A rich progress bar (loss, lr, tokens or images per second, ETA) when stderr is a terminal; else a plain
    line every ~10%."""

    def __init__(self, total: int, start: int, shown: bool = True, unit: str = "tok"):
        self.total, self.every, self.shown, self.unit = total, max(1, total // 10), shown, unit
        self.tokens, self.started = 0, time.perf_counter()
        self.bar = None
        if shown and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            # on stderr, the terminal checked above (rich's default is stdout, which may be a file)
            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True,
                                console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, loss: float, lr: float, tokens: int) -> None:
        self.tokens += tokens
        info = f"loss {loss:.4f}  lr {lr:.2e}  {self.tokens / (time.perf_counter() - self.started):.0f} {self.unit}/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif self.shown and (step % self.every == 0 or step == self.total):
            print(f"step {step}/{self.total}  {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
