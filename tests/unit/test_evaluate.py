"""lorakit.evaluate: exact match on a tiny model taught one answer, perplexity against the model's own
loss, base vs adapter through disable_adapters, and lorakit eval."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lorakit
from lorakit.data.formats import to_segments
from lorakit.data.tokenize import collate, pad_token_id, tokenize_records
from lorakit.errors import LorakitError
from lorakit.evaluate import (
    Prediction,
    answer_scores,
    compare_with_base,
    exact_match,
    perplexity,
    predict,
    prompts_and_references,
    token_f1,
)
from tests.e2e.test_train import ANSWER, build_tiny_model

TEXT = "hello world, the quick brown fox. " * 6


def questions(n: int, answer: str = ANSWER, start: int = 0) -> list[dict]:
    # question numbers of different widths: prompts of different lengths share a batch (left padding)
    return [{"instruction": f"Question {i}: what is the answer?", "output": answer} for i in range(start, start + n * 37, 37)]


def teach(model, tokenizer, records: list[dict], steps: int = 60, lr: float = 1e-2) -> None:
    """Train ``model``'s trainable weights on ``records`` as lorakit train tokenizes them (prompt masked)."""
    batch = collate(tokenize_records(records, "alpaca", tokenizer, 64), pad_token_id(tokenizer))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("evaluate") / "model")


@pytest.fixture(scope="module")
def tiny(folder):
    """(base model, adapter model: the same base with a LoRA adapter taught ANSWER, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, alpha=16))
    teach(model, tokenizer, questions(8))
    return base, model, tokenizer


def test_prompt_is_what_training_put_before_the_answer(tiny):
    _, _, tok = tiny
    record = {"instruction": "Say it.", "input": "42", "output": "forty-two"}
    [(prompt, reference)] = prompts_and_references([record], "alpaca", tok)
    segments = to_segments(record, "alpaca", tok)
    assert prompt == segments[0][0] and prompt.endswith("### Response:\n")
    assert reference == "forty-two"
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "again"}, {"role": "assistant", "content": "bye"}]}
    [(prompt, reference)] = prompts_and_references([chat], "chat", tok)
    assert reference == "bye"
    assert prompt.endswith("<|im_start|>assistant\n") and "hello<|im_end|>" in prompt and "bye" not in prompt


def test_exact_match_counts_the_taught_answer_and_not_a_wrong_one(tiny):
    _, model, tok = tiny
    held_out = questions(6, start=500)
    predictions = predict(model, tok, held_out, batch_size=4)
    assert [p.output.strip() for p in predictions] == [ANSWER] * 6
    assert exact_match(model, tok, held_out, batch_size=4) == 1.0
    wrong = questions(3, answer="The answer is seven.", start=500)
    assert exact_match(model, tok, wrong) == 0.0
    assert exact_match(model, tok, held_out[:3] + wrong) == 0.5
    # left padding and batching do not change a greedy answer
    one_by_one = predict(model, tok, held_out, batch_size=1)
    assert [p.output for p in one_by_one] == [p.output for p in predictions]


def test_answers_stop_at_eos_or_the_token_cap(tiny):
    _, model, tok = tiny
    [p] = predict(model, tok, questions(1, start=900), max_new_tokens=64)
    assert p.output == ANSWER  # stopped at eos: nothing after the answer
    [short] = predict(model, tok, questions(1, start=900), max_new_tokens=2)
    assert len(tok(short.output, add_special_tokens=False)["input_ids"]) <= 2 and not short.correct


def test_base_vs_adapter_uses_the_same_model(tiny):
    base, model, tok = tiny
    reports = compare_with_base(model, tok, questions(4, start=700), TEXT, seq_len=16)
    assert reports["base"].exact_match == 0.0 and reports["adapter"].exact_match == 1.0
    # the disabled adapter is exactly the untouched base
    assert reports["base"].perplexity == pytest.approx(perplexity(base, tok, TEXT, 16), rel=1e-5)
    assert reports["adapter"].perplexity != pytest.approx(reports["base"].perplexity, rel=1e-3)
    assert lorakit.adapter_names(model) == ["default"]  # enabled again afterwards
    assert not any(layer.disabled for _, layer in lorakit.lora.lora_layers(model))
    with pytest.raises(LorakitError, match="no LoRA adapter"):
        compare_with_base(base, tok, questions(1))


def model_loss_ppl(model, ids: torch.Tensor, seq_len: int) -> float:
    """exp of the token-weighted mean of the model's own loss over disjoint windows."""
    nll = count = 0.0
    for window in ids.split(seq_len):
        if len(window) > 1:
            nll += model(input_ids=window[None], labels=window[None]).loss.item() * (len(window) - 1)
            count += len(window) - 1
    return math.exp(nll / count)


@torch.no_grad()
def test_perplexity_is_exp_of_the_models_own_mean_loss(tiny):
    base, _, tok = tiny
    ids = torch.tensor(tok(TEXT)["input_ids"])  # <s> + text: what perplexity() scores
    assert len(ids) % 16 not in (0, 1)  # a ragged last window is part of the check
    assert perplexity(base, tok, TEXT, 16, batch_size=3) == pytest.approx(model_loss_ppl(base, ids, 16), rel=1e-5)
    whole = math.exp(base(input_ids=ids[None], labels=ids[None]).loss.item())
    assert perplexity(base, tok, TEXT, len(ids) + 5) == pytest.approx(whole, rel=1e-5)


@torch.no_grad()
def test_sliding_windows_score_every_token_once_with_context(tiny):
    base, _, tok = tiny
    ids = tok(TEXT)["input_ids"][:40]
    text = tok.decode(ids, skip_special_tokens=True)
    assert tok(text)["input_ids"] == ids
    window = 8
    # stride 1: token t is predicted from the window - 1 tokens before it (all of them early on)
    nll = 0.0
    for t in range(1, len(ids)):
        context = torch.tensor(ids[max(0, t - window + 1):t])[None]
        nll -= torch.log_softmax(base(input_ids=context).logits[0, -1], -1)[ids[t]].item()
    expected = math.exp(nll / (len(ids) - 1))
    assert perplexity(base, tok, text, window, stride=1) == pytest.approx(expected, rel=1e-5)


def test_bad_inputs_are_errors(tiny):
    base, _, tok = tiny
    with pytest.raises(LorakitError, match="too short"):
        perplexity(base, tok, "", 16)
    with pytest.raises(LorakitError, match="stride"):
        perplexity(base, tok, TEXT, 8, stride=9)
    with pytest.raises(LorakitError, match="no examples"):
        exact_match(base, tok, [])


def test_eval_command_prints_base_and_adapter(folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.cli import main

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, alpha=16))
    teach(model, tok, questions(8))
    lorakit.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(folder))
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in questions(5, start=300)))
    retain = tmp_path / "retain.txt"
    retain.write_text(TEXT)

    assert main(["eval", "--adapter", str(tmp_path / "adapter"), "--data", str(data), "--retain", str(retain),
                 "--limit", "4", "--show", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"base", "adapter"}
    assert result["base"]["exact_match"] == 0.0 and result["adapter"]["exact_match"] == 1.0
    assert result["adapter"]["examples"][0]["output"] == ANSWER and result["adapter"]["examples"][0]["correct"]
    assert result["base"]["perplexity"] > 1 and result["adapter"]["perplexity"] > 1

    assert main(["eval", "--model", str(folder), "--data", str(data)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["model", "exact_match", "f1"] and table[1].split()[:2] == ["base", "0.0%"]

    assert main(["eval", "--model", str(folder), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: data file not found" in capsys.readouterr().err


def test_token_f1_and_exact_match_on_known_answers():
    # SQuAD's normalization: case, punctuation and articles do not count
    assert token_f1("the Answer is forty-two!", "answer is fortytwo") == 1.0
    # "forty two" vs "answer is forty two": 2 shared words, precision 2/2, recall 2/4 -> F1 2/3
    assert token_f1("forty two", ANSWER) == pytest.approx(2 / 3)
    # "two two two" vs "forty two": 1 shared (multiset), precision 1/3, recall 1/2 -> F1 0.4
    assert token_f1("two two two", "forty two") == pytest.approx(0.4)
    assert token_f1("seven", ANSWER) == 0.0 and token_f1("", "") == 1.0 and token_f1("a", "seven") == 0.0
    predictions = [Prediction("p", ANSWER, ANSWER), Prediction("p", ANSWER, " " + ANSWER + "\n"),
                   Prediction("p", ANSWER, "forty two"), Prediction("p", ANSWER, "seven")]
    assert answer_scores(predictions) == {"exact_match": 0.5, "f1": pytest.approx((1 + 1 + 2 / 3 + 0) / 4)}
