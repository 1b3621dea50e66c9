"""Where things live: the cores and precision a machine affords, and lorakit's cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def cpu_threads() -> int:
    """The cores this process may use (cgroup/affinity aware), not the machine's count."""
    return len(os.sched_getaffinity(0))


def bf16_native(device: torch.device | str) -> bool:
    """True where bf16 matmuls run in hardware. A CPU without AVX-512-BF16/AMX emulates them, often
    ten to a hundred times slower than fp32 (seen here: 0.5 vs 33 GFLOP/s on an AVX2 CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def use_bf16(precision: str, device: torch.device | str) -> bool:
    """``precision`` auto (bf16 where native), bf16 or fp32 -> whether to run under bf16 autocast."""
    return precision == "bf16" or (precision == "auto" and bf16_native(device))


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory since it started (exec), or None where unknown.

    Linux: ``VmHWM`` of /proc/self/status, which belongs to this process's own address space. Not
    ``getrusage``'s ru_maxrss: the kernel carries that across exec from the parent, so a child started
    by ``subprocess`` (vfork) reports at least its parent's peak (measured: 2 GiB for ``python -c pass``
    spawned by a process that had once held 2 GiB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
    except (ImportError, OSError):
        return None  # Windows


def cache_root() -> Path:
    """lorakit's cache: ``$LORAKIT_CACHE`` (default ``~/.cache/lorakit``); each kind of entry in a subfolder."""
    return Path(os.environ.get("LORAKIT_CACHE", "~/.cache/lorakit")).expanduser()


def data_cache_dir() -> Path:
    """Tokenized data, keyed by content hash: ``$LORAKIT_CACHE/data`` (default ``~/.cache/lorakit/data``)."""
    return cache_root() / "data"


def hardware_summary() -> str:
    """One line naming the hardware a figure was measured on: CPU model, its matmul-relevant flags, the
    threads torch uses, and the GPU where there is one. Every benchmark prints it, since figures differ by
    hardware class (AVX2 only: bf16 emulated; AVX-512-BF16; AMX)."""
    import platform

    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8") if f in flags]
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"CPU {model} [{' '.join(shown) or 'flags unknown'}]; bf16 native: {bf16_native('cpu')}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}")
