"""End to end: `lorakit train` vs what a user would otherwise run, TRL's `SFTTrainer` with a PEFT LoRA.

Same model (examples/base-model), same data (examples/data/task_train.jsonl: alpaca rows rendered by
lorakit's template into TRL prompt/completion pairs, so both train on the same token sequences, loss on
the answer only), same steps, batch, learning rate and schedule (linear warmup, cosine), AdamW, gradient
clipping 1.0, LoRA r/alpha/dropout 0 on all linear layers but the head, fp32 for both by default
(`--precision bf16`: bf16 autocast for both; on a CPU without native bf16 it is emulated, ~20x slower), no gradient checkpointing (TRL turns it on by
default; lorakit by default does not), no packing and no padding-free batches for either, and
length-grouped batches for both (lorakit's default; TRL's `train_sampling_strategy="group_by_length"`;
`--trl-sampling random` gives TRL's default order instead).

Each run is a fresh process (`python -m lorakit train` as a user types it; a plain SFTTrainer script for
TRL), run alternately (lorakit, trl, lorakit, trl, ...). Per run: process wall time (imports, loading,
tokenization, training, saving: what the user waits for), training tokens/s (non-pad tokens the
optimizer steps saw over the training loop's time, counted the same way for both: attention-mask sums),
CPU seconds, peak RSS (of the process alone: lorakit.usage), and the mean loss of the last 10 steps. Medians over the repeats, with ratios.

    python benchmarks/train_vs_trl.py [--repeats 2] [--steps 100] [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from lorakit.device import hardware_summary
from lorakit.usage import measured_popen, read_usage

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "base-model"
DATA = ROOT / "examples" / "data" / "task_train.jsonl"


def lorakit_flags(a: argparse.Namespace, output: Path) -> list[str]:
    return ["train", "--model", str(a.model), "--data", str(a.data), "--output", str(output), "--overwrite",
            "--max-steps", str(a.steps), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
            "--warmup-steps", str(a.warmup_steps), "--r", str(a.r), "--alpha", str(a.alpha), "--target", "all-linear",
            "--seq-len", str(a.seq_len), "--precision", a.precision, "--log-every", "1", "--threads", str(a.threads),
            "--seed", "0"]


def lorakit_loop(a: argparse.Namespace, output: Path) -> tuple[int, float, list[float]]:
    """(non-pad tokens trained on, training-loop seconds, step losses) of a finished `lorakit train` run:
    metrics.jsonl gives each step's loss and tokens/s; the step's tokens come from replaying the run's
    deterministic batch order (same data, seed and batch size), so seconds = tokens / (tokens/s)."""
    from lorakit.config import load_config
    from lorakit.data import collate, length_grouped_batches, load_datasets
    from lorakit.data.tokenize import load_tokenizer, pad_token_id
    from lorakit.train.loop import BatchStream

    cfg = load_config(output / "config.yaml")
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    train, _ = load_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    pad = pad_token_id(tokenizer)
    # the text task's order and collate, without loading the model again
    stream = BatchStream(SimpleNamespace(
        batch_order=lambda e, b: length_grouped_batches(train, b, cfg.train.seed, e),
        collate=lambda ids: collate([train[i] for i in ids], pad)), cfg.train.batch_size)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r]
    tokens = [int(stream.next()[0]["attention_mask"].sum()) for _ in steps]
    return sum(tokens), sum(n / r["tokens_per_s"] for n, r in zip(tokens, steps, strict=True)), \
        [r["loss"] for r in steps]


def trl_child(a: argparse.Namespace, output: Path, result: Path) -> None:
    """The TRL run, in this (fresh) process: what a user's SFTTrainer script does, plus a timing callback."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lorakit.data.formats import read_records, to_segments

    torch.set_num_threads(a.threads)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    # lorakit's alpaca template, split where lorakit's loss starts; TRL appends the eos to the completion
    rows = []
    for _, record in read_records(a.data):
        prompt, _ = to_segments(record, "alpaca", tokenizer)[0]
        rows.append({"prompt": prompt, "completion": record["output"]})

    class LoopClock(TrainerCallback):
        """Training-loop time: from the start of training to the end of the last optimizer step."""

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.end = time.perf_counter()

    clock = LoopClock()
    config = SFTConfig(
        output_dir=str(output), max_steps=a.steps, per_device_train_batch_size=a.batch_size, learning_rate=a.lr,
        lr_scheduler_type="cosine", warmup_steps=a.warmup_steps, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_length=a.seq_len, packing=False, padding_free=False, completion_only_loss=True,
        train_sampling_strategy=a.trl_sampling, gradient_checkpointing=False, bf16=a.precision == "bf16", fp16=False, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32), args=config,
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[clock],
        peft_config=LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, target_modules="all-linear",
                               task_type="CAUSAL_LM"),
    )
    trainer.train()
    trainer.save_model(str(output))
    logs = [r for r in trainer.state.log_history if "loss" in r and "num_tokens" in r]
    result.write_text(json.dumps({"tokens": int(logs[-1]["num_tokens"]), "loop_s": clock.end - clock.start,
                                  "losses": [r["loss"] for r in logs]}))


def run(argv: list[str]) -> tuple[float, float, float]:
    """Run ``python ARGV`` to completion; (wall seconds, CPU seconds, peak RSS in MiB) of that process alone
    (``lorakit.usage``: not inflated by this script's own peak)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: fair on a shared CPU
    with tempfile.TemporaryDirectory() as tmp:
        proc = measured_popen([sys.executable, *argv], Path(tmp) / "usage.json", env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        err = proc.stderr.read()
        if proc.wait() != 0:
            sys.exit(f"{' '.join(argv[:3])} failed (exit {proc.returncode}):\n{err[-3000:]}")
        usage = read_usage(Path(tmp) / "usage.json")
    return usage.wall_s, usage.cpu_s, usage.peak_rss_mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs per tool, alternating")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--trl-sampling", default="group_by_length", choices=("group_by_length", "random"))
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: run TRL here, results to this file
    ap.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        trl_child(a, a.output, a.child)
        return

    passthrough = sys.argv[1:]
    print(f"hardware: {hardware_summary()}", flush=True)
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {"lorakit": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="train_vs_trl-") as tmp:
        for i in range(a.repeats):
            for tool in ("lorakit", "trl"):
                out = Path(tmp) / f"{tool}-{i}"
                if tool == "lorakit":
                    wall, cpu, rss = run(["-m", "lorakit", *lorakit_flags(a, out)])
                    tokens, loop_s, losses = lorakit_loop(a, out)
                else:
                    result = Path(tmp) / f"trl-{i}.json"
                    wall, cpu, rss = run([__file__, *passthrough, "--child", str(result), "--output", str(out)])
                    r = json.loads(result.read_text())
                    tokens, loop_s, losses = r["tokens"], r["loop_s"], r["losses"]
                row = {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss, "tokens": tokens, "tokens_per_s": tokens / loop_s,
                       "loop_s": loop_s, "final_loss": statistics.mean(losses[-10:])}
                results[tool].append(row)
                print(f"run {i + 1}/{a.repeats} {tool:8s} wall {wall:6.1f} s  CPU {cpu:6.1f} s  loop {loop_s:6.1f} s  "
                      f"{row['tokens_per_s']:7.0f} tokens/s  peak RSS {rss:6.0f} MiB  tokens {tokens}  "
                      f"loss(last 10) {row['final_loss']:.3f}", flush=True)

    med = {tool: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for tool, rows in results.items()}
    print(f"\n{a.steps} steps x batch {a.batch_size}, LoRA r={a.r} alpha={a.alpha:g} all-linear, lr {a.lr:g}, {a.precision}, "
          f"{a.threads} threads, no packing/padding-free; batches: lorakit length-grouped, TRL {a.trl_sampling}; "
          f"medians of {a.repeats} alternating runs; load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'':10s}{'wall s':>10s}{'CPU s':>10s}{'tokens/s':>12s}{'peak RSS MiB':>14s}{'loss':>8s}")
    for tool in ("lorakit", "trl"):
        m = med[tool]
        print(f"{tool:10s}{m['wall_s']:10.1f}{m['cpu_s']:10.1f}{m['tokens_per_s']:12.0f}{m['peak_rss_mb']:14.0f}"
              f"{m['final_loss']:8.3f}")
    ratio = {k: med["lorakit"][k] / med["trl"][k] for k in ("wall_s", "cpu_s", "tokens_per_s", "peak_rss_mb")}
    print(f"{'ratio':10s}{ratio['wall_s']:10.2f}{ratio['cpu_s']:10.2f}{ratio['tokens_per_s']:12.2f}"
          f"{ratio['peak_rss_mb']:14.2f}   (lorakit / trl; tokens/s: higher is better, the rest lower)")


if __name__ == "__main__":
    main()
