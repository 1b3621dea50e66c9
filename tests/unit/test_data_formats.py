"""Formats, rendering, masking, packing, the cache, batching: real files, real tokenizers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lorakit.config import DataConfig
from lorakit.data.check import check_file
from lorakit.data.formats import (
    CHATML_TEMPLATE,
    detect_format,
    read_records,
    to_segments,
    validate_record,
)
from lorakit.data.tokenize import (
    IGNORE_INDEX,
    cache_path,
    collate,
    length_grouped_batches,
    load_datasets,
    pack,
    tokenize_record,
)
from lorakit.errors import LorakitError

ALPACA = {"instruction": "Add two and three.", "input": "", "output": "Five."}
ALPACA_INPUT = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
CHAT = {"messages": [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "goodbye"},
]}
PC = {"prompt": "What colour is the sky?", "completion": "Blue."}
TEXT = {"text": "Plain text to learn from."}


@pytest.fixture(scope="module")
def bert(minilm_path):
    """A real BERT WordPiece tokenizer: no chat template, no bos/eos ([CLS] first, [SEP] as end)."""
    return AutoTokenizer.from_pretrained(minilm_path)


TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def word_tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that adds <s> itself, with the given chat template."""
    words = "hi hello there how are you fine thanks bye goodbye be nice what is the sky blue turns".split()
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    vocab = {t: i for i, t in enumerate(specials + words + ["?", "!", ".", ",", "5"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>", additional_special_tokens=specials[3:])
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def templated():
    """Its chat template writes <s> too, as Llama 3's does."""
    return word_tokenizer(TEMPLATE)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def trained(tok, ex: dict) -> list[str]:
    """The tokens that carry a label."""
    return [tok.convert_ids_to_tokens(i) for i, lab in zip(ex["input_ids"], ex["labels"], strict=True)
            if lab != IGNORE_INDEX]


# --- reading --------------------------------------------------------------------------------------


def test_jsonl_and_json_array_give_the_same_records_with_their_lines(tmp_path):
    records = [ALPACA, CHAT, PC]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(ALPACA) + "\n\n" + json.dumps(CHAT) + "\n" + json.dumps(PC) + "\n")
    array = tmp_path / "d.json"
    array.write_text(json.dumps(records, indent=2))
    from_jsonl, from_array = read_records(jsonl), read_records(array)
    assert [r for _, r in from_jsonl] == [r for _, r in from_array] == records
    assert [line for line, _ in from_jsonl] == [1, 3, 4]  # the blank line keeps its number
    element_starts = [n for n, text in enumerate(array.read_text().splitlines(), 1) if text == "  {"]
    assert [line for line, _ in from_array] == element_starts and len(element_starts) == 3


def test_read_records_names_the_first_bad_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ALPACA) + "\n" + json.dumps(PC) + "\n{oops\n[1]\n")
    with pytest.raises(LorakitError, match=r"bad\.jsonl:3: invalid JSON"):
        read_records(bad)
    arr = tmp_path / "arr.json"
    arr.write_text('[\n  {"text": "a"},\n  "a string",\n  {"text": "b"}\n]\n')
    with pytest.raises(LorakitError, match=r"arr\.json:3: expected a JSON object, got str"):
        read_records(arr)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    with pytest.raises(LorakitError, match=r"broken\.json:3: invalid JSON"):
        read_records(broken)
    with pytest.raises(LorakitError, match="not found"):
        read_records(tmp_path / "absent.jsonl")


def test_jsonl_survives_crlf_a_bom_and_unicode_line_separators(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"text": "a\u2028b"}\r\n{"text": "ok"}\r\n'.encode())
    assert read_records(path) == [(1, {"text": "a\u2028b"}), (2, {"text": "ok"})]
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(LorakitError, match=r"d\.jsonl:2: not UTF-8 text"):
        read_records(path)


# --- formats --------------------------------------------------------------------------------------


def test_detect_format_by_keys():
    assert detect_format(ALPACA) == "alpaca"
    assert detect_format(CHAT) == "chat"
    assert detect_format(PC) == "prompt_completion"
    assert detect_format(TEXT) == "text"
    with pytest.raises(LorakitError, match="cannot tell the format"):
        detect_format({"question": "?", "answer": "!"})


def test_validate_record_lists_each_problem():
    for record, fmt in ((ALPACA, "alpaca"), (ALPACA_INPUT, "alpaca"), (CHAT, "chat"), (PC, "prompt_completion"),
                        (TEXT, "text")):
        assert validate_record(record, fmt) == []
    assert validate_record({"instruction": "x"}, "alpaca") == ["missing field 'output'"]
    assert validate_record({"instruction": 3, "output": "y"}, "alpaca") == [
        "field 'instruction' must be a string, got int"]
    assert validate_record({"instruction": "x", "output": " "}, "alpaca") == [
        "field 'output' is empty (empty response)"]
    assert validate_record({"prompt": "", "completion": ""}, "prompt_completion") == [
        "field 'completion' is empty (empty response)"]
    bad_chat = {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": 1},
                             {"role": "assistant", "content": ""}]}
    assert validate_record(bad_chat, "chat") == [
        "messages[0]: unknown role 'bot' (expected system, user, assistant, tool)",
        "messages[1]: field 'content' must be a string, got int",
        "messages[2]: assistant message is empty (empty response)",
    ]
    assert validate_record({"messages": [{"role": "user", "content": "hi"}]}, "chat") == [
        "no assistant message: nothing to train on"]


def test_alpaca_prompt_completion_and_text_render(bert):
    assert to_segments(ALPACA, "alpaca", bert) == [
        ("### Instruction:\nAdd two and three.\n\n### Response:\n", False), ("Five.[SEP]", True)]
    assert to_segments(ALPACA_INPUT, "alpaca", bert) == [
        ("### Instruction:\nTranslate to French.\n\n### Input:\ncat\n\n### Response:\n", False), ("chat[SEP]", True)]
    assert to_segments(PC, "prompt_completion", bert) == [("What colour is the sky?", False), ("Blue.[SEP]", True)]
    assert to_segments(TEXT, "text", bert) == [("Plain text to learn from.[SEP]", True)]


def test_chat_without_template_falls_back_to_chatml(bert):
    segments = to_segments(CHAT, "chat", bert)
    assert segments == [
        ("<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("hello there<|im_end|>\n", True),
        ("<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n", False),
        ("goodbye<|im_end|>\n[SEP]", True),
    ]
    # CHATML_TEMPLATE (for inference) renders exactly the trained text, bar the final end marker
    rendered = bert.apply_chat_template(CHAT["messages"], chat_template=CHATML_TEMPLATE, tokenize=False)
    assert rendered + "[SEP]" == "".join(t for t, _ in segments)


def test_chat_with_template_trains_on_assistant_turns_only(templated):
    ex = tokenize_record(CHAT, "chat", templated, seq_len=100)
    tokens = templated.convert_ids_to_tokens(ex["input_ids"])
    assert tokens[:2] == ["<s>", "<|system|>"]  # bos once, though both the template and the tokenizer add it
    assert tokens.count("<s>") == 1
    assert trained(templated, ex) == ["hello", "there", "<|end|>", "goodbye", "<|end|>"]
    assert "".join(t for t, _ in to_segments(CHAT, "chat", templated)) == templated.apply_chat_template(
        CHAT["messages"], tokenize=False)


def test_a_template_that_rewrites_earlier_turns_still_trains_on_the_answers():
    # "5 turns" heads the whole conversation but "1 turns" its first message: not prefix-stable
    tok = word_tokenizer("{{ messages | length }} turns\n" + TEMPLATE)
    ex = tokenize_record(CHAT, "chat", tok, seq_len=100)
    assert tok.convert_ids_to_tokens(ex["input_ids"])[:3] == ["<s>", "5", "turns"]
    assert trained(tok, ex) == ["hello", "there", "goodbye"]


def test_a_conversation_the_template_refuses_is_a_one_line_error_naming_its_line(tmp_path):
    tok = word_tokenizer("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + TEMPLATE)
    no_system = {"messages": CHAT["messages"][1:]}
    path = write_jsonl(tmp_path / "chat.jsonl", [no_system, CHAT, no_system])
    with pytest.raises(LorakitError, match=r"chat\.jsonl: the tokenizer's chat template rejects this conversation: "
                                           r"System role not supported"):
        load_datasets(DataConfig(train=str(path)), tok)
    report = check_file(path, tok, seq_len=64)
    assert report.records == 2
    assert report.errors == [f"{path}:2: the tokenizer's chat template rejects this conversation: "
                             "System role not supported"]


def test_a_slow_tokenizer_masks_like_the_fast_one(bert, minilm_path):
    from transformers import BertTokenizerLegacy

    slow = BertTokenizerLegacy.from_pretrained(minilm_path)
    assert not slow.is_fast
    for record, fmt in ((ALPACA_INPUT, "alpaca"), (CHAT, "chat"), (PC, "prompt_completion")):
        assert tokenize_record(record, fmt, slow, 64) == tokenize_record(record, fmt, bert, 64)


# --- tokenization -----------------------------------------------------------------------------------


def test_prompt_tokens_are_masked_unless_train_on_prompt(bert):
    ex = tokenize_record(ALPACA_INPUT, "alpaca", bert, seq_len=64)
    assert ex["input_ids"][0] == bert.cls_token_id  # the tokenizer's own leading token
    assert trained(bert, ex) == ["chat", "[SEP]"]
    n_response = 2
    assert ex["labels"][:-n_response] == [IGNORE_INDEX] * (len(ex["labels"]) - n_response)
    assert ex["labels"][-n_response:] == ex["input_ids"][-n_response:]
    everything = tokenize_record(ALPACA_INPUT, "alpaca", bert, seq_len=64, train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"] == ex["input_ids"]
    text = tokenize_record(TEXT, "text", bert, seq_len=64)
    assert text["labels"][1:] == text["input_ids"][1:]  # all of it is trained, bar the [CLS] prefix


def test_truncation_keeps_the_first_seq_len_tokens(bert):
    full = tokenize_record(ALPACA, "alpaca", bert, seq_len=1000)
    short = tokenize_record(ALPACA, "alpaca", bert, seq_len=5)
    assert len(full["input_ids"]) > 5
    assert short["input_ids"] == full["input_ids"][:5]
    assert short["labels"] == full["labels"][:5]


# --- datasets -------------------------------------------------------------------------------------


def numbered(n: int) -> list[dict]:
    rng = random.Random(1)
    return [{"instruction": f"Repeat the number {i}.", "input": " ".join(["word"] * rng.randint(0, 30)),
             "output": f"{i}"} for i in range(n)]


def test_validation_from_a_file_or_a_seeded_fraction(tmp_path, bert):
    train = write_jsonl(tmp_path / "train.jsonl", numbered(40))
    val = write_jsonl(tmp_path / "val.jsonl", numbered(3))
    tr, va = load_datasets(DataConfig(train=str(train), val=str(val), seq_len=64), bert)
    assert (len(tr), len(va)) == (40, 3)
    cfg = DataConfig(train=str(train), val_fraction=0.25, seq_len=64)
    tr1, va1 = load_datasets(cfg, bert, seed=3)
    tr2, va2 = load_datasets(cfg, bert, seed=3)
    _, va3 = load_datasets(cfg, bert, seed=4)
    assert (len(tr1), len(va1)) == (30, 10)
    assert (tr1, va1) == (tr2, va2)
    assert va3 != va1
    key = [tuple(e["input_ids"]) for e in tr1 + va1]
    assert len(set(key)) == 40  # disjoint and complete
    assert load_datasets(DataConfig(train=str(train), seq_len=64), bert)[1] == []


def test_load_datasets_rejects_a_bad_record_with_its_line(tmp_path, bert):
    path = write_jsonl(tmp_path / "t.jsonl", [ALPACA, ALPACA_INPUT, {"instruction": "x", "output": ""}])
    with pytest.raises(LorakitError, match=r"t\.jsonl:3: field 'output' is empty"):
        load_datasets(DataConfig(train=str(path)), bert)


def test_packing_fills_seq_len_blocks_and_keeps_masks(tmp_path, bert):
    path = write_jsonl(tmp_path / "t.jsonl", numbered(20))
    plain, _ = load_datasets(DataConfig(train=str(path), seq_len=32), bert)
    packed, _ = load_datasets(DataConfig(train=str(path), seq_len=32, packing=True), bert)
    assert all(len(b["input_ids"]) == 32 for b in packed[:-1]) and 0 < len(packed[-1]["input_ids"]) <= 32
    assert [t for b in packed for t in b["input_ids"]] == [t for e in plain for t in e["input_ids"]]
    assert [t for b in packed for t in b["labels"]] == [t for e in plain for t in e["labels"]]
    assert len(packed) == -(-sum(len(e["input_ids"]) for e in plain) // 32) < len(plain)
    assert pack([], 8) == []


def test_cache_is_reused_and_invalidated_when_the_file_changes(tmp_path, bert, minilm_path):
    path = write_jsonl(tmp_path / "t.jsonl", numbered(10))
    cfg = DataConfig(train=str(path), val_fraction=0.2, seq_len=64)
    cache = tmp_path / "cache"
    fresh = AutoTokenizer.from_pretrained(minilm_path)  # never used yet: its key must match a used one's
    first = load_datasets(cfg, fresh, cache_dir=cache)
    stored = cache_path(cfg, bert, cache)
    assert stored.is_file() and list(cache.iterdir()) == [stored]
    assert load_datasets(cfg, bert, cache_dir=cache) == first

    # Rewrite the cache with a marker: a second load that returns it did not re-tokenize.
    tensors = load_file(str(stored))
    tensors["train.input_ids"][0] = 4242
    save_file(tensors, str(stored))
    assert load_datasets(cfg, bert, cache_dir=cache)[0][0]["input_ids"][0] == 4242

    write_jsonl(path, numbered(12))
    changed = load_datasets(cfg, bert, cache_dir=cache)
    assert cache_path(cfg, bert, cache) != stored
    assert len(changed[0]) + len(changed[1]) == 12
    assert changed[0][0]["input_ids"][0] != 4242
    other_cfg = DataConfig(train=str(path), val_fraction=0.2, seq_len=64, train_on_prompt=True)
    assert cache_path(other_cfg, bert, cache) != cache_path(cfg, bert, cache)


# --- batches --------------------------------------------------------------------------------------


def padding(examples: list[dict], batches: list[list[int]]) -> int:
    lengths = [len(e["input_ids"]) for e in examples]
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches_cut_padding_and_are_deterministic():
    rng = random.Random(0)
    examples = [{"input_ids": [1] * rng.randint(1, 200)} for _ in range(400)]
    grouped = length_grouped_batches(examples, batch_size=8, seed=0, epoch=0)
    assert sorted(i for b in grouped for i in b) == list(range(400))
    assert all(len(b) == 8 for b in grouped)
    assert grouped == length_grouped_batches(examples, batch_size=8, seed=0, epoch=0)
    assert grouped != length_grouped_batches(examples, batch_size=8, seed=0, epoch=1)
    order = list(range(400))
    random.Random(0).shuffle(order)
    shuffled = [order[i:i + 8] for i in range(0, 400, 8)]
    assert padding(examples, grouped) < 0.2 * padding(examples, shuffled)
    longest = max(range(400), key=lambda i: len(examples[i]["input_ids"]))
    assert longest in grouped[0]


def test_collate_pads_right_and_masks_padding():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (2, 3), "attention_mask": (2, 3), "labels": (2, 3)}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_examples_whose_answer_is_truncated_away_are_dropped(tmp_path, bert):
    long_prompt = {"instruction": "word " * 100, "output": "gone"}
    path = write_jsonl(tmp_path / "t.jsonl", [ALPACA, long_prompt])
    train, _ = load_datasets(DataConfig(train=str(path), seq_len=32), bert)
    assert len(train) == 1 and trained(bert, train[0]) == ["five", ".", "[SEP]"]
    write_jsonl(path, [long_prompt])
    with pytest.raises(LorakitError, match="no example has a response token within --seq-len 32"):
        load_datasets(DataConfig(train=str(path), seq_len=32), bert)
