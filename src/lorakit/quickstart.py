"""`lorakit quickstart`: the README's first command, offline, on the bundled example.

LoRA-fine-tune ``examples/base-model`` on the number-spelling task (``examples/configs/quickstart.yaml``),
then train every weight on the same data for the same steps (the baseline), then compare base, LoRA
and full fine-tune: exact match on held-out examples, perplexity on held-out stdlib text (forgetting),
trainable parameters, peak memory, training speed and time. The table is printed and written to
``OUTPUT/report.md`` and ``OUTPUT/report.json``.

The two trainings run at the same time, each a fresh ``python -m lorakit train`` process on half the cores,
so each one's peak RSS and CPU time are its own (``lorakit.usage``); the evaluation runs here once both have
finished.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from safetensors import safe_open

from lorakit.config import load_config
from lorakit.errors import LorakitError
from lorakit.fileio import write_atomic
from lorakit.usage import ChildUsage, measured_popen, read_usage

CONFIG = "examples/configs/quickstart.yaml"
TEST = "examples/data/task_test.jsonl"
RETAIN = "examples/data/retain.txt"
SHOW = 3  # example answers in the report
COLUMNS = {"exact_match": "exact match", "perplexity": "retain perplexity", "trainable_params": "trainable params",
           "peak_rss_mb": "peak RSS", "tokens_per_s": "train tokens/s", "train_wall_s": "train wall",
           "train_cpu_s": "train CPU"}


def run_children(commands: dict[str, list[str]]) -> dict[str, ChildUsage]:
    """Run ``python -m lorakit ARGS`` for every named command at once, each line of their output copied to
    our stderr as ``[name] line`` (stdout is the table's); returns each one's own usage (``lorakit.usage``).
    When one fails the others are stopped and a LorakitError names it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # Idle OpenMP threads sleep instead of spinning: on a busy CPU spinning threads starve each other
    # (20x slower forward passes measured on a shared 2-core machine). Read once when torch loads.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    scratch = Path(tempfile.mkdtemp(prefix="lorakit-usage-"))
    procs, copiers = {}, []
    for name, args in commands.items():
        procs[name] = measured_popen([sys.executable, "-m", "lorakit", *args], scratch / f"{name}.usage.json",
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1)
        copiers.append(threading.Thread(target=_copy_lines, args=(procs[name].stdout, f"[{name}] "), daemon=True))
        copiers[-1].start()
    usages: dict[str, ChildUsage] = {}
    try:
        while len(usages) < len(procs):
            for name, proc in procs.items():
                if name in usages or proc.poll() is None:
                    continue
                if proc.returncode != 0:
                    raise LorakitError(f"quickstart: `lorakit {' '.join(commands[name])}` failed (exit "
                                       f"{proc.returncode}); its error is above, after [{name}]")
                usages[name] = read_usage(scratch / f"{name}.usage.json")
            time.sleep(0.2)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        for thread in copiers:
            thread.join()
        shutil.rmtree(scratch, ignore_errors=True)
    return usages


def _copy_lines(stream: Any, prefix: str) -> None:
    for line in stream:
        if line.strip():  # a redrawn bar's carriage return reads as an empty line: not worth a tagged one
            sys.stderr.write(prefix + line)
            sys.stderr.flush()
    stream.close()


def tensor_count(path: Path) -> int:
    """Elements in a safetensors file, read from its header alone."""
    with safe_open(str(path), "pt") as f:
        total = 0
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total


def training_speed(output: Path) -> float:
    """Median training tokens/s (non-pad tokens) over the logged intervals of ``OUTPUT/metrics.jsonl``; the
    first interval (warm-up) is left out when there are others."""
    rates = [r["tokens_per_s"] for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
             if "tokens_per_s" in r]
    return statistics.median(rates[1:] or rates)


def quickstart(config: str = CONFIG, output: str = "runs/quickstart", model: str | None = None,
               max_steps: int | None = None, limit: int = 200, test: str = TEST, retain: str = RETAIN,
               full_lr: float | None = None) -> dict[str, Any]:
    """Train LoRA and full fine-tunes from ``config`` into ``OUTPUT/lora`` and ``OUTPUT/full`` (replacing
    earlier ones), evaluate them and the base on the first ``limit`` examples of ``test`` and on ``retain``,
    print the table and write ``OUTPUT/report.{md,json}``; returns the report. ``full_lr``: the full
    fine-tune's learning rate (default: the config's)."""
    started, load_before = time.perf_counter(), os.getloadavg()
    flags = {"model": model, "max_steps": max_steps}
    cfg = load_config(config, flags)  # checks the config before anything runs
    base = Path(cfg.model.name_or_path)
    for what, path, hint in (("base model", base, "build it with python examples/build_base_model.py"),
                             ("test data", Path(test), "write it with python examples/make_task_data.py"),
                             ("retain text", Path(retain), "build it with python examples/build_base_model.py")):
        if not path.exists():
            raise LorakitError(f"quickstart: {what} {path}: not found; run from the repository root "
                               f"(scripts/quickstart.sh does) or {hint}")
    if limit < 1:
        raise LorakitError(f"--limit must be at least 1, got {limit}")
    out = Path(output)
    overrides = [arg for k, v in flags.items() if v is not None for arg in (f"--{k.replace('_', '-')}", str(v))]

    # Both runs at once, each on half the cores: a model this small gains little from a second thread
    # per process (measured: none on 2 cores), while two processes use both cores fully.
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    folders = {method: out / method for method in ("lora", "full")}
    print(f"quickstart: training LoRA -> {folders['lora']} and full -> {folders['full']} at once, "
          f"{threads} thread(s) each", file=sys.stderr, flush=True)
    usages = run_children({method: ["train", config, "--output", str(folder), "--overwrite", "--method", method,
                                    "--threads", threads, *overrides,
                                    *(["--lr", str(full_lr)] if full_lr and method == "full" else [])]
                           for method, folder in folders.items()})
    runs = {method: (folders[method], usages[method]) for method in folders}

    print(f"quickstart: evaluating on {limit} examples of {test} and on {retain}", file=sys.stderr, flush=True)
    results = evaluate_runs(runs["lora"][0], runs["full"][0], test, retain, limit)

    total = tensor_count(base / "model.safetensors")
    rows = [{"model": "base", **_metrics(results["base"]), "total_params": total}]
    for method, name in (("lora", "adapter"), ("full", "full")):
        folder, usage = runs[method]
        trainable = tensor_count(folder / ("adapter_model.safetensors" if method == "lora" else "model.safetensors"))
        rows.append({"model": method, **_metrics(results[name]), "trainable_params": trainable,
                     "total_params": total + trainable if method == "lora" else trainable,
                     "peak_rss_mb": round(usage.peak_rss_mb, 1), "tokens_per_s": round(training_speed(folder), 1),
                     "train_wall_s": round(usage.wall_s, 1), "train_cpu_s": round(usage.cpu_s, 1)})
    children = os.times()
    report = {
        "config": config, "model": str(base), "steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum, "threads_per_run": int(threads),
        "seq_len": cfg.data.seq_len, "lr": cfg.train.lr, "full_lr": full_lr or cfg.train.lr, "r": cfg.lora.r,
        "alpha": cfg.lora.alpha, "target_modules": cfg.lora.target_modules, "test": test, "test_examples": limit,
        "retain": retain, "rows": rows,
        "examples": [{"prompt": ex["prompt"], "reference": ex["reference"],
                      **{label: results[name]["examples"][i]["output"]
                         for label, name in (("base", "base"), ("lora", "adapter"), ("full", "full"))}}
                     for i, ex in enumerate(results["base"].get("examples", []))],
        "machine": {"cpus": len(os.sched_getaffinity(0)), "load_before": [round(x, 2) for x in load_before],
                    "load_after": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(),
                    "python": platform.python_version()},
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_s": round(sum(children[:4]), 1),  # this process and every child it waited for
    }
    write_report(out, report, render(report))
    print(f"report: {out / 'report.md'}, {out / 'report.json'}", file=sys.stderr)
    return report


def write_report(out: Path, report: dict[str, Any], markdown: str) -> None:
    """``OUTPUT/report.json`` and ``OUTPUT/report.md`` (each whole or absent), and the Markdown on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    write_atomic(out / "report.md", lambda p: p.write_text(markdown))
    print(markdown, end="")


def evaluate_runs(lora: Path, full: Path, test: str, retain: str, limit: int) -> dict[str, dict[str, Any]]:
    """``{"base", "adapter", "full"}`` -> metrics and example answers (``Report.to_dict``), in this process: the
    base is the LoRA run's model with its adapter disabled, so both load once."""
    from lorakit.evaluate import compare_with_base, evaluate_model, load_eval_records
    from lorakit.generate import load_for_generation

    records, fmt = load_eval_records(test, limit=limit)
    text = Path(retain).read_text(encoding="utf-8")
    model, tokenizer = load_for_generation(None, str(lora))
    seq_len = model.config.max_position_embeddings
    results = {name: r.to_dict(SHOW) for name, r in
               compare_with_base(model, tokenizer, records, text, seq_len, fmt=fmt).items()}
    del model
    model, tokenizer = load_for_generation(str(full))
    results["full"] = evaluate_model(model, tokenizer, records, text, seq_len, fmt=fmt).to_dict(SHOW)
    return results


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    return {"exact_match": result["exact_match"], "perplexity": round(result["perplexity"], 3)}


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: the comparison table, example answers, and how it was measured."""
    names = {"base": "base model", "lora": f"LoRA r={report['r']}", "full": "full fine-tune"}
    header = dict(COLUMNS, exact_match=f"exact match ({report['test_examples']} test)")
    lines = ["| model | " + " | ".join(header.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in report["rows"]:
        cells = [names[row["model"]]] + [cell(k, row.get(k), row) for k in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    m = report["machine"]
    per_step = report["batch_size"] * report["grad_accum"]
    micro = f" ({report['grad_accum']} micro-batches of {report['batch_size']})" if report["grad_accum"] > 1 else ""
    lines += ["", f"{report['steps']} steps of {per_step} examples{micro}, seq_len {report['seq_len']}, "
              f"LoRA lr {report['lr']:g}, full fine-tune lr {report['full_lr']:g}; both trainings at once, "
              f"{report['threads_per_run']} thread(s) each. Exact match: the greedy answer equals the reference. "
              f"Retain perplexity: on {report['retain']} (held-out stdlib source; lower is better, a rise is "
              "forgetting). Peak RSS, CPU time and tokens/s (non-pad tokens, median over logged intervals) "
              "of each training process.",
              f"Quickstart total: {report['wall_s']:.0f} s wall, {report['cpu_s']:.0f} s CPU on {m['cpus']} CPUs "
              f"(load average {m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after; {m['platform']}).",
              ""]
    for ex in report["examples"]:
        question = ex["prompt"].strip().splitlines()
        asked = " / ".join(q for q in question if q and not q.startswith("###"))
        lines.append(f"- `{asked}` -> reference `{ex['reference']}`; base {quote(ex['base'])}; "
                     f"LoRA {quote(ex['lora'])}; full {quote(ex['full'])}")
    return "\n".join(lines) + "\n"


def quote(answer: str, width: int = 60) -> str:
    """An answer as one line of Markdown code (newlines escaped), shortened past ``width`` characters."""
    text = json.dumps(answer.strip(), ensure_ascii=False)[1:-1]
    return f"`{text[:width]}{'…' if len(text) > width else ''}`"


def cell(key: str, value: Any, row: dict[str, Any], percent: tuple[str, ...] = ("exact_match",)) -> str:
    """One table cell of a quickstart report: ``percent`` keys as percentages, the rest by their kind."""
    if value is None:
        return "—"
    if key in percent:
        return f"{value:.1%}"
    if key == "perplexity":
        return f"{value:.2f}"
    if key == "trainable_params":
        return f"{value:,} ({value / row['total_params']:.1%})"
    if key == "peak_rss_mb":
        return f"{value:,.0f} MB"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    return f"{value:.0f} s"
