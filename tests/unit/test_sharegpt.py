"""ShareGPT records (``{"conversations": [{"from": "human", "value": ...}]}``, LLaMA-Factory's format) train,
evaluate and check as the same conversation in chat format; a file of no known format is one line in the
data check (issue 8, item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.config import DataConfig
from lorakit.data.formats import detect_format, to_segments, validate_record
from lorakit.data.tokenize import load_datasets
from lorakit.evaluate import load_eval_records, prompts_and_references
from tests.unit.test_data_formats import CHAT, TEMPLATE, word_tokenizer

BASE_MODEL = str(Path(__file__).parents[2] / "examples" / "base-model")
SHAREGPT = {"system": "be nice", "conversations": [  # test_data_formats.CHAT, in ShareGPT
    {"from": "human", "value": "hi"},
    {"from": "gpt", "value": "hello there"},
    {"from": "user", "value": "bye"},  # the chat names are accepted too
    {"from": "assistant", "value": "goodbye"},
]}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(TEMPLATE)


def test_sharegpt_is_detected_and_renders_as_the_same_chat(tok, minilm_path):
    from transformers import AutoTokenizer

    assert detect_format(SHAREGPT) == "sharegpt" and validate_record(SHAREGPT, "sharegpt") == []
    inline_system = {"conversations": [{"from": "system", "value": "be nice"}] + SHAREGPT["conversations"]}
    for tokenizer in (tok, AutoTokenizer.from_pretrained(minilm_path)):  # a chat template; ChatML fallback
        expected = to_segments(CHAT, "chat", tokenizer)
        assert to_segments(SHAREGPT, "sharegpt", tokenizer) == expected
        assert to_segments(inline_system, "sharegpt", tokenizer) == expected


def test_sharegpt_problems_are_named_in_its_own_fields():
    bad = {"system": 3, "conversations": [{"from": "bot", "value": "hi"}, {"from": "gpt"},
                                          {"from": "gpt", "value": " "}]}
    assert validate_record(bad, "sharegpt") == [
        "field 'system' must be a string, got int",
        "conversations[0]: unknown 'from' value 'bot' (expected human, gpt, system, observation, function_call, "
        "user, assistant, tool)",
        "conversations[1]: missing field 'value'",
        "conversations[2]: gpt message is empty (empty response)",
    ]
    assert validate_record({"conversations": [{"from": "human", "value": "hi"}]}, "sharegpt") == [
        "no gpt (assistant) turn: nothing to train on"]


def test_training_and_eval_read_sharegpt_like_chat(tmp_path, tok):
    share = write_jsonl(tmp_path / "share.jsonl", [SHAREGPT] * 3)
    chat = write_jsonl(tmp_path / "chat.jsonl", [CHAT] * 3)
    got, _ = load_datasets(DataConfig(train=str(share), seq_len=64), tok)
    want, _ = load_datasets(DataConfig(train=str(chat), seq_len=64), tok)
    assert got == want and len(got) == 3
    records, fmt = load_eval_records(share)
    assert fmt == "sharegpt"
    [(prompt, reference)] = prompts_and_references(records[:1], fmt, tok)
    assert reference == "goodbye" and prompt.endswith("<|assistant|>\n") and "hello there" in prompt


def test_data_check_reports_sharegpt_roles(tmp_path, capsys):
    share = write_jsonl(tmp_path / "share.jsonl", [SHAREGPT, {"conversations": [{"from": "bot", "value": "x"}]}])
    assert main(["data", "check", str(share), "--model", BASE_MODEL]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"{share}:2: conversations[0]: unknown 'from' value 'bot' (expected human, gpt, system, "
                      "observation, function_call, user, assistant, tool)")
    assert f"{share}: 1 valid records, format sharegpt" in out
    assert "messages by role: assistant 2, system 1, user 2" in out


def test_a_file_of_an_unknown_format_is_one_line_not_one_per_record(tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": "a"} for i in range(50)])
    assert main(["data", "check", str(data), "--model", BASE_MODEL]) == 1
    out = capsys.readouterr().out.splitlines()
    problems = [line for line in out if line.startswith(str(data) + ":") and "valid records" not in line]
    assert problems == [f"{data}: none of the 50 records has the keys of a known format (the records have keys "
                        "['answer', 'question']): expected instruction/output (alpaca), messages (chat), "
                        "conversations (sharegpt), prompt/completion (prompt_completion) or text"]
    assert "1 problem: fix before training" in out and f"{data}: 0 valid records, format unknown" in out
