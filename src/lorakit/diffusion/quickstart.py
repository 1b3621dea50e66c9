"""`lorakit quickstart --images`: teach the bundled text-to-image pipeline a style it never saw, offline,
and show how strongly it applies at each LoRA scale.

``examples/image-model`` was pretrained on plain coloured shapes (``examples/build_image_model.py``);
``examples/data/style`` holds the same kind of scenes drawn in the "zwx" palette, with captions that start
with the trigger word "zwx, ", plus as many ordinary scenes with plain captions (prior preservation). One
``lorakit train`` run (``examples/configs/image_quickstart.yaml``) learns the style; then the held-out
prompts of ``style.json`` are generated with and without the trigger word at scales 0, 0.25, 0.5 and 1.

The style score of an image (fixed, ``palette_score``): the share of its pixels within ``radius`` (RGB
distance, channels in [0, 1]) of one of the palette's colours. It is the mean over the held-out prompts ×
seeds. With the trigger word it should rise with the scale; without it, it should stay at the base's level.
Printed as a table, plotted (``style_score.png``), with the scale grid (``grid.png``) and ``report.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.config import load_config
from lorakit.errors import LorakitError
from lorakit.fileio import write_atomic

CONFIG = "examples/configs/image_quickstart.yaml"
STYLE = "examples/data/style/style.json"
SCALES = (0.0, 0.25, 0.5, 1.0)
SEEDS = (0, 1)
GRID_ROWS = 4  # held-out prompts shown in the grid, each with and without the trigger word
STEPS, GUIDANCE = 20, 4.0  # sampling, as the pipeline's model card measures it


def palette_score(image: Any, palette: list[tuple[int, int, int]], radius: float) -> float:
    """Share of the image's pixels within ``radius`` (Euclidean RGB distance, channels in [0, 1]) of a colour
    of ``palette`` (RGB 0-255)."""
    x = np.asarray(image, dtype=np.float32).reshape(-1, 3) / 255.0  # (P, 3)
    p = np.asarray(palette, dtype=np.float32) / 255.0  # (K, 3)
    d = np.linalg.norm(x[:, None, :] - p[None, :, :], axis=-1).min(1)  # (P,) distance to the nearest colour
    return float((d <= radius).mean())


def quickstart_images(config: str = CONFIG, output: str = "runs/quickstart-images", model: str | None = None,
                      max_steps: int | None = None, style: str = STYLE, threads: int | None = None) -> dict[str, Any]:
    """Train, generate, score; print the table and write ``OUTPUT/report.{json,md}``, ``grid.png`` and
    ``style_score.png``. Returns the report."""
    from lorakit.quickstart import run_children, tensor_count, write_report

    started, load_before = time.perf_counter(), os.getloadavg()
    flags = {"model": model, "max_steps": max_steps}
    cfg = load_config(config, flags)
    for what, path, hint in (("pipeline", Path(cfg.model.name_or_path), "python examples/build_image_model.py"),
                             ("style data", Path(style), "python examples/make_style_data.py"),
                             ("training data", Path(cfg.data.train), "python examples/make_style_data.py")):
        if not path.exists():
            raise LorakitError(f"quickstart --images: {what} {path}: not found; run from the repository root "
                               f"or build it with {hint}")
    spec = json.loads(Path(style).read_text())
    palette, radius, trigger = [tuple(c) for c in spec["palette"].values()], float(spec["radius"]), spec["trigger_word"]
    prompts = list(spec["prompts"])
    out = Path(output)
    run = out / "lora"
    threads = threads or len(os.sched_getaffinity(0))
    overrides = [arg for k, v in flags.items() if v is not None for arg in (f"--{k.replace('_', '-')}", str(v))]
    print(f"quickstart --images: training LoRA -> {run} ({threads} thread(s))", file=sys.stderr, flush=True)
    usage = run_children({"lora": ["train", config, "--output", str(run), "--overwrite", "--threads", str(threads),
                                   *overrides]})["lora"]
    print(f"quickstart --images: generating {len(prompts)} prompts × {len(SEEDS)} seeds × {len(SCALES)} scales, "
          "with and without the trigger word", file=sys.stderr, flush=True)
    gen_started = time.perf_counter()
    images, scores = generate_all(cfg.model.name_or_path, run, prompts, trigger, palette, radius)
    gen_s = time.perf_counter() - gen_started

    trainable = tensor_count(run / "pytorch_lora_weights.safetensors")
    total = sum(tensor_count(f) for f in Path(cfg.model.name_or_path).glob("*/*.safetensors"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    report = {
        "config": config, "model": cfg.model.name_or_path, "data": cfg.data.train, "style": style,
        "trigger_word": trigger, "steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
        "r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": target_names(run),
        "scales": list(SCALES), "seeds": list(SEEDS), "prompts": len(prompts), "sample_steps": STEPS,
        "guidance": GUIDANCE, "palette": spec["palette"], "radius": radius,
        "score_with_trigger": scores["trigger"], "score_without_trigger": scores["plain"],
        "trainable_params": trainable, "total_params": total + trainable,
        "train_peak_rss_mb": round(usage.peak_rss_mb, 1), "train_wall_s": round(usage.wall_s, 1),
        "train_cpu_s": round(usage.cpu_s, 1), "train_images_per_s": round(float(np.median(rates[1:] or rates)), 2),
        "final_loss": metrics[-1].get("loss") if metrics else None, "generate_s": round(gen_s, 1),
        "threads": threads, "machine": {"cpus": len(os.sched_getaffinity(0)),
                                        "load_before": [round(x, 2) for x in load_before],
                                        "load_after": [round(x, 2) for x in os.getloadavg()],
                                        "platform": platform.platform(), "python": platform.python_version()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_grid(images, prompts, trigger, out / "grid.png")
    plot_scores(report, out / "style_score.png")
    write_report(out, report, render(report))
    print(f"report: {out / 'report.md'}; grid: {out / 'grid.png'}; plot: {out / 'style_score.png'}", file=sys.stderr)
    return report


def target_names(run: Path) -> list[str]:
    """The layer names the adapter covers ("to_q", "to_out.0"), from the module paths its PEFT config lists."""
    paths = json.loads((run / "adapter_config.json").read_text())["target_modules"]
    return sorted({".".join(p.split(".")[-2:]) if p.split(".")[-1].isdigit() else p.split(".")[-1] for p in paths})


def generate_all(pipeline: str, adapter: Path, prompts: list[str], trigger: str, palette, radius: float):
    """Every prompt with and without the trigger word, at every scale and seed: the images (for the grid)
    and the mean style score per scale."""
    import torch

    from lorakit.diffusion.generate import generate, load_adapters, set_scale
    from lorakit.diffusion.pipeline import load_pipeline

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    pipe = load_pipeline(pipeline, torch.float32)
    names = load_adapters(pipe, [str(adapter)])
    images: dict[tuple[str, float, int], list] = {}
    scores: dict[str, list[float]] = {"trigger": [], "plain": []}
    for scale in SCALES:
        set_scale(pipe, names, [1.0], scale)
        for kind, batch in (("trigger", [f"{trigger}, {p}" for p in prompts]), ("plain", prompts)):
            values = []
            for seed in SEEDS:
                images[(kind, scale, seed)] = generate(pipe, batch, seed, STEPS, GUIDANCE)
                values += [palette_score(im, palette, radius) for im in images[(kind, scale, seed)]]
            scores[kind].append(round(float(np.mean(values)), 4))
    return images, scores


def write_grid(images: dict, prompts: list[str], trigger: str, path: Path) -> None:
    """Rows: the first GRID_ROWS prompts with the trigger word, then the same without; columns: scales."""
    from lorakit.diffusion.generate import label_grid

    rows, labels = [], []
    for kind in ("trigger", "plain"):
        for i in range(GRID_ROWS):
            rows.append([images[(kind, s, SEEDS[0])][i] for s in SCALES])
            short = prompts[i].removeprefix("a ").replace(" background", "")
            labels.append((f"{trigger}, " if kind == "trigger" else "") + short)
    grid = label_grid(rows, [f"scale {s:g}" for s in SCALES], labels,
                      f"LoRA scale grid: with the trigger word \"{trigger}\" (top), without (bottom); seed {SEEDS[0]}",
                      zoom=2)
    write_atomic(path, lambda p: grid.save(p, format="PNG"))


def plot_scores(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    ax.plot(report["scales"], report["score_with_trigger"], "o-", label=f"prompts with \"{report['trigger_word']}\"")
    ax.plot(report["scales"], report["score_without_trigger"], "s--", label="the same prompts without it")
    ax.set_xlabel("LoRA scale")
    ax.set_ylabel("style score (palette pixel share)")
    ax.set_ylim(0, 1)
    ax.set_xticks(report["scales"])
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Style score by LoRA scale", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def render(report: dict[str, Any]) -> str:
    lines = [f"| LoRA scale | {' | '.join(f'{s:g}' for s in report['scales'])} |",
             "|---" * (len(report["scales"]) + 1) + "|",
             f"| style score, prompts with \"{report['trigger_word']}\" | "
             + " | ".join(f"{v:.3f}" for v in report["score_with_trigger"]) + " |",
             "| style score, the same prompts without it | "
             + " | ".join(f"{v:.3f}" for v in report["score_without_trigger"]) + " |"]
    m = report["machine"]
    t = report["trainable_params"]
    lines += ["", f"Style score: share of pixels within {report['radius']} (RGB distance, channels in [0, 1]) of the "
              f"palette {', '.join(report['palette'])}; mean over {report['prompts']} held-out prompts × "
              f"{len(report['seeds'])} seeds, {report['sample_steps']} steps, guidance {report['guidance']:g}.",
              f"LoRA r={report['r']} alpha={report['alpha']:g} on {', '.join(report['target_modules'])}: {t:,} trainable of "
              f"{report['total_params']:,} parameters ({t / report['total_params']:.2%}); {report['steps']} steps × "
              f"{report['batch_size']} images, lr {report['lr']:g}; final loss {report['final_loss']:.4f}.",
              f"Training: {report['train_wall_s']:.0f} s wall, {report['train_cpu_s']:.0f} s CPU, "
              f"{report['train_images_per_s']:.1f} images/s, peak RSS {report['train_peak_rss_mb']:.0f} MB "
              f"({report['threads']} thread(s)). Generation and scoring: {report['generate_s']:.0f} s.",
              f"Quickstart total: {report['wall_s']:.0f} s on {m['cpus']} CPUs (load average "
              f"{m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after; {m['platform']}).", ""]
    return "\n".join(lines)
