"""The quickstart adapter on a small device: PyTorch vs llama.cpp (GGUF f16, q8_0) vs ONNX Runtime GenAI (fp32, int4).

The bundled base (examples/base-model) with the quickstart adapter, exported by `lorakit export` (each export
prints its parity check), then each runtime in a fresh process with 1 thread answers the quickstart test set
(examples/data/task_test.jsonl) greedily:
  - files: what a device stores (base + adapter files, or the ONNX model folder + .onnx_adapter);
  - startup: seconds from the process's start to a model ready to generate (imports and loading);
  - TTFT: prompt processing + the first token, per prompt (median), tokens/s: the tokens after the first
    over the time they took (all prompts together);
  - peak RSS: the whole process (lorakit.usage), runtime and imports included — PyTorch's process imports
    torch, the others only their runtime (an edge app would not ship torch);
  - exact match: the answers against the references, the quality cost of each export.
The adapter is applied at run time in every runtime (GGUF: --lora; ONNX: the adapter inputs; PyTorch: lorakit's
LoRA layers), as a device switching adapters would run it. All runtimes get the same prompt token ids (the
Hugging Face tokenizer's, bos included; og.Tokenizer adds no bos), so tokenization is not timed. Processes run
alternately (pytorch, gguf-f16, ..., pytorch, ...) for --rounds rounds; medians.

    lorakit train examples/configs/quickstart.yaml --output runs/qs-lora      # once, ~2 min on 2 cores
    python benchmarks/edge.py [--adapter runs/qs-lora] [--rounds 3] [--limit 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()  # a child's startup clock: before its runtime's imports
ROOT = Path(__file__).resolve().parent.parent
TEST = ROOT / "examples" / "data" / "task_test.jsonl"
CONFIGS = ("pytorch", "gguf-f16", "gguf-q8_0", "onnx-fp32", "onnx-int4")


# --- the child: one runtime, one process -----------------------------------------------------------------


def child(a: argparse.Namespace) -> None:
    work = json.loads(Path(a.work).read_text())
    prefill, step, close = _runtime(a.child, work, a.threads)
    load_s = time.perf_counter() - a.started
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(work["tokenizer"])
    eos = set(work["eos"])
    ttft, decode_s, decode_tokens, correct = [], 0.0, 0, 0
    for item in work["prompts"]:
        t = time.perf_counter()
        token = prefill(item["ids"])
        ttft.append(time.perf_counter() - t)
        out = [token]
        t = time.perf_counter()
        while token not in eos and len(out) < work["max_new"]:
            token = step(token)
            out.append(token)
        decode_s += time.perf_counter() - t
        decode_tokens += len(out) - 1
        correct += tok.decode(out, skip_special_tokens=True).strip() == item["reference"].strip()
    close()
    Path(a.report).write_text(json.dumps({"load_s": load_s, "ttft_ms": 1000 * statistics.median(ttft),
                                          "tokens_per_s": decode_tokens / decode_s if decode_s else 0.0,
                                          "exact": correct / len(work["prompts"])}))


def _runtime(name: str, work: dict, threads: int):
    """(prefill(ids) -> first token, step(token) -> next token, close) for one runtime."""
    import numpy as np

    if name == "pytorch":
        import torch

        from lorakit.generate import load_for_generation

        torch.set_num_threads(threads)
        model, _ = load_for_generation(None, work["adapter"])
        state = {}

        @torch.no_grad()
        def prefill(ids):
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            state["past"] = out.past_key_values
            return int(out.logits[0, -1].argmax())

        @torch.no_grad()
        def step(token):
            out = model(input_ids=torch.tensor([[token]]), past_key_values=state["past"], use_cache=True)
            state["past"] = out.past_key_values
            return int(out.logits[0, -1].argmax())

        return prefill, step, lambda: None
    if name.startswith("gguf"):
        import ctypes

        from llama_cpp import Llama
        from llama_cpp import llama_cpp as C

        files = work[name]
        llm = Llama(model_path=files["base"], n_ctx=256, n_batch=256, n_threads=threads, n_threads_batch=threads,
                    verbose=False)
        lora = C.llama_adapter_lora_init(llm._model.model, files["lora"].encode())
        C.llama_set_adapters_lora(llm._ctx.ctx, (C.llama_adapter_lora_p_ctypes * 1)(lora), 1, (ctypes.c_float * 1)(1.0))

        n_vocab = llm.n_vocab()

        def last() -> int:  # the last position's logits, read in place (no logits_all copy)
            return int(np.argmax(np.ctypeslib.as_array(C.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))))

        def prefill(ids):
            llm.reset()
            llm.eval(ids)
            return last()

        def step(token):
            llm.eval([token])
            return last()

        return prefill, step, llm.close
    import onnxruntime_genai as og

    files = work[name]
    config = og.Config(files["model"])
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    adapters = og.Adapters(model)
    adapters.load(files["adapter"], "qs")
    state = {}

    def prefill(ids):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + work["max_new"], do_sample=False)
        gen = og.Generator(model, params)
        gen.set_active_adapter(adapters, "qs")
        gen.append_tokens(ids)
        gen.generate_next_token()
        state["gen"] = gen
        return int(gen.get_next_tokens()[0])

    def step(token):
        gen = state["gen"]
        gen.generate_next_token()
        return int(gen.get_next_tokens()[0])

    return prefill, step, lambda: None


# --- the parent: export, prepare, run the children alternately ----------------------------------------


def export_all(adapter: Path, out: Path) -> dict:
    """Each export once (re-used when present): {config: files}."""
    from lorakit.export import ExportJob, adapter_sources, export

    jobs = {"gguf-f16": ("gguf", "f16", None), "gguf-q8_0": ("gguf", "f16", "q8_0"),
            "onnx-fp32": ("onnx", "f32", None), "onnx-int4": ("onnx", "f32", "int4")}
    files = {}
    name = adapter_sources([str(adapter)])[0].name
    for config, (fmt, dtype, quant) in jobs.items():
        folder = out / config
        if not folder.is_dir():
            print(f"== lorakit export --format {fmt} --dtype {dtype}" + (f" --quantize {quant}" if quant else ""))
            export(ExportJob(adapter_sources([str(adapter)]), None, fmt, folder, dtype, quant))
        if fmt == "gguf":
            base = next(p for p in folder.glob("*.gguf") if not p.name.endswith(".lora.gguf"))
            files[config] = {"base": str(base), "lora": str(folder / f"{name}.lora.gguf")}
        else:
            files[config] = {"model": str(folder / "model"), "adapter": str(folder / f"{name}.onnx_adapter")}
    return files


def size_of(paths: list[str]) -> int:
    total = 0
    for p in map(Path, paths):
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return total


def prepare(a: argparse.Namespace, files: dict) -> dict:
    from lorakit.data.tokenize import valid_records
    from lorakit.evaluate import prompts_and_references
    from lorakit.generate import encode_prompt
    from lorakit.model import load_tokenizer, model_config_for, resolve_model_path

    base = resolve_model_path(model_config_for(None, str(a.adapter)).name_or_path)
    tok = load_tokenizer(base)
    records, fmt = valid_records(TEST, "auto", a.limit)
    pairs = prompts_and_references(records, fmt, tok)
    longest = max(len(tok(r, add_special_tokens=False)["input_ids"]) for _, r in pairs)
    gen = json.loads((Path(base) / "generation_config.json").read_text())
    eos = gen.get("eos_token_id", tok.eos_token_id)
    sizes = {"pytorch": size_of([str(Path(base) / "model.safetensors"), str(a.adapter / "adapter_model.safetensors")])}
    for config, f in files.items():
        sizes[config] = size_of(list(f.values()))
    return {"adapter": str(a.adapter), "tokenizer": str(Path(base) / "tokenizer.json"),
            "eos": eos if isinstance(eos, list) else [eos], "max_new": longest + 4, "sizes": sizes,
            "prompts": [{"ids": encode_prompt(tok, p), "reference": r} for p, r in pairs], **files}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", type=Path, default=ROOT / "runs" / "qs-lora")
    p.add_argument("--work", default=str(ROOT / "runs" / "edge"), help="folder for the exports (re-used)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", help="comma list of " + ",".join(CONFIGS))
    p.add_argument("--child")
    p.add_argument("--report")
    a = p.parse_args()
    a.started = STARTED
    if a.child:
        return child(a)

    from lorakit.device import hardware_summary
    from lorakit.usage import measured_popen, read_usage

    if not (a.adapter / "adapter_config.json").is_file():
        sys.exit(f"{a.adapter}: no adapter; train it first: lorakit train examples/configs/quickstart.yaml "
                 f"--output {a.adapter}")
    work_dir = Path(a.work)
    work = prepare(a, export_all(a.adapter.resolve(), work_dir))
    work_file = work_dir / "work.json"
    work_file.write_text(json.dumps(work))
    configs = a.only.split(",") if a.only else list(CONFIGS)
    results: dict[str, list[dict]] = {c: [] for c in configs}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for c in configs:
                report, usage = Path(tmp) / f"{c}.json", Path(tmp) / f"{c}.usage"
                cmd = [sys.executable, __file__, "--child", c, "--work", str(work_file), "--report", str(report),
                       "--threads", str(a.threads)]
                proc = measured_popen(cmd, usage, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
                if proc.wait() != 0:
                    sys.exit(f"{c}: the child process failed")
                row = json.loads(report.read_text())
                row["peak_rss_mb"] = read_usage(usage).peak_rss_mb
                results[c].append(row)
                print(f"round {r + 1} {c}: {row}", flush=True)
    load_after = os.getloadavg()

    def med(c: str, k: str) -> float:
        return statistics.median(x[k] for x in results[c])

    print()
    print(hardware_summary())
    print(f"threads {a.threads}; {len(work['prompts'])} test prompts, up to {work['max_new']} new tokens; "
          f"{a.rounds} rounds, medians; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print("| runtime | files | startup | TTFT | tokens/s | peak RSS | exact match |")
    print("|---|---|---|---|---|---|---|")
    ref = "pytorch" if "pytorch" in configs else configs[0]
    for c in configs:
        speed = med(c, "tokens_per_s")
        ratio = f" ({speed / med(ref, 'tokens_per_s'):.2f}x)" if c != ref else ""
        print(f"| {c} | {work['sizes'][c] / 2**20:.1f} MiB | {med(c, 'load_s'):.2f} s | {med(c, 'ttft_ms'):.2f} ms | "
              f"{speed:.0f}{ratio} | {med(c, 'peak_rss_mb'):.0f} MiB | {100 * med(c, 'exact'):.1f}% |")


if __name__ == "__main__":
    main()
