"""`lorakit quickstart` end to end on the bundled base model, shortened (a few steps, a few test examples,
a slice of the retain text): the real CLI in a subprocess, its table, report.md and report.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.errors import LorakitError

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "examples" / "base-model"
COLUMNS = ["model", "exact match (8 test)", "retain perplexity", "trainable params", "peak RSS", "train tokens/s",
           "train wall", "train CPU"]
# r=16 on q, k, v, o (256 -> 256) and gate, up (256 -> 688), down (688 -> 256) in each of the 4 layers
LORA_PARAMS = 4 * (4 * 16 * (256 + 256) + 3 * 16 * (256 + 688))


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    assert (BASE / "model.safetensors").is_file(), "examples/base-model is missing: python examples/build_base_model.py"
    tmp = tmp_path_factory.mktemp("quickstart")
    retain = tmp / "retain.txt"
    retain.write_text((ROOT / "examples" / "data" / "retain.txt").read_text()[:6000])
    out = tmp / "runs"
    proc = subprocess.run([sys.executable, "-m", "lorakit", "quickstart", "--bundled", "--output", str(out),
                           "--max-steps", "4", "--limit", "8", "--retain", str(retain)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def table(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


def test_table_compares_base_lora_and_full(quickstart):
    proc, out = quickstart
    rows = table(proc.stdout)
    assert rows[0] == COLUMNS
    assert [r[0] for r in rows[2:]] == ["base model", "LoRA r=16", "full fine-tune"]
    base, lora, full = rows[2:]
    assert base[3:] == ["—"] * 5  # the base trains nothing
    assert lora[3] == f"{LORA_PARAMS:,} (6.9%)" and full[3] == "4,212,992 (100.0%)"
    assert all(cell.endswith("MB") for cell in (lora[4], full[4]))
    assert (out / "report.md").read_text() == proc.stdout  # stdout is the report alone
    # both trainings' progress reaches stderr, each line tagged with its run
    assert "[lora] trained 4 steps" in proc.stderr and "[full] trained 4 steps" in proc.stderr


def test_report_json_has_every_figure(quickstart):
    _, out = quickstart
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4 and report["test_examples"] == 8 and report["r"] == 16
    assert report["batch_size"] * report["grad_accum"] == 16 and report["threads_per_run"] >= 1
    base, lora, full = report["rows"]
    assert [base["model"], lora["model"], full["model"]] == ["base", "lora", "full"]
    assert lora["exact_match"] >= base["exact_match"]
    assert lora["trainable_params"] == LORA_PARAMS and full["trainable_params"] == full["total_params"] == 4_212_992
    for row in (lora, full):
        assert row["peak_rss_mb"] > 100 and row["tokens_per_s"] > 0 and row["train_cpu_s"] > 0
        assert row["train_wall_s"] <= report["wall_s"]
    for row in report["rows"]:
        assert 1 < row["perplexity"] < 1e5
    assert full["perplexity"] != base["perplexity"]  # every weight moved
    assert len(report["examples"]) == 3 and set(report["examples"][0]) == {"prompt", "reference", "base", "lora", "full"}
    assert report["machine"]["cpus"] >= 1 and len(report["machine"]["load_before"]) == 3
    assert (out / "lora" / "adapter_model.safetensors").is_file() and (out / "full" / "model.safetensors").is_file()


def test_missing_base_model_is_one_line_and_writes_nothing(tmp_path, capsys):
    from lorakit.cli import main

    out = tmp_path / "runs"
    assert main(["quickstart", "--bundled", "--model", str(tmp_path / "nowhere"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: quickstart: base model") and "build_base_model.py" in err
    assert not out.exists()


def test_a_failing_run_stops_the_others_and_is_named(tmp_path, capfd):
    from lorakit.quickstart import run_children

    slow = tmp_path / "slow"  # 5000 steps: many minutes unless it is stopped
    started = time.perf_counter()
    with pytest.raises(LorakitError, match=r"failed \(exit 2\); its error is above, after \[bad\]"):
        run_children({"bad": ["train", "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")],
                      "slow": ["train", "--model", str(BASE), "--data", str(ROOT / "examples" / "data" / "task_train.jsonl"),
                               "--output", str(slow), "--max-steps", "5000", "--threads", "1"]})
    assert time.perf_counter() - started < 120
    assert not (slow / "adapter_model.safetensors").exists()
    err = capfd.readouterr().err
    assert "[bad] lorakit: error: --data" in err and "missing.jsonl" in err
