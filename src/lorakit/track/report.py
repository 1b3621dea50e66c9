"""``lorakit eval --report OUT``: the base and each adapter side by side, as files a person opens.

``OUT/report.json`` (every number), ``OUT/report.md`` (a table, the PNGs beside it), ``OUT/report.html`` (one
self-contained file: inline CSS, the PNGs embedded as base64 ``data:`` URIs, nothing fetched, so it opens
offline and can be mailed alone), and the PNGs: ``metrics.png`` (one bar chart per metric, base vs each
adapter) and ``loss_curves.png`` (training and validation loss by step, from each adapter's run folder's
``metrics.jsonl``, when there is one).

Plots are drawn on matplotlib ``Figure`` objects with the Agg canvas (no pyplot state, no display).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from lorakit.fileio import write_atomic

# metric key -> (label, higher is better); the order of the table's columns and the bar charts
METRICS = {
    "exact_match": ("exact match", True),
    "f1": ("token F1", True),
    "data_loss": ("loss on --data", False),
    "data_perplexity": ("perplexity on --data", False),
    "perplexity": ("perplexity on --retain (forgetting)", False),
}


def run_curves(folder: Path) -> dict[str, list[tuple[int, float]]] | None:
    """``{"loss": [(step, loss)], "eval_loss": [...]}`` from ``folder/metrics.jsonl`` (a lorakit train run or
    checkpoint), or None without one. Event records and unreadable lines are skipped: the curve is a picture."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    curves: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": []}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key, points in curves.items():
            value = record.get(key) if isinstance(record, dict) else None
            if isinstance(value, (int, float)) and math.isfinite(value) and isinstance(record.get("step"), int):
                points.append((record["step"], float(value)))
    return curves if any(curves.values()) else None


def write_report(out: Path, models: list[dict[str, Any]], meta: dict[str, Any]) -> list[Path]:
    """Write the report files into ``out`` (created); returns their paths. ``models``: one dict per model,
    ``{"name", "adapter": folder or None, <METRICS keys measured>}``, the base first; ``meta``: what was
    measured (data, retain, examples, seq_len), copied into report.json."""
    out.mkdir(parents=True, exist_ok=True)
    measured = [k for k in METRICS if any(k in m for m in models)]
    curves = {m["name"]: c for m in models if m.get("adapter") and (c := run_curves(Path(m["adapter"])))}
    images: dict[str, Path] = {}
    if measured:
        images["metrics"] = out / "metrics.png"
        _save(_metric_bars(models, measured), images["metrics"])
    if curves:
        images["loss curves"] = out / "loss_curves.png"
        colors = {m["name"]: f"C{i}" for i, m in enumerate(models)}  # as in the bar charts
        _save(_loss_curves(curves, colors), images["loss curves"])
    report = {**meta, "models": models, "images": [p.name for p in images.values()]}
    files = [out / "report.json", out / "report.md", out / "report.html"]
    write_atomic(files[0], lambda p: p.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8"))
    write_atomic(files[1], lambda p: p.write_text(_markdown(models, measured, meta, images), encoding="utf-8"))
    write_atomic(files[2], lambda p: p.write_text(_html(models, measured, meta, images), encoding="utf-8"))
    return files + list(images.values())


# --- tables ---------------------------------------------------------------------------------------


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1%}" if key in ("exact_match", "f1") else f"{value:.4g}"


def _change(key: str, value: float | None, base: float | None) -> str:
    """`` (+12.0%)``: the relative change from the base, for adapters."""
    if value is None or base is None or base == 0:
        return ""
    return f" ({(value - base) / abs(base):+.1%})"


def _rows(models: list[dict[str, Any]], measured: list[str]) -> list[list[str]]:
    base = models[0]
    return [[m["name"]] + [_cell(k, m.get(k)) + (_change(k, m.get(k), base.get(k)) if i else "") for k in measured]
            for i, m in enumerate(models)]


def _what(meta: dict[str, Any]) -> list[str]:
    lines = []
    if meta.get("data"):
        lines.append(f"exact match, token F1 (SQuAD's) and loss over {meta['examples']} examples of {meta['data']}")
    if meta.get("retain"):
        lines.append(f"perplexity of {meta['retain']} in windows of {meta['seq_len']} tokens: higher than the "
                     "base's is forgetting")
    return lines


def _markdown(models: list[dict[str, Any]], measured: list[str], meta: dict[str, Any], images: dict[str, Path]) -> str:
    head = ["model"] + [METRICS[k][0] for k in measured]
    lines = ["# lorakit eval report", ""] + [f"- {w}" for w in _what(meta)] + [""]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(models, measured)]
    adapters = [f"{m['name']} = `{m['adapter']}`" for m in models if m.get("adapter")]
    lines += ["", "Adapters: " + ", ".join(adapters), ""] if adapters else [""]
    lines += [f"![{title}]({path.name})\n" for title, path in images.items()]
    return "\n".join(lines)


_STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
          "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}"
          "td:first-child,th:first-child{text-align:left}img{max-width:100%}")


def _html(models: list[dict[str, Any]], measured: list[str], meta: dict[str, Any], images: dict[str, Path]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in ["model"] + [METRICS[k][0] for k in measured])
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in _rows(models, measured))
    adapters = "".join(f"<li>{e(m['name'])}: <code>{e(str(m['adapter']))}</code></li>" for m in models if m.get("adapter"))
    figures = "".join(f'<h2>{e(title)}</h2><img alt="{e(title)}" src="data:image/png;base64,'
                      f'{base64.b64encode(path.read_bytes()).decode()}">' for title, path in images.items())
    what = "".join(f"<li>{e(w)}</li>" for w in _what(meta))
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>lorakit eval report</title>'
            f"<style>{_STYLE}</style></head><body><h1>lorakit eval report</h1><ul>{what}</ul>"
            f"<table><tr>{head}</tr>{rows}</table>{f'<p>Adapters:</p><ul>{adapters}</ul>' if adapters else ''}"
            f"{figures}</body></html>\n")


# --- plots ----------------------------------------------------------------------------------------


def _metric_bars(models: list[dict[str, Any]], measured: list[str]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(measured), 3.4), layout="constrained")
    names = [m["name"] for m in models]
    colors = [f"C{i}" for i in range(len(models))]
    for ax, key in zip(fig.subplots(1, len(measured), squeeze=False)[0], measured, strict=True):
        label, higher = METRICS[key]
        values = [m.get(key) if m.get(key) is not None else 0.0 for m in models]
        ax.bar(range(len(models)), values, color=colors)
        ax.set_xticks(range(len(models)), names, rotation=30, ha="right")
        ax.set_title(f"{label}\n({'higher' if higher else 'lower'} is better)", fontsize=9)
        if key in ("exact_match", "f1"):
            ax.set_ylim(0, 1)
    return fig


def _loss_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], colors: dict[str, str]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for name, c in curves.items():
        if c["loss"]:
            ax.plot(*zip(*c["loss"], strict=True), color=colors[name], label=f"{name}: training loss")
        if c["eval_loss"]:
            ax.plot(*zip(*c["eval_loss"], strict=True), color=colors[name], linestyle="--", marker="o",
                    label=f"{name}: validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    return fig


def _save(fig: Any, path: Path) -> None:
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))


# --- the adapters' MLflow runs ----------------------------------------------------------------------

MLFLOW_RUN = "mlflow_run.json"  # {"tracking_uri", "experiment_id", "run_id"}, written by lorakit train's tracking


def log_to_runs(models: list[dict[str, Any]], files: list[Path]) -> list[str]:
    """Log each adapter's metrics (``report_<metric>``, and the base's as ``report_base_<metric>``) and the
    report files (under ``eval_report/``) to the MLflow run its folder names in ``mlflow_run.json``, where
    there is one and mlflow is installed. Returns one line per run it could not reach (a warning to print):
    the report is on disk either way."""
    runs = [(m, Path(m["adapter"]) / MLFLOW_RUN) for m in models if m.get("adapter")]
    runs = [(m, path) for m, path in runs if path.is_file()]
    if not runs:
        return []
    try:
        import mlflow  # noqa: F401
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient
    except ImportError:
        return [f"{path}: not logged to MLflow (mlflow is not installed)" for _, path in runs]
    # a store that does not answer is a warning, not minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    base, problems = models[0], []
    for model, path in runs:
        try:
            run = json.loads(path.read_text())
            client = MlflowClient(tracking_uri=run["tracking_uri"])
            now = int(time.time() * 1000)
            metrics = [Metric(f"report_{k}", float(model[k]), now, 0) for k in METRICS if model.get(k) is not None]
            metrics += [Metric(f"report_base_{k}", float(base[k]), now, 0) for k in METRICS if base.get(k) is not None]
            client.log_batch(run["run_id"], metrics=metrics)
            for f in files:
                client.log_artifact(run["run_id"], str(f), artifact_path="eval_report")
        except Exception as e:  # any store error (network, permissions, a deleted run): the report stands
            problems.append(f"{path}: not logged to MLflow ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    return problems
