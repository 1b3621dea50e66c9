"""QLoRA's quality: held-out exact match of LoRA on an NF4 base vs LoRA on the 16/32-bit base.

Both train the quickstart config (examples/configs/quickstart.yaml: the bundled stdlib base model, "name the
type of this Python value", r=16 on all linears, 300 steps of 16) from the same seed, at once, each a fresh
`python -m lorakit train` on half the cores; the only difference is `--quantization nf4` (double
quantization, block 64) on one. Each adapter is then evaluated on the base it was trained on (the NF4 run on
the NF4 base, as a QLoRA user serves it) with greedy exact match on the held-out test examples, plus
retain perplexity. Prints both, the difference and the ratio; the acceptance bar is NF4 within 5% of the
unquantized run.

`--dtype` sets the stored dtype of everything that is not quantized and so the compute dtype
(default float32: on a CPU without native bf16, bfloat16 matmuls are emulated, ~60x slower; NF4 dequantizes
to the same dtype, so the quantization error measured is the same).

    python benchmarks/qlora_quality.py [--dtype float32|bfloat16] [--max-steps 300] [--limit 200]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "configs" / "quickstart.yaml"))
    ap.add_argument("--test", default=str(ROOT / "examples" / "data" / "task_test.jsonl"))
    ap.add_argument("--retain", default=str(ROOT / "examples" / "data" / "retain.txt"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--max-steps", type=int, help="override the config's steps")
    ap.add_argument("--limit", type=int, default=200, help="test examples")
    ap.add_argument("--output", help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    os.chdir(ROOT)  # the config's relative paths

    from lorakit.device import hardware_summary
    from lorakit.evaluate import evaluate_model, load_eval_records
    from lorakit.generate import load_for_generation
    from lorakit.quickstart import run_children, training_speed

    print(f"hardware: {hardware_summary()}; load average {os.getloadavg()[0]:.2f} (1 min)")

    out = Path(args.output or tempfile.mkdtemp(prefix="qlora-quality-"))
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    steps = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    runs = {"lora": [], "qlora-nf4": ["--quantization", "nf4"]}
    usages = run_children({name: ["train", args.config, "--output", str(out / name), "--overwrite", "--dtype",
                                  args.dtype, "--threads", threads, *steps, *flags] for name, flags in runs.items()})

    records, fmt = load_eval_records(args.test, limit=args.limit)
    text = Path(args.retain).read_text(encoding="utf-8")
    results = {}
    for name in runs:
        model, tokenizer = load_for_generation(None, str(out / name))  # on the base it was trained on
        report = evaluate_model(model, tokenizer, records, text, model.config.max_position_embeddings, fmt=fmt)
        results[name] = {"exact_match": report.exact_match, "perplexity": report.perplexity,
                         "peak_rss_mb": round(usages[name].peak_rss_mb, 1),
                         "tokens_per_s": round(training_speed(out / name), 1)}
        del model
        print(f"{name:>9}: exact match {report.exact_match:.1%} on {len(records)} held-out, retain perplexity "
              f"{report.perplexity:.1f}, train peak RSS {usages[name].peak_rss_mb:.0f} MB, "
              f"{results[name]['tokens_per_s']:.0f} tokens/s")
    base, nf4 = results["lora"]["exact_match"], results["qlora-nf4"]["exact_match"]
    gap = (base - nf4) / base if base else 0.0
    where = f"{gap:.1%} below" if gap > 0 else f"{-gap:.1%} above"
    print(f"NF4 QLoRA vs {args.dtype} LoRA exact match: {nf4:.1%} vs {base:.1%} ({100 * (nf4 - base):+.1f} points, "
          f"{where} relative; must be within 5% below: {'ok' if gap <= 0.05 else 'FAILED'})")
    (out / "quality.json").write_text(json.dumps({"dtype": args.dtype, "limit": args.limit, **results}, indent=2))
    print(f"runs and quality.json in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
