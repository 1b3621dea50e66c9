"""Serving many adapters on one base: lorakit serve against what a user would otherwise run.

Model: the training benchmark's Llama (512 wide, 8 layers, SwiGLU 1408, vocab 32000, random weights), with 8
adapters (r=16 on all seven projections, random non-zero A and B). Workload: N requests sent at once
(N = 16, 32, 64), prompts of 64-256 tokens, 64 new tokens each (greedy, no eos), adapters drawn uniformly.

    lorakit mixed        lorakit serve, each request naming one of the 8 adapters (one continuous batch)
    lorakit base-only    lorakit serve, every request for the base: the ceiling for the mixed batch
    PEFT one-by-one      transformers generate on a PeftModel, one request at a time, set_adapter per request
    PEFT mixed batch     transformers generate on a PeftModel, all N at once, adapter_names per row
    transformers serve   `transformers serve --continuous-batching`, base only (it takes no per-request adapter)

Servers are measured through HTTP from this process (streamed completions: time to first token and
inter-token latency per request); PEFT runs in this process with a logits processor timing each step.
Rounds alternate the systems; medians are printed with the ratios, the memory of the lorakit server with 8
and with 100 adapters loaded, the hardware line and the load average.

    python benchmarks/serve_throughput.py [--concurrency 16,32,64] [--rounds 3] [--slow-rounds 1]
                                          [--dtype auto|bfloat16|float32] [--threads N] [--skip SYSTEM,...]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
)

import lorakit
from lorakit.device import bf16_native, cpu_threads, hardware_summary

VOCAB, NEW_TOKENS, ADAPTERS, RANK = 32000, 64, 8, 16
SYSTEMS = ("lorakit-mixed", "lorakit-base", "peft-mixed", "peft-one-by-one", "transformers-serve")
SLOW = ("peft-one-by-one", "transformers-serve")


# --- the model, its tokenizer and the adapters ------------------------------------------------------------


def build(root: Path, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    """The base model folder (weights in ``dtype``, a word-level tokenizer whose word i is token i) and the
    adapter folders; built once per --workdir."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    base = root / f"base-{str(dtype).split('.')[-1]}"
    adapters = [root / "adapters" / f"a{i}" for i in range(ADAPTERS)]
    if (base / "config.json").is_file() and all((a / "adapter_config.json").is_file() for a in adapters):
        return base, adapters
    cfg = LlamaConfig(hidden_size=512, num_hidden_layers=8, intermediate_size=1408, vocab_size=VOCAB,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = None  # no eos: every request generates its 64 tokens, in every system
    model.to(dtype).save_pretrained(base)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(base)
    for i, folder in enumerate(adapters):
        m = copy.deepcopy(model).float()
        lorakit.add_lora(m, lorakit.LoraConfig(r=RANK, alpha=2 * RANK, target_modules="all-linear"))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if ".adapters." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        lorakit.save_adapter(m, folder)
    return base, adapters


def workload(n: int, seed: int, mixed: bool) -> list[tuple[str | None, list[int]]]:
    """N (adapter name or None, prompt ids) pairs: 64-256 prompt tokens, adapters drawn uniformly."""
    rng = random.Random(seed)
    return [(f"a{rng.randrange(ADAPTERS)}" if mixed else None,
             [rng.randrange(1, VOCAB) for _ in range(rng.randint(64, 256))]) for _ in range(n)]


def summarize(tokens: int, wall: float, ttft: list[float], itl: list[float]) -> dict:
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))  # noqa: E731
    return {"tok_s": tokens / wall, "ttft_p50": q(ttft, 50), "ttft_p95": q(ttft, 95), "itl_p50": q(itl, 50),
            "itl_p95": q(itl, 95), "tokens": tokens, "wall": wall}


# --- servers, measured over HTTP ---------------------------------------------------------------------------


class Server:
    def __init__(self, argv: list[str], port: int, log: Path, env: dict | None = None):
        self.port, self.log = port, log
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                                     env={**os.environ, **(env or {})})
        self.url = f"http://127.0.0.1:{port}"

    def wait(self, path: str, timeout: float = 600) -> Server:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code < 500:
                    return self
            except httpx.HTTPError:
                time.sleep(0.5)
        raise SystemExit(f"server did not come up: {self.log.read_text()[-2000:]}")

    def rss_mib(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) of the server process in MiB."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return fields["VmRSS"], fields["VmHWM"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _one(client: httpx.AsyncClient, model: str, prompt: str, t0: float) -> tuple[int, float, list[float]]:
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True}
    stamps = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    return len(stamps), stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def run_http(url: str, jobs: list[tuple[str, list[int]]]) -> dict:
    """All jobs (model id, prompt ids) sent at once as streamed completions; tokens are counted per chunk
    (each chunk carries one token's text: words of the word-level tokenizer)."""

    async def go():
        limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
        async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(_one(client, m, " ".join(f"t{i}" for i in p), t0) for m, p in jobs))
            return results, time.perf_counter() - t0

    results, wall = asyncio.run(go())
    return summarize(sum(n for n, _, _ in results), wall, [t for _, t, _ in results],
                     [d for _, _, gaps in results for d in gaps])


# --- PEFT in this process ---------------------------------------------------------------------------------


class StepClock(LogitsProcessor):
    """Records when each generation step's logits are ready (one call per new token, for the whole batch)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def _generate(model, ids: list[list[int]], **kw) -> list[float]:
    width = max(len(p) for p in ids)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in ids])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    clock = StepClock()
    with torch.inference_mode():
        model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                       do_sample=False, eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([clock]),
                       **kw)
    return clock.stamps


def run_peft_mixed(peft, jobs) -> dict:
    t0 = time.perf_counter()
    stamps = _generate(peft, [p for _, p in jobs], adapter_names=[a or "__base__" for a, _ in jobs])
    wall = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return summarize(len(jobs) * len(stamps), wall, [stamps[0] - t0] * len(jobs), gaps * len(jobs))


def run_peft_one_by_one(peft, jobs) -> dict:
    t0 = time.perf_counter()
    ttft, itl, tokens = [], [], 0
    for adapter, prompt in jobs:  # in arrival order: a request's wait for the ones before it is its TTFT too
        peft.set_adapter(adapter)
        stamps = _generate(peft, [prompt])
        ttft.append(stamps[0] - t0)
        itl += [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        tokens += len(stamps)
    return summarize(tokens, time.perf_counter() - t0, ttft, itl)


# --- the run ------------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":
        # PEFT runs in this process, and torch is loaded before lorakit could set this: idle OpenMP threads
        # must sleep, not spin, or on a shared CPU this process measures its own spinning
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="16,32,64")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the lorakit and PEFT-mixed measurements")
    ap.add_argument("--slow-rounds", type=int, default=1, help="rounds of PEFT one-by-one and transformers serve")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                    help="auto: bf16 where this CPU multiplies bf16 natively, else fp32")
    ap.add_argument("--threads", type=int, default=cpu_threads())
    ap.add_argument("--skip", default="", help=f"comma list of systems to leave out: {', '.join(SYSTEMS)}")
    ap.add_argument("--workdir", default=None, help="where the model and adapters are built (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if bf16_native("cpu") else torch.float32)
    systems = [s for s in SYSTEMS if s not in args.skip.split(",")]
    concurrency = [int(n) for n in args.concurrency.split(",")]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="serve-bench-"))
    base, adapters = build(root, dtype)
    dname = str(dtype).split(".")[-1]
    print(f"# {hardware_summary()}")
    print(f"# dtype {dname}; load average before: {os.getloadavg()[0]:.2f}", flush=True)

    servers: dict[str, Server] = {}
    env = {"OMP_NUM_THREADS": str(args.threads)}
    if any(s.startswith("lorakit") for s in systems):
        port = free_port()
        argv = [sys.executable, "-m", "lorakit", "serve", "--model", str(base), "--served-model-name", "base",
                "--adapter-dir", str(root / "adapters"), "--max-batch", str(max(concurrency)), "--max-queue", "1024",
                "--max-adapters", "128", "--dtype", dname, "--threads", str(args.threads), "--port", str(port)]
        for a in adapters:
            argv += ["--adapter", f"{a.name}={a}"]
        servers["lorakit"] = Server(argv, port, root / "lorakit.log", env).wait("/health")
    if "transformers-serve" in systems:
        port = free_port()
        argv = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve", str(base),
                "--continuous-batching",
                "--device", "cpu", "--dtype", dname, "--host", "127.0.0.1", "--port", str(port)]
        servers["transformers"] = Server(argv, port, root / "transformers.log", env).wait("/v1/models")
    peft = None
    if any(s.startswith("peft") for s in systems):
        from peft import PeftModel

        peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=dtype), adapters[0],
                                         adapter_name=adapters[0].name)
        for a in adapters[1:]:
            peft.load_adapter(a, adapter_name=a.name)
        peft.eval()

    def measure(system: str, jobs) -> dict:
        if system == "lorakit-mixed" or system == "lorakit-base":
            return run_http(servers["lorakit"].url, [(a or "base", p) for a, p in jobs])
        if system == "transformers-serve":
            return run_http(servers["transformers"].url, [(str(base), p) for _, p in jobs])
        if system == "peft-mixed":
            return run_peft_mixed(peft, jobs)
        return run_peft_one_by_one(peft, jobs)

    for system in systems:  # warm-up at the smallest N: kernels for its shapes, caches, the lazy set-up
        measure(system, workload(min(concurrency), 999, system != "lorakit-base" and system != "transformers-serve"))

    results: dict[tuple[str, int], list[dict]] = {}
    for n in concurrency:
        for rnd in range(max(args.rounds, args.slow_rounds)):
            order = systems[rnd % len(systems):] + systems[:rnd % len(systems)]
            for system in order:
                if rnd >= (args.slow_rounds if system in SLOW else args.rounds):
                    continue
                mixed = system in ("lorakit-mixed", "peft-mixed", "peft-one-by-one")
                r = measure(system, workload(n, 1000 * n + rnd, mixed))
                results.setdefault((system, n), []).append(r)
                print(f"  N={n} round {rnd} {system}: {r['tok_s']:.0f} tok/s", file=sys.stderr, flush=True)

    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in results.items()}
    print("\n| system | N | output tok/s | TTFT p50 / p95 (s) | ITL p50 / p95 (ms) | rounds |")
    print("|---|---|---|---|---|---|")
    for n in concurrency:
        for system in systems:
            m = med.get((system, n))
            if m:
                print(f"| {system} | {n} | {m['tok_s']:.0f} | {m['ttft_p50']:.2f} / {m['ttft_p95']:.2f} | "
                      f"{1000 * m['itl_p50']:.0f} / {1000 * m['itl_p95']:.0f} | {len(results[(system, n)])} |")
    print()
    for n in concurrency:
        mixed = med.get(("lorakit-mixed", n), {}).get("tok_s")
        line = []
        for other, label in (("lorakit-base", "base-only"), ("peft-mixed", "PEFT mixed batch"),
                             ("peft-one-by-one", "PEFT one-by-one"), ("transformers-serve", "transformers serve")):
            theirs = med.get((other, n), {}).get("tok_s")
            if mixed and theirs:
                line.append(f"{mixed / theirs:.2f}x {label}")
        if line:
            print(f"N={n}: lorakit mixed = " + ", ".join(line))

    if "lorakit" in servers:
        s = servers["lorakit"]
        rss8, _ = s.rss_mib()
        for i in range(ADAPTERS, 100):
            httpx.post(s.url + "/v1/adapters", json={"name": f"x{i}", "path": f"a{i % ADAPTERS}"}, timeout=60)
        listed = len(httpx.get(s.url + "/v1/models").json()["data"]) - 1
        rss100, hwm = s.rss_mib()
        per = sum(p.numel() for p in load_file(adapters[0] / "adapter_model.safetensors").values())
        print(f"\nlorakit serve memory (VmRSS): {rss8:.0f} MiB with 8 adapters loaded, {rss100:.0f} MiB with "
              f"{listed} (peak {hwm:.0f} MiB); one adapter is {per:,} parameters = "
              f"{per * torch.tensor([], dtype=dtype).element_size() / 2**20:.1f} MiB in {dname}")
    print(f"# load average after: {os.getloadavg()[0]:.2f}")
    for s in servers.values():
        s.stop()


if __name__ == "__main__":
    main()
