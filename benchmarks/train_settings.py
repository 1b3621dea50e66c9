"""`lorakit train`'s automatic settings against the explicit choices, on the quickstart config.

``--compare precision``: ``--precision fp32``, ``bf16`` and ``auto``, the last twice: with its probe's
cached answer removed first (what the first run of a model shape on a machine pays) and with it cached
(every later run). ``--compare threads``: a busy neighbour process (one thread of torch matmuls, or a
Python busy loop) runs throughout, and ``lorakit train`` runs with its default threads (no flag), with
``--threads 1`` and with ``--threads 2``; the precision probe's answers are cached by a warm-up round first.

Each run is a fresh process (`python -m lorakit train examples/configs/quickstart.yaml ...` as a user types
it), in alternating rounds; per run: wall seconds, CPU seconds and peak RSS of that process alone
(``lorakit.usage``). Prints the medians, each setting's ratio to the best, the hardware and load average.

    python benchmarks/train_settings.py --compare precision [--steps 60] [--rounds 3]
    python benchmarks/train_settings.py --compare threads [--steps 20] [--rounds 3] [--neighbour torch|python]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lorakit.config import load_config
from lorakit.device import cache_root, hardware_summary
from lorakit.usage import ChildUsage, run_measured

ROOT = Path(__file__).resolve().parent.parent
NEIGHBOURS = {
    "torch": "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n",
    "python": "while True:\n    pass\n",
}


def train(flags: list[str], steps: int, output: Path, env: dict[str, str]) -> tuple[ChildUsage, str]:
    """One `lorakit train` of the quickstart config with ``flags``: its wall, CPU and peak RSS, and the
    precision it ran in (config.yaml records what ``auto`` chose)."""
    cmd = [sys.executable, "-m", "lorakit", "train", "examples/configs/quickstart.yaml", "--output", str(output),
           "--overwrite", "--max-steps", str(steps), *flags]
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "err", "w+") as err:
        code, usage = run_measured(cmd, Path(tmp) / "usage.json", cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=err)
        if code != 0:
            err.seek(0)
            sys.exit(f"{' '.join(cmd[2:])} failed (exit {code}):\n{err.read()[-3000:]}")
    return usage, load_config(output / "config.yaml").train.precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", choices=("precision", "threads"), required=True)
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default: 60 precision, 20 threads)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--neighbour", choices=tuple(NEIGHBOURS), default="torch")
    ap.add_argument("--precision", default="auto", help="--compare threads: the runs' --precision")
    a = ap.parse_args()
    steps = a.steps or (60 if a.compare == "precision" else 20)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    probe_cache = cache_root() / "precision.json"
    if a.compare == "precision":
        settings = {"fp32": ["--precision", "fp32"], "bf16": ["--precision", "bf16"],
                    "auto (probe run)": ["--precision", "auto"], "auto (cached)": ["--precision", "auto"]}
    else:
        settings = {"default threads": [], "--threads 1": ["--threads", "1"], "--threads 2": ["--threads", "2"]}
        settings = {k: [*v, "--precision", a.precision] for k, v in settings.items()}
    print(f"hardware: {hardware_summary()}", flush=True)
    load_before = os.getloadavg()
    neighbour = None
    results: dict[str, list[ChildUsage]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory(prefix="train_settings-") as tmp:
        out = Path(tmp) / "run"
        if a.compare == "threads":
            for flags in settings.values():  # warm-up: tokenized data and the precision probes cached
                train(flags, 1, out, env)
            neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOURS[a.neighbour]])
            print(f"neighbour: a busy {a.neighbour} process (pid {neighbour.pid}) runs throughout", flush=True)
        try:
            for r in range(a.rounds):
                names = list(settings) if r % 2 == 0 else list(reversed(settings))
                if a.compare == "precision":  # the probe run must come before the cached one
                    names.sort(key=lambda n: n == "auto (cached)")
                for name in names:
                    if name == "auto (probe run)":
                        probe_cache.unlink(missing_ok=True)
                    u, ran = train(settings[name], steps, out, env)
                    results[name].append(u)
                    print(f"round {r + 1}/{a.rounds} {name:18s} wall {u.wall_s:6.1f} s  CPU {u.cpu_s:6.1f} s  "
                          f"peak RSS {u.peak_rss_mb:6.0f} MiB  ran in {ran}  (load {os.getloadavg()[0]:.2f})",
                          flush=True)
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
    med = {n: {k: statistics.median(getattr(u, k) for u in rows) for k in ("wall_s", "cpu_s", "peak_rss_mb")}
           for n, rows in results.items()}
    best = min(m["wall_s"] for m in med.values())
    print(f"\nquickstart config, {steps} steps, medians of {a.rounds} alternating rounds; load average "
          f"{load_before[0]:.2f} -> {os.getloadavg()[0]:.2f} (1 min)")
    print(f"{'':20s}{'wall s':>9s}{'/ best':>8s}{'CPU s':>9s}{'peak RSS MiB':>14s}")
    for name, m in med.items():
        print(f"{name:20s}{m['wall_s']:9.1f}{m['wall_s'] / best:8.2f}{m['cpu_s']:9.1f}{m['peak_rss_mb']:14.0f}")
    if a.compare == "precision":
        print(f"bf16 / fp32 peak RSS: {med['bf16']['peak_rss_mb'] / med['fp32']['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
