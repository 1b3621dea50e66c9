"""Training tokens/s: one process vs two torchrun ranks (DDP over gloo) on this machine's cores.

Three ways to spend 2 CPU cores on the same job (`examples/base-model`, the quickstart task, LoRA r=16
all-linear, fp32, the same global batch of 16 examples per step and the same steps):

- ``1 proc x 1 thread``: the baseline (half the machine idle);
- ``1 proc x 2 threads``: what `lorakit train` does by default on this machine;
- ``2 ranks x 1 thread``: `torchrun --nproc-per-node 2 -m lorakit train --batch-size 8` (per-rank 8 x 2 ranks
  = 16), which is what the peer a user would otherwise pick (accelerate/TRL under torchrun) does too.

Each run is a fresh process as a user types it, run in alternating rounds; tokens/s is the loop's own figure
(metrics.jsonl: non-pad tokens of all ranks per second of training, over 5-step windows, the first window
dropped as warm-up). Medians over rounds, ratios against the baseline. No GPU here: the GPU estimate printed
at the end is arithmetic from stated assumptions, not a measurement.

    python benchmarks/distributed_scaling.py [--rounds 3] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "quickstart.yaml"


def run(kind: str, steps: int, out: Path) -> float:
    """Median tokens/s of one fresh run of ``kind``."""
    common = ["train", str(CONFIG), "--output", str(out), "--overwrite", "--max-steps", str(steps), "--grad-accum", "1",
              "--precision", "fp32", "--log-every", "5", "--save-every", "0", "--model", str(ROOT / "examples" / "base-model"),
              "--data", str(ROOT / "examples" / "data" / "task_train.jsonl"), "--val-data", ""]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    if kind == "2 ranks x 1 thread":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "lorakit", *common,
               "--batch-size", "8", "--threads", "1"]
    else:
        threads = kind.split(" x ")[1].split()[0]
        cmd = [sys.executable, "-m", "lorakit", *common, "--batch-size", "16", "--threads", threads]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{r.stderr[-3000:]}")
    rates = [json.loads(line)["tokens_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "tokens_per_s" in line]
    return statistics.median(rates[1:])


def gpu_estimate() -> list[str]:
    """DDP and FSDP scaling on GPUs from communication volume vs compute, for a 7B Llama (Llama-2-7B shapes),
    LoRA r=16 on all seven projections, 8 sequences x 512 tokens per GPU per step, bf16 compute."""
    layers, hidden, ffn, r, params = 32, 4096, 11008, 16, 6.74e9
    lora = layers * r * (4 * (hidden + hidden) + 2 * (hidden + ffn) + (ffn + hidden))  # 39,976,960
    tokens = 8 * 512
    # forward 2·P·T, backward through activations 2·P·T (no weight gradients for the frozen base)
    flops = 4 * params * tokens
    compute_s = flops / 400e12  # ~40% of an H100's dense bf16 peak
    rows = [f"LoRA parameters {lora / 1e6:.1f}M; step compute {flops:.2e} FLOP = {compute_s * 1e3:.0f} ms at 400 TFLOP/s"]
    for link, bw, n in (("NVLink, 8 GPUs in one node (~200 GB/s NCCL bus bandwidth)", 200e9, 8),
                        ("InfiniBand, 16 GPUs on 2 nodes (400 Gb/s = 50 GB/s per GPU)", 50e9, 16)):
        ring = 2 * (n - 1) / n  # bytes a GPU sends per byte of a ring all-reduce
        ddp_s = ring * lora * 4 / bw  # fp32 LoRA gradients, one all-reduce per step
        fsdp_s = 2 * (n - 1) / n * 2 * params / bw  # the bf16 base all-gathered for forward and for backward
        # efficiency per GPU = compute / step time: compute + communication if nothing overlaps, max of the two
        # if it all does (DDP's buckets all-reduce during backward; FSDP prefetches the next block's weights)
        def span(comm: float) -> str:
            return f"{compute_s / (compute_s + comm):.2f}-{compute_s / max(compute_s, comm):.2f}"

        rows.append(f"{link}: DDP all-reduce {ddp_s * 1e3:.1f} ms/step ({ddp_s / compute_s:.1%} of compute) -> "
                    f"{span(ddp_s)} per GPU; FSDP all-gathers {fsdp_s * 1e3:.0f} ms/step -> {span(fsdp_s)} per GPU")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    import torch

    from lorakit.device import hardware_summary

    torch.set_num_threads(2)
    load_before = os.getloadavg()[0]
    kinds = ["1 proc x 1 thread", "1 proc x 2 threads", "2 ranks x 1 thread"]
    results: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.rounds):
            for kind in kinds if i % 2 == 0 else kinds[::-1]:
                results[kind].append(run(kind, a.steps, Path(tmp) / f"run-{i}"))
                print(f"round {i + 1} {kind}: {results[kind][-1]:,.0f} tokens/s", flush=True)
    print(hardware_summary())
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    base = statistics.median(results[kinds[0]])
    for kind in kinds:
        m = statistics.median(results[kind])
        print(f"{kind:20s} {m:8,.0f} tokens/s  x{m / base:.2f}  (rounds: {', '.join(f'{v:,.0f}' for v in results[kind])})")
    print("GPU estimate (not measured here; no GPU):")
    for row in gpu_estimate():
        print("  " + row)


if __name__ == "__main__":
    main()
