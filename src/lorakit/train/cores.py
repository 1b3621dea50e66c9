"""One micro-batch across the CPU cores of one process: row slices side by side, one OpenMP team each.

Why: at a LoRA step's sizes (a few hundred to a few thousand tokens × 512–2,048 wide) a GEMM split across
OpenMP threads scales poorly, and every elementwise op between the GEMMs ends at a barrier where the
threads wait for each other. Measured on the step benchmark's bf16 step (2 cores, AMX): its GEMMs alone,
replayed with the same shapes and operands (``lora_step_vs_peft.py --gemm-floor``), reach 46–51% of the
one-core roofline on one thread but 33–37% of the two-core roofline on two. Giving each core its own rows of
the batch, on one thread, keeps every core busy on its own GEMMs and passes, with one meeting point per
micro-batch (the gradients' sum); the benchmark's step went from ~375 to ~300 ms.

Each slice's forward and backward run on the calling thread or a helper thread (torch releases the GIL
inside every op; autocast and grad mode are per thread, and the task's loss sets them itself) and return
their gradients through
``torch.autograd.grad``, which the caller adds to ``.grad`` in slice order: the same sums on every run,
so a resumed run repeats an uninterrupted one bit for bit (the loop's exact resume). What would differ
between slices run side by side is left to the task to refuse (``Task.split`` returns None): random draws
(dropout, diffusion noise) from the global generator would interleave in an order nobody chose.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor


class CoreSplit:
    """Row slices of a batch on ``parts`` threads (this one and ``parts`` - 1 helpers), ``threads_each``
    OpenMP threads each; ``backward`` runs them."""

    def __init__(self, parts: int, threads_each: int):
        self.parts, self.threads_each = parts, threads_each
        self._pool: ThreadPoolExecutor | None = None  # the helpers, started at the first split batch

    def _start(self) -> ThreadPoolExecutor:
        main_threads = torch.get_num_threads()
        helpers = self.parts - 1
        ready = threading.Barrier(helpers)

        def start() -> None:
            torch.set_num_threads(self.threads_each)  # this thread's OpenMP team (OpenMP's setting is per thread)
            ready.wait()  # every helper exists before the first slice: none starts late, mid-step

        pool = ThreadPoolExecutor(helpers, thread_name_prefix="lorakit-core", initializer=start)
        for f in [pool.submit(lambda: None) for _ in range(helpers)]:
            f.result()
        # torch also keeps the last set_num_threads as the default for threads it meets later: the main
        # thread's count stays that default (evaluation, generation, checkpoints run there)
        torch.set_num_threads(main_threads)
        return pool

    def backward(self, loss: Callable[[Any], Tensor], slices: Sequence[Any], params: list[Tensor],
                 divide_by: float, times: float = 1.0) -> float:
        """For each slice, ``loss(slice)`` and the gradients of ``loss(slice) / divide_by · times`` with respect
        to ``params``, side by side; the gradients are added to ``params``' ``.grad`` in slice order (as
        ``backward()`` would accumulate them). Returns Σ ``loss(slice)`` as a float.

        The slices are a queue that this thread and the helpers take from, this thread included: on a core
        shared with a busy process a helper can wait milliseconds to be scheduled, and then this thread
        takes its slice too instead of waiting for it (beside a busy neighbour, slices handed out one per
        thread halved the quickstart's speed). Who computes a slice does not change its result: every
        taker runs ``threads_each`` OpenMP threads."""
        results: list[tuple[float, tuple[Tensor | None, ...]] | None] = [None] * len(slices)
        claim = itertools.count()  # next() on it is atomic (one C call under the GIL)

        def take() -> None:
            while (i := next(claim)) < len(slices):
                value = loss(slices[i])
                results[i] = value.item(), torch.autograd.grad(value / divide_by * times, params, allow_unused=True)

        self._pool = self._pool or self._start()
        helpers = [self._pool.submit(take) for _ in range(min(len(slices), self.parts) - 1)]
        main_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads_each)
        try:
            take()
        finally:
            torch.set_num_threads(main_threads)
            for f in helpers:  # a helper's error is raised here; none is left running on a dead step
                f.result()
        total = 0.0
        for value, grads in results:  # slice order: the same additions on every run
            total += value
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        return total

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


# A slice must be worth a thread. Between ops each thread runs Python under the GIL; on micro-batches of a few
# dozen tokens per row that is much of the step, and beside a busy process a helper descheduled while it
# holds the GIL stalls the other thread too. Measured on the quickstart config beside a busy neighbour
# (2 cores): micro-batches of 4 × ~48 tokens in two slices ran at 0.6× one thread's tokens/s, 16 × ~48
# (~384 tokens a slice) at 0.85–0.95×; on idle cores slices were faster at both sizes.
MIN_SLICE_TOKENS = 256


def slice_count(rows: int, tokens: int, parts: int) -> int:
    """How many slices a micro-batch of ``rows`` rows and ``tokens`` padded tokens is cut into: at most
    ``parts``, at least one row and ``MIN_SLICE_TOKENS`` tokens each (1: not split)."""
    return max(1, min(parts, rows, tokens // MIN_SLICE_TOKENS))


def core_split(threads: int, rows: int) -> tuple[int, int]:
    """(slices, OpenMP threads per slice) for ``threads`` cores and micro-batches of ``rows`` rows: one
    slice per core while there are rows for it, the cores left over shared out as threads."""
    parts = max(1, min(threads, rows))
    return parts, max(1, threads // parts)


def split_rows(batch: dict[str, Tensor], parts: int) -> list[dict[str, Tensor]] | None:
    """``batch`` (tensors of B rows) as ``slice_count`` row slices of at most ``parts``, or None where that is
    one. The slices keep the batch's padded width: equal shapes, equal work per core."""
    ids = batch["input_ids"]
    n = slice_count(ids.shape[0], ids.numel(), parts)
    if n < 2:
        return None
    bounds = [i * ids.shape[0] // n for i in range(n + 1)]
    return [{k: v[bounds[i]:bounds[i + 1]] for k, v in batch.items()} for i in range(n)]


def batch_backward(loss: Callable[[Any], Tensor], batch: Any, params: list[Tensor], divide_by: float, times: float = 1.0,
             cores: CoreSplit | None = None, split: Callable[[Any, int], list | None] | None = None) -> float:
    """``loss(batch) / divide_by · times`` backwarded into ``params``' ``.grad``; returns ``loss(batch)`` as a
    float. As row slices side by side on ``cores`` where ``split(batch, cores.parts)`` gives them (the same
    gradients to rounding), else one ``backward()``."""
    slices = split(batch, cores.parts) if cores is not None and split is not None else None
    if slices:
        return cores.backward(loss, slices, params, divide_by, times)
    value = loss(batch)
    (value / divide_by * times).backward()
    return value.item()
