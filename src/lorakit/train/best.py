"""``--keep-best``: the published result is the best evaluation's (lowest eval_loss), not the last step's.

While a run trains, ``OUTPUT/best/`` holds the task's result files (``Task.save_result``: the adapter) as of
the best eval so far, and ``best.json`` = {step, eval_loss}; at the end they are published and the folder
removed. Each improvement writes a new folder beside it and renames it into place, so ``best/`` is always one
whole result. Every checkpoint carries ``step-N/best/``: hard links to those files (no copy; files under
``best/`` are never changed in place, only replaced whole), and a resumed run restores ``best/`` from its
checkpoint, so it continues from the best of the checkpoint's time exactly (a best found after that
checkpoint is found again, the steps being recomputed alike).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from lorakit.train.checkpoint import fsync_dir, fsync_tree, publish_files

BEST = "best"
RECORD = "best.json"


def save_best(save_result: Callable[[Path], None], output: Path, step: int, eval_loss: float) -> None:
    """Replace ``OUTPUT/best`` with the current result (``save_result``) of ``step``."""
    tmp = output / f".tmp-{BEST}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_result(tmp)
    (tmp / RECORD).write_text(json.dumps({"step": step, "eval_loss": eval_loss}))
    _replace_dir(tmp, output / BEST)


def with_best(save_result: Callable[[Path], None], output: Path) -> Callable[[Path], None]:
    """``save_result`` for a checkpoint folder: the result files and ``best/`` (links to ``OUTPUT/best``)."""

    def write(folder: Path) -> None:
        save_result(folder)
        if (output / BEST).is_dir():
            shutil.copytree(output / BEST, folder / BEST, copy_function=_link)

    return write


def restore_best(checkpoint: Path, output: Path) -> None:
    """``OUTPUT/best`` as it was when ``checkpoint`` was written (absent if there was none then)."""
    if (checkpoint / BEST).is_dir():
        tmp = output / f".tmp-{BEST}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint / BEST, tmp, copy_function=_link)
        _replace_dir(tmp, output / BEST)
    else:
        shutil.rmtree(output / BEST, ignore_errors=True)


def has_best(output: Path) -> bool:
    return (output / BEST).is_dir()


def publish_best(output: Path) -> list[str]:
    """Publish ``OUTPUT/best``'s result files into ``OUTPUT`` (copies, atomically: ``publish_files``), then
    remove ``OUTPUT/best``: the published files are it, and each checkpoint keeps its own for a resume."""

    def write(folder: Path) -> None:
        shutil.copytree(output / BEST, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(RECORD))

    names = publish_files(write, output)
    shutil.rmtree(output / BEST)
    return names


def _replace_dir(new: Path, dest: Path) -> None:
    """Rename ``new`` to ``dest``, replacing a previous ``dest``: a crash in between leaves no ``dest``, which
    only a running process reads (a resume restores it from its checkpoint)."""
    fsync_tree(new)
    old = dest.with_name(f".old-{dest.name}")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


def _link(src: str, dst: str) -> None:
    """A hard link where the file system allows it, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
