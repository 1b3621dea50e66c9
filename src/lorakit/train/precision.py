"""``--precision auto``: bf16 autocast only where it makes this model's training step faster on this machine.

Native bf16 matmuls are not enough: on a small model the casts around them and oneDNN's per-shape kernels
can make bf16 slower than fp32 (measured on the quickstart, 2-core Xeon with AMX: 22.4 s in bf16 against
18.6 s in fp32 for 60 steps). So:

- CUDA: bf16 where the GPU supports it.
- CPU without native bf16 (AVX2 only: emulated, 10-100x slower) or weights already 16-bit: by the hardware
  flag, as before.
- CPU with native bf16 (AVX-512-BF16, AMX) and fp32 weights: measured. A few of the run's own micro-batches
  (at the median and 90th-percentile width) go forward and backward in fp32 and in bf16, alternately, after
  a warm-up each, timed in wall and CPU seconds (the fastest pass of each); bf16 is chosen when it is at least 5%
  faster by both (a closer race keeps fp32's precision). The
  answer is cached per machine, threads, model shape and batch shape in ``$LORAKIT_CACHE/precision.json``,
  so only the first run of a kind pays for the probe (2 micro-batches × (1 + 1, 3 or 5 rounds) × 2 precisions).

The probe changes nothing a run computes: gradients are cleared and torch's random state restored.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lorakit.device import bf16_native, cache_root, hardware_summary
from lorakit.fileio import write_atomic

MARGIN = 0.95  # bf16 must take at most this fraction of fp32's time


def pad_multiple(bf16: bool, device: torch.device) -> int:
    """Sequence lengths are padded to a multiple of this. CPU bf16: 16, since oneDNN compiles and caches a
    kernel per matmul shape; with lengths varying freely, a quickstart run's RSS grew with each new length
    (485 → 1,210 MiB over 100 steps) and a fifth of its time went to compiling. CUDA: 8 (tensor-core tiles)."""
    if device.type == "cuda":
        return 8
    return 16 if bf16 else 1


def resolve(precision: str, device: torch.device, weight_dtype: torch.dtype, key: dict,
            probe: Callable[[bool], tuple[float, float]] | None) -> tuple[bool, str]:
    """(bf16 autocast or not, one line saying why) for ``--precision``. ``probe(bf16)`` returns (wall, CPU)
    seconds of one timed pass of the run's probe micro-batches (None: decide by the hardware flag, as under
    torchrun, where ranks must not disagree); ``key`` names the model and batch shape."""
    if precision != "auto":
        return precision == "bf16", f"--precision {precision}"
    if device.type != "cpu" or weight_dtype != torch.float32 or probe is None:
        native = bf16_native(device)
        return native, f"auto: bf16 {'native' if native else 'not native'} on {device.type}"
    if not bf16_native(device):
        return False, "auto: fp32 (this CPU has no native bf16 matmuls)"
    entry = {"machine": hardware_summary(), **key}
    digest = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]
    cached = _read_cache().get(digest)
    if cached is None or "fp32_cpu_s" not in cached:
        (fp32_s, fp32_cpu), (bf16_s, bf16_cpu) = measure(probe)
        # bf16 must win clearly on both clocks: CPU time (what a shared machine pays) and wall time (what an
        # idle one waits). On the quickstart bf16 took ~10% less CPU than fp32 in the probe, about the same
        # wall time, and ran 8-12% slower; either clock alone, or "no more wall time", picked it in some probes.
        bf16 = bf16_cpu < MARGIN * fp32_cpu and bf16_s < MARGIN * fp32_s
        cached = {**entry, "fp32_s": round(fp32_s, 4), "bf16_s": round(bf16_s, 4), "fp32_cpu_s": round(fp32_cpu, 4),
                  "bf16_cpu_s": round(bf16_cpu, 4), "bf16": bf16}
        _write_cache(digest, cached)
        how = "measured"
    else:
        how = f"cached in {_cache_path()}"
    choice = "bf16" if cached["bf16"] else "fp32"
    return cached["bf16"], (f"auto: {choice} (a step's probe {cached['fp32_s'] * 1e3:.0f} ms fp32, "
                            f"{cached['bf16_s'] * 1e3:.0f} ms bf16; CPU {cached['fp32_cpu_s'] * 1e3:.0f} and "
                            f"{cached['bf16_cpu_s'] * 1e3:.0f} ms; {how})")


def measure(probe: Callable[[bool], tuple[float, float]]) -> tuple[tuple[float, float], tuple[float, float]]:
    """((fp32 wall, CPU seconds), (bf16 wall, CPU seconds)): the fastest of several alternating passes after
    one warm-up each (the warm-up compiles each shape's kernels). Rounds: 5 where a round costs under 0.4 s
    (small models, where the two precisions tend to be close), 3 under 1.5 s, else one (a real model's first
    run stays within its budget: SmolLM2-135M's passes take 1.2–1.8 s)."""
    with torch.random.fork_rng(devices=[]):
        warm = probe(False)[0], probe(True)[0]
        rounds = 5 if sum(warm) < 0.4 else 3 if sum(warm) < 1.5 else 1
        best = {False: (float("inf"), float("inf")), True: (float("inf"), float("inf"))}
        for r in range(rounds):
            for bf16 in ((False, True) if r % 2 == 0 else (True, False)):
                wall, cpu = probe(bf16)
                best[bf16] = (min(best[bf16][0], wall), min(best[bf16][1], cpu))
    return best[False], best[True]


def timed(run: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for ``run()``. Both count: the two precisions keep the
    threads busy differently, and other processes inflate wall time (``measure`` keeps each precision's
    fastest pass, alternating them)."""
    start, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - start, time.process_time() - cpu


def _cache_path() -> Path:
    return cache_root() / "precision.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(digest: str, entry: dict) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table = {**_read_cache(), digest: entry}
        write_atomic(path, lambda p: p.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n"))
    except OSError:
        pass  # a read-only home: the next run measures again
