"""What the commands print: the small wrong things and the noise a new user met (issue 8, items 7 and 9),
on the bundled model (real weights, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lorakit.cli import main

ROOT = Path(__file__).parents[2]
BASE = str(ROOT / "examples" / "base-model")
TEST = ROOT / "examples" / "data" / "task_test.jsonl"


def run(capsys, *args: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_alpaca_input_renders_the_record_as_training_did(capsys):
    from lorakit.data.formats import to_segments
    from lorakit.model import load_tokenizer

    record = json.loads(TEST.read_text().splitlines()[0])
    assert record["input"].strip()  # the task's records carry an input
    code, out, err = run(capsys, "generate", "--model", BASE, "--format", "alpaca", "--prompt", record["instruction"],
                         "--input", record["input"], "--max-new-tokens", "6")
    assert code == 0, err
    rendered = to_segments(record, "alpaca", load_tokenizer(BASE))[0][0]
    assert f"### Input:\n{record['input']}\n\n### Response:\n" in rendered
    code, raw, err = run(capsys, "generate", "--model", BASE, "--prompt", rendered, "--max-new-tokens", "6")
    assert code == 0, err
    assert out == raw  # the same greedy answer as the prompt training saw
    code, _, err = run(capsys, "generate", "--model", BASE, "--prompt", "x", "--input", "y")
    assert code == 2 and "--input" in err and "--format alpaca" in err


def test_eval_names_only_what_it_measured(capsys, tmp_path):
    code, _, err = run(capsys, "eval", "--model", BASE, "--data", TEST, "--limit", "2", "--max-new-tokens", "2")
    assert code == 0, err
    assert err.strip().splitlines()[-1] == f"exact match, token F1 and loss over 2 examples of {TEST}"
    retain = tmp_path / "retain.txt"
    retain.write_text("def add(a, b):\n    return a + b\n" * 8)
    code, _, err = run(capsys, "eval", "--model", BASE, "--retain", retain, "--seq-len", "64")
    assert code == 0, err
    assert err.strip().splitlines()[-1] == f"perplexity of {retain} in windows of 64 tokens"


def test_merge_names_the_dtype_of_an_fp32_base(capsys, tmp_path):
    from transformers import AutoModelForCausalLM

    import lorakit

    model = AutoModelForCausalLM.from_pretrained(BASE)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], init="gaussian"))
    lorakit.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=BASE)
    code, out, err = run(capsys, "merge", "--adapter", tmp_path / "adapter", "--output", tmp_path / "merged")
    assert code == 0, err
    assert f"onto the float32 base {BASE}" in out and "vs the adapter on its float32 base" in out
    assert "16-bit" not in out + err
    assert "Loading weights" not in err and "Writing model shards" not in err  # transformers' bars, silenced


def test_bad_json_message_reads_once(tmp_path):
    from lorakit.data.formats import iter_records

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi\n{"instruction": "a" "output": "b"}\n')
    assert [problem for _, _, problem in iter_records(bad)] == [
        "invalid JSON (Unterminated string starting at column 17)",
        "invalid JSON (Expecting ',' delimiter at column 21)"]
    array = tmp_path / "bad.json"
    array.write_text('[\n {"instruction": "hi}]')  # the string never ends
    assert [problem for _, _, problem in iter_records(array)] == [
        "invalid JSON (Unterminated string starting at column 18)"]


def test_quickstart_child_output_has_no_bars_blank_lines_or_kernels_warning(capfd, tmp_path):
    """The quickstart's tagged output of a child `python -m lorakit train` that loads weights and imports
    bitsandbytes (QLoRA)."""
    from lorakit.quickstart import run_children

    data = tmp_path / "train.jsonl"
    data.write_text("".join(TEST.read_text().splitlines(keepends=True)[:8]))
    capfd.readouterr()
    run_children({"nf4": ["train", "--model", BASE, "--data", str(data), "--max-steps", "1", "--batch-size", "4",
                          "--seq-len", "64", "--threads", "1", "--output", str(tmp_path / "nf4"), "--quantization",
                          "nf4", "--dtype", "float32"]})
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert any(line.startswith("[nf4] trained 1 steps") for line in lines), err
    assert not [line for line in lines if not line[len("[nf4] "):].strip()], err
    for noise in ("Loading weights", "kernels"):
        assert noise not in err


def test_compile_without_a_cxx_compiler_says_so(tmp_path):
    """--compile on CPU needs a C++ compiler (Inductor's): without one, one line and exit 2 before the
    first step, not Inductor's error from inside it; no output folder. A fresh process: Inductor reads
    CXX when it is first imported."""
    out = tmp_path / "run"
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++")}
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", str(ROOT / "examples" / "configs" / "quickstart.yaml"),
                           "--max-steps", "1", "--output", str(out), "--compile"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("lorakit: error")]
    assert len(lines) == 1 and "--compile" in lines[0] and "C++ compiler" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
