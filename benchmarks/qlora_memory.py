"""QLoRA's memory: peak RSS of `lorakit train` on an NF4 base vs a bf16 base, and vs `lorakit params`.

A ~1B-parameter Llama (hidden 2048, 16 layers, SwiGLU 5504, vocab 32000; random init) is written as bf16
safetensors shards one tensor at a time (building it never needs the model in memory), with a small
byte-level BPE tokenizer. Then `lorakit train` runs a few steps (batch 1, short sequences, LoRA r=8 on all
linears) twice, each a fresh child process whose own peak RSS is measured (``lorakit.usage``):
`--quantization nf4` and `--dtype bfloat16`. Prints both peaks, their ratio (QLoRA's promise: at most 0.5),
the frozen base's bytes per parameter (NF4 + double quantization: 4.127 bits = 0.516 B on the linears) and
`lorakit params`' estimate next to each measurement. On a CUDA machine `lorakit train` runs on the GPU, and
each run's peak GPU memory (torch.cuda.max_memory_allocated, printed by `lorakit train`) and the nf4/bf16
ratio of those are printed too.

    python benchmarks/qlora_memory.py [--layers 16] [--hidden 2048] [--steps 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.device import hardware_summary
from lorakit.usage import run_measured

SHARD_BYTES = 500 * 2**20
ANSWER = "The answer is forty two."


def write_model(folder: Path, cfg: LlamaConfig) -> int:
    """Random bf16 weights for ``cfg`` as shards of ~500 MiB plus model.safetensors.index.json, generated
    tensor by tensor from the meta model's shapes; returns the parameter count."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    cfg.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}

    def flush() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for key, shape in shapes.items():
        norm = key.endswith("norm.weight")
        shard[key] = (torch.ones(shape) if norm else torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        if sum(t.numel() * 2 for t in shard.values()) >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum(s.numel() for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}, indent=1))
    return total


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"### Instruction:\nQuestion {i}: what is the answer?\n\n### Response:\n{ANSWER}" for i in range(20)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)


def peak_rss(cmd: list[str], log: Path) -> tuple[int, float, str]:
    """(peak RSS in bytes, seconds, output) of ``cmd`` (a ``lorakit train``) run as a fresh child process,
    measured as every benchmark here measures a child (``lorakit.usage``): a plain ``os.wait4`` would
    report at least this script's own peak, which once held a 500 MiB shard while writing the model
    (seen: nf4 1.34 GiB that way vs 1.08 GiB)."""
    with open(log, "w") as out:
        code, usage = run_measured(cmd, log.with_suffix(".usage.json"), stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    text = log.read_text()
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    return int(usage.peak_rss_mb * 2**20), usage.wall_s, text


def estimate(model: Path, seq_len: int, r: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "lorakit", "params", "--model", str(model), "--r", str(r),
                          "--target", "all-linear", "--quantization", "nf4", "--batch-size", "1", "--seq-len",
                          str(seq_len), "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["memory"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=5504)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", help="build the model here and keep it (default: a temporary folder)")
    args = ap.parse_args()
    print(f"hardware: {hardware_summary()}; load average {os.getloadavg()[0]:.2f} (1 min)")

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qlora-memory-"))
    model = root / "model"
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                      num_key_value_heads=args.hidden // 128, max_position_embeddings=2048, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if not (model / "model.safetensors.index.json").is_file():
        model.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        n = write_model(model, cfg)
        write_tokenizer(model)
        print(f"wrote a {n / 1e9:.3f}B-parameter bf16 Llama to {model} in {time.perf_counter() - t:.0f}s")
    n_params = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}: what is the answer?", "output": ANSWER}) + "\n"
                            for i in range(8)))

    results, gpu = {}, {}
    for name, flags in (("nf4", ["--quantization", "nf4"]), ("bf16", ["--dtype", "bfloat16"])):
        out = root / f"run-{name}"
        cmd = [sys.executable, "-m", "lorakit", "train", "--model", str(model), "--data", str(data), "--output",
               str(out), "--overwrite", "--max-steps", str(args.steps), "--batch-size", "1", "--seq-len",
               str(args.seq_len), "--r", str(args.r), "--target", "all-linear", "--threads", str(args.threads),
               "--lr", "1e-4", *flags]
        peak, seconds, log = peak_rss(cmd, root / f"{name}.log")
        results[name] = peak
        on_gpu = re.search(r"peak GPU memory ([\d.]+) MiB", log)
        if on_gpu:
            gpu[name] = float(on_gpu.group(1)) * 2**20
        print(f"{name:>4} base: peak RSS {peak / 2**30:.3f} GiB ({seconds:.0f}s, {args.steps} steps)"
              + (f"; peak GPU memory {gpu[name] / 2**30:.3f} GiB" if name in gpu else ""))
        if name == "nf4":
            m = re.search(r"frozen base ([\d.]+) (GiB|MiB) \(([\d.]+) B/param\)", log)
            bits = re.search(r"\(([\d.]+) bits/weight", log)
            print(f"     frozen base: {m.group(1)} {m.group(2)}, {m.group(3)} B/param overall; quantized linears "
                  f"{bits.group(1)} bits = {float(bits.group(1)) / 8:.3f} B/weight (NF4 + double quant ideal: 4.127 "
                  "bits = 0.516 B)")

    ratio = results["nf4"] / results["bf16"]
    print(f"ratio nf4/bf16 peak RSS: {ratio:.3f} (must be <= 0.5: {'ok' if ratio <= 0.5 else 'FAILED'})")
    if len(gpu) == 2:
        print(f"ratio nf4/bf16 peak GPU memory: {gpu['nf4'] / gpu['bf16']:.3f}")
    est = estimate(model, args.seq_len, args.r)
    for name, method in (("nf4", "qlora"), ("bf16", "lora")):
        e = est[method]["total"]
        print(f"lorakit params --quantization nf4, {method}: {e / 2**30:.3f} GiB estimated vs {results[name] / 2**30:.3f} "
              f"GiB measured ({100 * (e - results[name]) / results[name]:+.1f}%)")
    print(f"model: {n_params / 1e9:.3f}B parameters, folder {model}")


if __name__ == "__main__":
    main()
