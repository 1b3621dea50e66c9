"""One LoRA training step, lorakit vs PEFT, on the same model in one process, alternating.

Llama 512 wide, 8 layers, SwiGLU 1408, vocab 32000; bf16 base weights, bf16 autocast, AdamW,
r=16 on all seven projections, batch 4×256. Prints tokens/s for both, the ratio, and the fraction of the
machine's matmul roofline (measured here, in the same dtype) that lorakit reaches.

``--precision auto`` runs bf16 where the hardware has bf16 matmuls and fp32 elsewhere: a CPU without
AVX-512-BF16/AMX emulates bf16 GEMMs tens of times slower than fp32, which would measure the emulation.

    python benchmarks/lora_step_vs_peft.py [--precision auto|bf16|fp32] [--rounds 5] [--steps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.device import bf16_native, cpu_threads, use_bf16

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(cfg: LlamaConfig, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).train()


def matmul_roofline(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best GEMM throughput (FLOP/s) in ``dtype`` on this machine: the ceiling a training step can approach."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def step_flops(cfg: LlamaConfig, batch: int, seq: int) -> float:
    """Matmul FLOPs of one LoRA step: forward 2·T·P plus input-gradient backward 2·T·P over the layers' and
    head's weights (frozen: no weight gradients), attention scores/values 4·B·S²·h·L forward and twice that
    backward. LoRA's own matmuls (r=16) add under 2% and are left out."""
    h, L, inter, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    p = L * (2 * h * h + 2 * h * kv + 3 * h * inter) + h * v
    t = batch * seq
    return 4 * t * p + 12 * batch * seq * seq * h * L


def timed_steps(model, opt, ids, steps: int, bf16: bool) -> float:
    """Median seconds per optimizer step (forward, backward, AdamW) over ``steps``."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=cpu_threads())
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = use_bf16(args.precision, "cpu")
    dtype = torch.bfloat16 if bf16 else torch.float32
    cfg = LlamaConfig(hidden_size=512, num_hidden_layers=8, intermediate_size=1408, vocab_size=32000,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=args.seq)
    base = build(cfg, dtype)
    ours = lorakit.add_lora(copy.deepcopy(base), lorakit.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
    theirs = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    del base
    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for name, m in (("lorakit", ours), ("peft", theirs))}
    models = {"lorakit": ours, "peft": theirs}
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    for name in models:  # warm-up: first-touch allocations, oneDNN kernel selection
        timed_steps(models[name], opts[name], ids, 1, bf16)
    results: dict[str, list[float]] = {"lorakit": [], "peft": []}
    for r in range(args.rounds):
        order = ("lorakit", "peft") if r % 2 == 0 else ("peft", "lorakit")
        for name in order:
            results[name].append(timed_steps(models[name], opts[name], ids, args.steps, bf16))
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {v[-1]:.2f} s/step" for n, v in results.items()),
              flush=True)
    tokens = args.batch * args.seq
    tps = {n: tokens / statistics.median(v) for n, v in results.items()}
    roof = matmul_roofline(dtype)
    achieved = step_flops(cfg, args.batch, args.seq) * tps["lorakit"] / tokens
    print(f"precision={'bf16 weights + bf16 autocast' if bf16 else 'fp32'} (bf16 native here: {bf16_native('cpu')})")
    print(f"threads={args.threads} batch={args.batch}x{args.seq} rounds={args.rounds}x{args.steps} steps (medians)")
    print(f"peft     {tps['peft']:9.1f} tokens/s")
    print(f"lorakit  {tps['lorakit']:9.1f} tokens/s")
    print(f"ratio lorakit/peft = {tps['lorakit'] / tps['peft']:.2f}x")
    print(f"{dtype} matmul roofline {roof / 1e9:.1f} GFLOP/s; lorakit step reaches {achieved / 1e9:.1f} GFLOP/s "
          f"= {achieved / roof:.0%} of it")


if __name__ == "__main__":
    main()
