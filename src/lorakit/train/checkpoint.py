"""Crash-safe checkpoints and exact resume; no pickle anywhere (safetensors + JSON).

``OUTPUT/checkpoints/step-N/`` holds everything the loop needs to continue bit-for-bit:

- ``trainable.safetensors``: every trainable parameter by module path (what resume restores), and the
  task's result files (for LoRA the PEFT adapter, ``adapter_config.json`` + ``adapter_model.safetensors``)
  so any checkpoint can be served, merged or evaluated like a final adapter;
- ``optimizer.safetensors`` (AdamW moments, key ``"<param index>.<name>"``) + ``optimizer.json``
  (param groups, non-tensor state);
- ``rng.safetensors`` (torch CPU and CUDA generator states as uint8 tensors; in a distributed run also
  every other rank's, under ``rank{r}.``, with its python ``random`` state as JSON bytes);
- ``trainer_state.json``: step, data position (epoch, next micro-batch), python ``random`` state,
  early-stopping counters;
- ``metrics.jsonl`` (the log up to this step) and ``config.yaml``.

A checkpoint is written into ``checkpoints/.tmp-step-N`` with every file fsynced, then renamed to
``step-N`` in one ``os.replace``: after a crash it is complete or absent.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import LorakitError

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step-(\d+)")


# --- atomic files ----------------------------------------------------------------------------------


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the folders themselves, so a rename publishes durable data."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_files(write: Callable[[Path], None], dest: Path) -> list[str]:
    """Call ``write(tmp_dir)``, then move each file it wrote into ``dest`` with ``os.replace``: no reader
    ever sees a half-written file. Returns the names published."""
    tmp = dest / ".tmp-publish"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    fsync_tree(tmp)
    names = sorted(os.listdir(tmp))
    for name in names:
        target = dest / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    tmp.rmdir()
    fsync_dir(dest)
    return names


# --- the trainable weights -------------------------------------------------------------------------


def save_trainable(model: nn.Module, folder: Path) -> None:
    """Every parameter with ``requires_grad`` under its module path: what resume restores, exactly."""
    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, folder / "trainable.safetensors")


def load_trainable(model: nn.Module, folder: Path) -> None:
    state = load_file(folder / "trainable.safetensors")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        raise LorakitError(f"{folder}: its weights do not match this model's trainable parameters; "
                           "resume with the settings of the original run")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


# --- optimizer and RNG: tensors to safetensors, the rest to JSON -----------------------------------


def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten ``opt.state_dict()``: tensors keyed ``"<param index>.<name>"``, everything else JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda_{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor], python_state: list) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in sorted(tensors) if k.startswith("cuda_")])
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


# --- checkpoints -----------------------------------------------------------------------------------


def complete_checkpoints(output: Path) -> list[Path]:
    """``step-N`` folders, oldest first; ``.tmp-*`` leftovers of a crash are ignored."""
    folder = output / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_checkpoint(output: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    save_result: Callable[[Path], None], keep_last: int,
                    rng: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``checkpoints/step-{state['step']}`` atomically and keep the newest ``keep_last`` of them.
    ``state`` is JSON-able (step, data position, counters); the RNG states are taken here, so call
    this at a step boundary, after everything that draws random numbers for the step. ``save_result``
    writes the task's published files (an adapter) too, so any checkpoint can be served, merged or
    evaluated like the final result. ``rng``: the states to save when not only this process's (every
    rank's, from ``Distributed.saving``)."""
    folder = output / CHECKPOINTS
    final = folder / f"step-{state['step']}"
    tmp = folder / f".tmp-step-{state['step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    save_trainable(model, tmp)
    save_result(tmp)
    opt_tensors, opt_meta = optimizer_to_files(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    save_file(rng if rng is not None else rng_tensors(), tmp / "rng.safetensors")
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "python_random": random.getstate()}))
    for name in ("metrics.jsonl", "config.yaml"):
        if (output / name).exists():
            shutil.copyfile(output / name, tmp / name)

    fsync_tree(tmp)
    if final.exists():  # a rerun of the same step after resume: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(folder)

    old = complete_checkpoints(output)[:-keep_last] if keep_last > 0 else []
    for p in old:
        # rename first, so an interrupted delete never leaves a partial step-N behind
        doomed = p.with_name(f".tmp-delete-{p.name}")
        os.replace(p, doomed)
        shutil.rmtree(doomed)
    return final


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0) -> dict[str, Any]:
    """Restore weights, optimizer and RNG (rank ``rank``'s own) from ``folder``; return the trainer state
    (step, position...)."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        load_trainable(model, folder)
        optimizer_from_files(optimizer, load_file(folder / "optimizer.safetensors"),
                             json.loads((folder / "optimizer.json").read_text()))
        rng, python_state = load_file(folder / "rng.safetensors"), state.pop("python_random")
        if rank:
            prefix = f"rank{rank}."
            rng = {k[len(prefix):]: v for k, v in rng.items() if k.startswith(prefix)}
            if not rng:
                raise LorakitError(f"{folder}: holds no RNG state for rank {rank}: it was written by fewer "
                                   "processes; resume with as many as the run had")
            python_state = json.loads(bytes(rng.pop("python_random").tolist()))
        restore_rng(rng, python_state)
    except (OSError, ValueError, KeyError) as e:
        raise LorakitError(f"{folder}: cannot resume from this checkpoint ({e}); remove it to use an "
                           "older one, or start again with --overwrite") from None
    return state
