"""`lorakit generate` end to end: a tiny Llama, an adapter trained by `lorakit train` on a fixed-answer task."""

from __future__ import annotations

import io
import sys

import pytest

from tests.e2e.test_train import ANSWER, build_tiny_model, lorakit, write_task

PROMPT = "Question 7: what is the answer?"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A base model and an adapter that learned to answer ANSWER (12 LoRA steps, through the CLI's main)."""
    from lorakit.cli import main

    root = tmp_path_factory.mktemp("gen")
    model = build_tiny_model(root / "model")
    adapter = root / "adapter"
    code = main(["train", "--model", str(model), "--data", str(write_task(root / "train.jsonl", 24)),
                 "--output", str(adapter), "--max-steps", "12", "--lr", "1e-2", "--batch-size", "4",
                 "--seq-len", "64", "--threads", "1"])
    assert code == 0
    return {"model": model, "adapter": adapter}


def in_process(capsys, *args) -> tuple[int, str, str]:
    """``lorakit generate ARGS`` through the console script's ``main``, in this process (no import time)."""
    from lorakit.cli import main

    capsys.readouterr()
    code = main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def answer(capsys, *args) -> str:
    code, out, err = in_process(capsys, "--format", "alpaca", "--prompt", PROMPT, "--max-new-tokens", "12", *args)
    assert code == 0, err
    return out


def test_adapter_answers_and_scale_zero_is_the_base(trained, capsys):
    # the real console command once, in a fresh interpreter; no --model: the base comes from config.yaml
    r = lorakit("generate", "--adapter", trained["adapter"], "--format", "alpaca", "--prompt", PROMPT,
                "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ANSWER + "\n"
    base = answer(capsys, "--model", trained["model"])
    off = answer(capsys, "--adapter", trained["adapter"], "--scale", "0")
    assert off == base and base != r.stdout


class Chunks(io.StringIO):
    """A text stream that also keeps each write separately, to see the text arrive in pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def test_tokens_stream_as_they_are_generated(trained, monkeypatch):
    from lorakit.generate import complete, format_prompt, load_for_generation

    model, tok = load_for_generation(None, str(trained["adapter"]))
    out = Chunks()
    monkeypatch.setattr(sys, "stdout", out)
    text = complete(model, tok, format_prompt(tok, PROMPT, "alpaca"), max_new_tokens=12)
    assert text == ANSWER and out.getvalue() == ANSWER + "\n"
    words = [w for w in out.writes if w.strip()]
    assert len(words) >= 4  # word by word, not one write at the end


def test_chat_keeps_the_history(trained, monkeypatch):
    from lorakit.generate import chat, chat_prompt, load_for_generation

    model, tok = load_for_generation(str(trained["model"]), str(trained["adapter"]))
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    history = chat(model, tok, io.StringIO("hello\n\nhow are you?\n"), max_new_tokens=6, temperature=0.0)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert [history[0]["content"], history[2]["content"]] == ["hello", "how are you?"]
    # the tiny tokenizer has no chat template: the ChatML fallback carries the first exchange into turn two
    second = chat_prompt(tok, history[:3])
    assert f"<|im_start|>assistant\n{history[1]['content']}<|im_end|>\n" in second
    assert second.startswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert second.endswith("<|im_start|>user\nhow are you?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_cli_answers_each_stdin_line_with_turn_separators(trained, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nwho are you?\n"))
    code, out, err = in_process(capsys, "--adapter", trained["adapter"], "--chat", "--max-new-tokens", "4")
    assert code == 0, err
    # read from a pipe: each turn is echoed, each reply ends with a blank line
    lines = out.splitlines()
    assert [lines[0], lines[2], lines[3], lines[5]] == ["> hello", "", "> who are you?", ""] and len(lines) == 6
    assert lines[1].strip() and lines[4].strip() and "<|im_end|>" not in out


def test_full_model_as_adapter_is_refused(trained, capsys):
    code, _, err = in_process(capsys, "--adapter", trained["model"], "--prompt", "hi")
    assert code == 2 and "--method full" in err and len(err.strip().splitlines()) == 1


def test_sampling_is_seeded(trained, capsys):
    runs = [in_process(capsys, "--model", trained["model"], "--prompt", PROMPT, "--temperature", "1.0",
                       "--seed", str(seed), "--max-new-tokens", "16")[1] for seed in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
