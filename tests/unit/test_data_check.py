"""`lorakit data check`: every bad record with its line, and the quality report, via the library and the real CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorakit.cli import main
from lorakit.data.check import check_file
from lorakit.data.dedup import NearDuplicateIndex, jaccard, normalize, shingles

DATA = Path(__file__).parent.parent / "data"
LEAVES = ("Explain how photosynthesis turns sunlight, water and carbon dioxide into glucose and oxygen "
          "inside the leaves of plants.")
CLEAN = [
    {"instruction": "What is the capital of France?", "output": "Paris."},
    {"instruction": "what is the CAPITAL of france", "output": "Paris, of course."},  # exact after normalizing
    {"instruction": LEAVES, "output": "Chlorophyll absorbs light; the Calvin cycle makes sugar."},
    # near: Jaccard 0.926 over the whole example
    {"instruction": LEAVES.replace("of plants", "of green plants"),
     "output": "Chlorophyll absorbs light; the Calvin cycle makes sugars."},
    # a near prompt (0.898) with another answer: 0.58 over the whole example, not a duplicate
    {"instruction": LEAVES.replace("leaves", "leaf"), "output": "Light reactions, then sugar."},
    {"instruction": "Name three primary colours.", "output": "Red, yellow and blue."},
    {"instruction": "Translate to German.", "input": "good morning", "output": "Guten Morgen."},
    {"instruction": "Write a haiku about rain.", "output": "Soft rain on the roof / the gutters sing / sleep comes"},
    {"instruction": "Summarize the plot of Hamlet in one line.", "output": "A prince avenges his father."},
    {"instruction": "Tell a long story.", "output": "once upon a time " * 40},  # > 64 tokens
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", "data", "check", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def bert(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture
def clean(tmp_path) -> Path:
    path = tmp_path / "clean.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CLEAN))
    return path


def test_bad_records_are_all_listed_with_their_lines_by_the_cli(minilm_path):
    bad = DATA / "bad_alpaca.jsonl"
    result = run_cli(str(bad), "--model", minilm_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    listed = [line for line in result.stdout.splitlines() if line.startswith(f"{bad}:")]
    assert listed == [
        f"{bad}:2: invalid JSON (Expecting ',' delimiter at column 60)",
        f"{bad}:3: missing field 'output'",
        f"{bad}:4: field 'instruction' must be a string, got int",
        f"{bad}:5: field 'output' is empty (empty response)",
        f"{bad}:7: expected a JSON object, got list",
        f"{bad}:9: record looks like chat but the file is alpaca",
        f"{bad}: 3 valid records, format alpaca",
    ]


def test_bad_chat_records_in_a_json_array_keep_the_line_each_starts_on(bert):
    bad = DATA / "bad_chat.json"
    report = check_file(bad, bert, seq_len=512)
    assert report.format == "chat" and report.records == 2 and not report.ok
    assert report.errors == [
        f"{bad}:6: messages[0]: unknown role 'narrator' (expected system, user, assistant, tool)",
        f"{bad}:10: messages[1]: assistant message is empty (empty response)",
        f"{bad}:14: messages[0]: missing field 'content'",
        f"{bad}:15: field 'messages' must be a list, got str",
    ]
    assert report.roles == {"assistant": 2, "system": 1, "user": 2}


def test_quality_report_on_a_clean_file(clean, bert):
    report = check_file(clean, bert, seq_len=64)
    assert report.ok and report.records == 10 and report.format == "alpaca"
    assert (report.exact_duplicates, report.near_duplicates) == (1, 1)
    assert report.duplicate_examples == [f"{clean}:2: exact duplicate of line 1",
                                         f"{clean}:4: near duplicate of line 3"]
    assert report.truncated == 1 and report.no_response_left == 0
    assert set(report.token_lengths) == {"p50", "p90", "p99", "max"}
    assert report.token_lengths["max"] > 64 >= report.token_lengths["p90"]
    assert report.response_lengths["max"] > report.response_lengths["p50"] > 0
    assert any("only 10 valid examples: LoRA needs thousands of diverse examples" in w for w in report.warnings)
    assert any("1 of 10 examples are longer than --seq-len 64" in w for w in report.warnings)


def test_cli_json_with_validation_overlap(clean, tmp_path, minilm_path):
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"instruction": "Name three primary colours!", "output": "RGB."}) + "\n"
                   + json.dumps({"instruction": "Who wrote Faust?", "output": "Goethe."}) + "\n")
    result = run_cli(str(clean), "--model", minilm_path, "--seq-len", "64", "--val-data", str(val), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["errors"] == []
    assert (report["records"], report["exact_duplicates"], report["near_duplicates"], report["truncated"]) == (
        10, 1, 1, 1)
    assert (report["val_records"], report["val_overlap"]) == (2, 1)
    assert any("1 of 2 validation prompts also appear" in w for w in report["warnings"])


def test_a_missing_model_is_one_line_naming_model(clean, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["data", "check", str(clean), "--model", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"lorakit: error: --model {missing}: no such folder or file; give a model folder, a .gguf file or a hub id"]


def test_the_small_data_warning_stops_at_a_thousand(tmp_path, bert):
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    records = [{"text": " ".join(rng.choice(words) for _ in range(12)) + f" {i}"} for i in range(1000)]
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = check_file(path, bert, seq_len=64)
    assert report.records == 1000
    assert not any("LoRA needs thousands" in w for w in report.warnings)


def test_near_duplicates_agree_with_exact_jaccard():
    """MinHash-LSH finds a pair exactly when its Jaccard over character 5-grams is >= 0.9."""
    rng = random.Random(0)
    base = " ".join(rng.choice(["red", "green", "blue", "tall", "small", "cat", "dog", "runs", "sleeps"])
                    for _ in range(60))
    index = NearDuplicateIndex()
    index.add(base, 0)
    seen = {True: 0, False: 0}
    for edits in range(1, 30):
        chars = list(base)
        for _ in range(edits):
            chars[rng.randrange(len(chars))] = rng.choice("xyzq")
        variant = "".join(chars)
        similar = jaccard(shingles(normalize(base)), shingles(normalize(variant))) >= 0.9
        assert (index.query(variant) is not None) == similar, edits
        seen[similar] += 1
    assert seen[True] and seen[False]  # both sides of the threshold were tried
    assert index.query(base.upper() + "!!") == 0
