"""One LoRA training step, lorakit vs PEFT, on the same model in one process, alternating.

Llama 512 wide, 8 layers, SwiGLU 1408, vocab 32000; bf16 base weights, bf16 autocast, AdamW,
r=16 on all seven projections, batch 4×256. Prints the hardware (CPU model and flags) and load average,
tokens/s for both, the ratio, the fraction of the machine's matmul roofline (measured here, in the same
dtype) that lorakit reaches, and (``--profile``) where lorakit's step time goes.

Each side runs its step as its users get it: PEFT as ``model(input_ids, labels=...).loss`` (transformers'
layers and loss); lorakit as ``lorakit train`` runs it (``train/fastpath.py``'s fused decoder layers on CPU,
``train/fused_loss.py``'s chunked cross-entropy against the head, and on CPU with several threads the batch's
rows as slices side by side, a core each: ``train/cores.py``) and, with ``--compile``, also as
``lorakit train --compile`` runs it (``train/compile.py``; the compile is timed apart, in the warm-up). On CUDA lorakit uses
liger-kernel's RMSNorm, SwiGLU and RoPE where installed (``benchmarks/gpu.sh`` installs it); liger patches
RoPE module-wide, so PEFT's side gets that kernel too and the ratio there is, if anything, conservative.

``--precision auto`` runs bf16 where the hardware has bf16 matmuls and fp32 elsewhere: a CPU without
AVX-512-BF16/AMX emulates bf16 GEMMs tens of times slower than fp32, which would measure the emulation.

    python benchmarks/lora_step_vs_peft.py [--precision auto|bf16|fp32] [--rounds 5] [--steps 3] [--threads N]
        [--device cpu|cuda] [--model-config examples/configs/llama-3.2-1b] [--batch 4] [--seq 256] [--profile]
        [--compile] [--unsplit] [--gemm-floor]
"""

# ruff: noqa: E402
from __future__ import annotations

import os

# As `lorakit train` runs (lorakit/__init__.py): idle OpenMP threads sleep, set before torch loads its
# OpenMP runtime, for both sides. Spinning waiters would also count as CPU time, which the benchmark reports.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.device import bf16_native, cpu_threads, hardware_summary, use_bf16
from lorakit.train import fastpath
from lorakit.train.causal_loss import shifted_hidden
from lorakit.train.compile import compile_layers
from lorakit.train.cores import CoreSplit, batch_backward, core_split, split_rows
from lorakit.train.fused_loss import fused_head, linear_cross_entropy

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_config(path: str | None, seq: int) -> LlamaConfig:
    """The benchmark's Llama (512 wide, 8 layers), or a config.json's (e.g. examples/configs/llama-3.2-1b)."""
    if path is None:
        return LlamaConfig(hidden_size=512, num_hidden_layers=8, intermediate_size=1408, vocab_size=32000,
                           num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=seq)
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    fields = {k: v for k, v in json.loads(file.read_text()).items() if k not in ("architectures", "torch_dtype")}
    return LlamaConfig(**fields)


def build(cfg: LlamaConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(cfg).to(dtype).train()
    model.config.use_cache = False  # as lorakit train and transformers' Trainer set it: no KV cache in training
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_roofline(dtype: torch.dtype, device: torch.device, threads: int, n: int = 2048,
                    reps: int = 10) -> tuple[float, float]:
    """(best GEMM FLOP/s in ``dtype`` by wall time, the same by CPU time / threads): the ceiling a training
    step can approach on this machine, the second less affected by other processes."""
    n = 8192 if device.type == "cuda" else n
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    wall = cpu = float("inf")
    for _ in range(reps):
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        a @ b
        sync(device)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return 2 * n**3 / wall, 2 * n**3 / (wall if device.type == "cuda" else cpu / threads)


def step_flops(cfg: LlamaConfig, batch: int, seq: int) -> float:
    """Matmul FLOPs of one LoRA step: forward 2·T·P plus input-gradient backward 2·T·P over the layers' and
    head's weights (frozen: no weight gradients), attention scores/values 4·B·S²·h·L forward and twice that
    backward. LoRA's own matmuls (r=16) add under 2% and are left out."""
    h, L, inter, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    p = L * (2 * h * q + 2 * h * kv + 3 * h * inter) + h * v
    t = batch * seq
    return 4 * t * p + 12 * batch * seq * seq * q * L


def peft_backward(model, bf16: bool) -> Callable[[torch.Tensor], None]:
    """PEFT as its users run it: transformers' layers and its loss on the whole logits, under autocast."""
    def backward(ids: torch.Tensor) -> None:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return backward


def lorakit_loss(model, head, bf16: bool) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """lorakit's loss as ``lorakit train`` computes it (``train/text.py``): the model's own forward with the
    head as the identity (autocast inside), then the chunked cross-entropy against the head's weight,
    summed over the targets."""
    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden, targets = shifted_hidden(model, head, batch, bf16)
        return linear_cross_entropy(hidden, head.weight, targets)
    return loss


def lorakit_backward(model, head, bf16: bool, cores: CoreSplit | None) -> Callable[[torch.Tensor], None]:
    """lorakit's forward and backward of a batch as ``lorakit train`` runs them (``train/loop.py``): the mean
    over the targets, with the rows as slices side by side on the cores where ``cores`` is given."""
    loss, params = lorakit_loss(model, head, bf16), [p for p in model.parameters() if p.requires_grad]

    def backward(ids: torch.Tensor) -> None:
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        batch_backward(loss, batch, params, ids[:, 1:].numel(), cores=cores, split=split_rows)
    return backward


def timed_steps(backward, opt, ids, steps: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this process) per optimizer step (forward, backward,
    AdamW) over ``steps``. On a CPU shared with other work, wall time also measures the neighbours; CPU
    seconds divided by the threads estimate the step on an idle machine (an estimate: contention also
    costs CPU time, in caches and in threads waiting for each other)."""
    walls, cpus = [], []
    for _ in range(steps):
        sync(ids.device)
        t, c = time.perf_counter(), time.process_time()
        backward(ids)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(ids.device)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def cpu_seconds(run: Callable[[], object], reps: int = 3) -> float:
    """Median CPU seconds of this process for ``run()`` (after one untimed call)."""
    run()
    times = []
    for _ in range(reps):
        c = time.process_time()
        run()
        times.append(time.process_time() - c)
    return statistics.median(times)


def breakdown(cfg: LlamaConfig, model, head, opt, ids: torch.Tensor, bf16: bool, step_cpu: float,
              roof_cpu: float, threads: int) -> None:
    """What lorakit's step is made of, in CPU seconds (less distorted by other processes than wall time):
    the loss against the head (forward and backward of the chunked cross-entropy on (N, H) hidden states),
    AdamW's update, and the rest (embedding, decoder layers, final norm), each with its matmul FLOP/s
    against the CPU-time roofline. The same for PEFT's loss (whole fp32 logits, then cross-entropy)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    n, h, v = ids.numel(), cfg.hidden_size, cfg.vocab_size
    hidden = torch.randn(n, h, dtype=dtype, requires_grad=True)
    targets = ids.reshape(-1)
    weight = head.weight.detach().to(dtype)

    def ours() -> None:
        linear_cross_entropy(hidden, weight, targets).backward()

    def reference() -> None:
        torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum").backward()

    lorakit_backward(model, head, bf16, None)(ids)
    adamw = cpu_seconds(opt.step)  # on the gradients just computed; the benchmark's numbers are done
    opt.zero_grad(set_to_none=True)
    head_s, ref_head_s = cpu_seconds(ours), cpu_seconds(reference)
    head_flops = 4 * n * h * v  # logits forward, d_hidden backward
    rest_flops = step_flops(cfg, *ids.shape) - head_flops
    rest = step_cpu - head_s - adamw
    print(f"lorakit step by CPU time ({threads} threads; CPU seconds / threads as the wall time of an idle machine):")
    for name, sec, flops in (("loss against the head", head_s, head_flops), ("AdamW", adamw, 0),
                             ("embedding, decoder layers, norm", rest, rest_flops), ("whole step", step_cpu,
                                                                                    step_flops(cfg, *ids.shape))):
        rate = f"{flops * threads / sec / 1e9:7.1f} GFLOP/s = {flops * threads / sec / roof_cpu:4.0%} of roofline" \
            if flops else ""
        print(f"  {name:32s}{sec:7.3f} CPU s {sec / step_cpu:5.0%}  {rate}")
    print(f"  (PEFT's loss on whole fp32 logits: {ref_head_s:.3f} CPU s for the same head)")


def gemm_floor(backward, opt, ids, roof: float, step_s: float, step_flop: float) -> None:
    """The step's matrix products alone: every mm/addmm/bmm one unsplit lorakit step runs, recorded with
    its operands (a TorchDispatchMode) and replayed in order with nothing between them. Their FLOP/s is what
    a step with free norms, RoPE, softmax, SiLU and AdamW would reach: the ceiling of the roofline fraction
    on this machine with torch's GEMMs at these shapes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    kinds = {aten.mm.default, aten.mm.out, aten.addmm.default, aten.addmm_.default, aten.bmm.default}
    calls: list[tuple] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in kinds:  # operands kept as they were (addmm_'s accumulator copied before it changes)
                kept = [a.detach().clone() if i == 0 and func is aten.addmm_.default else
                        a.detach() if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
                calls.append((func, kept, {k: v.detach() if isinstance(v, torch.Tensor) else v
                                           for k, v in kwargs.items()}))
            return func(*args, **kwargs)

    with Record():
        timed_steps(backward, opt, ids, 1)

    def flop(func, args) -> int:
        a, b = (args[1], args[2]) if func in (aten.addmm.default, aten.addmm_.default) else (args[0], args[1])
        return 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)

    @torch.no_grad()
    def replay() -> None:
        for func, args, kwargs in calls:
            func(*args, **kwargs)

    replay()
    times = []
    for _ in range(5):
        sync(ids.device)
        t = time.perf_counter()
        replay()
        sync(ids.device)
        times.append(time.perf_counter() - t)
    sec, total = statistics.median(times), sum(flop(f, a) for f, a, _ in calls)
    print(f"GEMMs alone (one unsplit lorakit step's {len(calls)} products, replayed): {sec * 1e3:.0f} ms against "
          f"the step's {step_s * 1e3:.0f} ms, {total / sec / 1e9:.0f} GFLOP/s = {total / sec / roof:.0%} of the "
          f"roofline; a step of nothing else would reach {step_flop / sec / roof:.0%} by this benchmark's count")


def profile(backward, opt, ids, rows: int = 25) -> None:
    """torch.profiler's table of lorakit's step: where its time goes, by operator (self time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        timed_steps(backward, opt, ids, 2)
    key = "self_cuda_time_total" if ids.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=cpu_threads())
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model-config", help="a Llama config.json or its folder (default: 512 wide × 8 layers)")
    ap.add_argument("--compile", action="store_true", help="also lorakit with --compile (a third system, timed after its compile)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's table of lorakit's step")
    ap.add_argument("--gemm-floor", action="store_true",
                    help="replay the unsplit step's matrix products alone: the roofline fraction's ceiling")
    ap.add_argument("--unsplit", action="store_true",
                    help="also lorakit with the batch's rows not split across the cores (train/cores.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16 = use_bf16(args.precision, device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    cfg = model_config(args.model_config, args.seq)
    print(f"hardware: {hardware_summary()}")
    load_before = os.getloadavg()
    base = build(cfg, dtype, device)
    models = {"lorakit": lorakit.add_lora(copy.deepcopy(base), lorakit.LoraConfig(r=16, alpha=32, target_modules=TARGETS))}
    for name, wanted in (("lorakit unsplit", args.unsplit), ("lorakit --compile", args.compile)):
        if wanted:
            models[name] = copy.deepcopy(models["lorakit"])
    models["peft"] = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    del base
    # as lorakit train: the rows split across the cores on CPU, not with --compile (train/text.py)
    parts, threads_each = core_split(args.threads, args.batch)
    cores = CoreSplit(parts, threads_each) if parts > 1 and device.type == "cpu" else None
    steps = {"peft": peft_backward(models["peft"], bf16)}
    for name in (n for n in models if n != "peft"):
        layers = compile_layers(models[name]) if name.endswith("compile") else fastpath.enable(models[name])
        head = fused_head(models[name])
        assert head is not None, "the benchmark's Llama has a plain head"
        split = cores if name == "lorakit" else None
        rows = f"; rows split across cores ({parts} slices × {threads_each} threads)" if split else ""
        print(f"{name} step: {layers}; chunked cross-entropy against the head{rows}")
        steps[name] = lorakit_backward(models[name], head, bf16, split)
    ours, head = models["lorakit"], fused_head(models["lorakit"])
    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for name, m in models.items()}
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    peaks: dict[str, int] = {}
    resting = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for name in steps:  # warm-up: first-touch allocations, oneDNN kernel selection, compilation
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        timed_steps(steps[name], opts[name], ids, 2 if name.endswith("compile") else 1)
        if device.type == "cuda":
            peaks[name] = torch.cuda.max_memory_allocated(device) - resting
        what = " (includes compiling, or loading the cached kernels)" if name.endswith("compile") else ""
        print(f"warm-up {name}: {time.perf_counter() - t:.1f} s{what}", flush=True)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            results[name].append(timed_steps(steps[name], opts[name], ids, args.steps))
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(
            f"{n} {v[-1][0]:.3f} s/step ({v[-1][1]:.3f} CPU s)" for n, v in results.items()), flush=True)
    tokens = args.batch * args.seq
    cpu_scale = 1 if device.type == "cuda" else args.threads  # CPU seconds per wall second on an idle machine
    tps = {n: tokens / statistics.median(w for w, _ in v) for n, v in results.items()}
    tps_cpu = {n: tokens * cpu_scale / statistics.median(c for _, c in v) for n, v in results.items()}
    roof, roof_cpu = matmul_roofline(dtype, device, args.threads)
    flops = step_flops(cfg, args.batch, args.seq) / tokens  # per token
    native = bf16_native(device)
    print(f"precision={'bf16 weights + bf16 autocast' if bf16 else 'fp32'} (bf16 native here: {native}); "
          f"device {device}")
    print(f"model: hidden {cfg.hidden_size} × {cfg.num_hidden_layers} layers, MLP {cfg.intermediate_size}, "
          f"vocab {cfg.vocab_size}; r=16 on {len(TARGETS)} projections")
    print(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} threads={args.threads} batch={args.batch}x{args.seq} rounds={args.rounds}x{args.steps} steps (medians)")
    for name in results:
        memory = f"; step peak {peaks[name] / 2**20:,.0f} MiB GPU memory above the weights" if name in peaks else ""
        by_cpu = "" if device.type == "cuda" else f"; by CPU time: {tps_cpu[name]:.1f} tokens/s"
        print(f"{name:8} {tps[name]:10.1f} tokens/s{by_cpu}{memory}")
    print(f"{dtype} matmul roofline {roof / 1e9:.1f} GFLOP/s" + ("" if device.type == "cuda" else
                                                                  f" (by CPU time: {roof_cpu / 1e9:.1f} GFLOP/s)"))
    for name in (n for n in results if n != "peft"):
        by_cpu = "" if device.type == "cuda" else \
            f" (by CPU time: {tps_cpu[name] / tps_cpu['peft']:.2f}x; {flops * tps_cpu[name] / roof_cpu:.0%} of the roofline)"
        print(f"ratio {name}/peft = {tps[name] / tps['peft']:.2f}x; {name} step reaches {flops * tps[name] / 1e9:.1f} "
              f"GFLOP/s = {flops * tps[name] / roof:.0%} of the roofline{by_cpu}")
    print(f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after (1 min)")
    if device.type != "cuda":
        step_cpu = statistics.median(c for _, c in results["lorakit"])
        breakdown(cfg, ours, head, opts["lorakit"], ids, bf16, step_cpu, roof_cpu, args.threads)
    if args.gemm_floor:
        unsplit = lorakit_backward(ours, head, bf16, None)
        step_s = statistics.median(timed_steps(unsplit, opts["lorakit"], ids, 1)[0] for _ in range(3))
        gemm_floor(unsplit, opts["lorakit"], ids, roof, step_s, step_flops(cfg, args.batch, args.seq))
    if args.profile:
        profile(steps["lorakit"], opts["lorakit"], ids)


if __name__ == "__main__":
    main()
