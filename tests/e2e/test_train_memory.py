"""A bf16 run's memory does not grow with its step count (`lorakit train` as a user runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.device import bf16_native

ROOT = Path(__file__).resolve().parents[2]


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.strip().endswith("}")]
    return max(steps, default=0)


@pytest.mark.skipif(not bf16_native("cpu"), reason="oneDNN's native bf16 kernels (on AVX2 bf16 is emulated, "
                                                   "minutes for this run)")
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_bf16_rss_is_flat_from_step_20_to_step_200(tmp_path):
    """The quickstart's task: lengths vary from example to example, which made oneDNN keep a kernel per
    matmul shape (RSS +20% from step 20 to 100 before lengths were padded to multiples of 16)."""
    output = tmp_path / "run"
    cmd = [sys.executable, "-m", "lorakit", "train", str(ROOT / "examples/configs/quickstart.yaml"),
           "--model", str(ROOT / "examples/base-model"), "--data", str(ROOT / "examples/data/task_train.jsonl"),
           "--val-data", str(ROOT / "examples/data/task_val.jsonl"), "--output", str(output),
           "--precision", "bf16", "--max-steps", "200", "--grad-accum", "1", "--log-every", "1", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    samples: list[tuple[int, float]] = []  # (last logged step, VmRSS)
    try:
        while proc.poll() is None:
            step, rss = last_step(output / "metrics.jsonl"), rss_mib(proc.pid)
            if rss is not None and step >= 20:
                samples.append((step, rss))
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.stderr.read()
        proc.wait()
    assert proc.returncode == 0, err
    early = [rss for step, rss in samples if step < 25]
    late = [rss for step, rss in samples if 180 <= step < 200]
    assert early and late, samples[:3]
    assert max(late) <= 1.05 * early[0], (early[0], max(late))
