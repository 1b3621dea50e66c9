"""`lorakit params`: exact LoRA counts on the meta device, the memory accounting, the CLI and its errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, GPT2Config, LlamaConfig, ViTConfig

from lorakit.cli import main
from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.lora.inject import add_lora, count_parameters
from lorakit.params import ACT_PER_LAYER, BYTES, build_on_meta, estimate

ROOT = Path(__file__).resolve().parents[2]
GPT3 = str(ROOT / "examples/configs/gpt3-175b-llama")
# 96 layers of (4·h² attention + 3·h·I MLP + 2·h norms), untied embedding and head (V·h each), final norm
H, I_, V, L = 12288, 32768, 50257, 96
LINEAR = L * (4 * H * H + 3 * H * I_)
GPT3_TOTAL = LINEAR + L * 2 * H + 2 * V * H + H
GPT3_LORA = L * 2 * 4 * (H + H)  # r=4 on q_proj and v_proj, each r·(in + out)


def tiny_llama(**kw) -> LlamaConfig:
    return LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, vocab_size=128,
                       num_attention_heads=4, num_key_value_heads=2, **kw)


def test_gpt3_175b_exact_counts_without_allocating():
    rss = psutil.Process().memory_info().rss
    report = estimate(GPT3, 4, ["q_proj", "v_proj"])
    assert psutil.Process().memory_info().rss - rss < 2**30  # 175B bf16 weights would be 326 GiB
    assert GPT3_TOTAL == 175_183_663_104
    assert report.total == GPT3_TOTAL
    assert report.trainable == GPT3_LORA == 18_874_368
    assert report.targets == 192
    assert round(report.reduction, -2) == 9300
    assert report.architecture == "LlamaForCausalLM"


def test_meta_build_holds_no_storage():
    model = build_on_meta(LlamaConfig(hidden_size=12288, num_hidden_layers=96, intermediate_size=32768,
                                      vocab_size=50257, num_attention_heads=96, num_key_value_heads=96))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} <= {"meta"}


def test_gpt3_memory_breakdown():
    mem = estimate(GPT3, 4, ["q_proj", "v_proj"], quantization="nf4", batch_size=1, seq_len=2048).memory
    act = ACT_PER_LAYER * 2048 * H * L  # SDPA: no stored attention scores
    assert mem["full"]["activations"] == mem["qlora"]["activations"] == act
    assert mem["full"]["logits"] == 16 * 2048 * V
    assert mem["full"]["trainable_weights"] + mem["full"]["gradients"] + mem["full"]["optimizer"] == 16 * GPT3_TOTAL
    assert mem["lora"]["frozen_weights"] == 2 * GPT3_TOTAL
    assert mem["lora"]["optimizer"] == 8 * GPT3_LORA
    # every linear but lm_head in nf4; embeddings, head and norms stay bf16
    assert mem["qlora"]["frozen_weights"] == math.ceil(LINEAR * BYTES["nf4"] + (GPT3_TOTAL - LINEAR) * 2)
    for parts in mem.values():
        assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert mem["qlora"]["total"] < mem["lora"]["total"] < mem["full"]["total"]


def test_quantized_bytes_match_bitsandbytes():
    import bitsandbytes.functional as bnbf

    w = torch.randn(256, 512, dtype=torch.float16)
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    stored = [q, state.absmax, state.state2.absmax]
    assert sum(t.numel() * t.element_size() for t in stored) == w.numel() * BYTES["nf4"]
    cb, scales, _ = bnbf.int8_vectorwise_quant(w)
    assert cb.numel() * cb.element_size() + scales.numel() * scales.element_size() == w.numel() + 4 * 256
    report = estimate(tiny_llama(), 8, ["q_proj"], quantization="int8")
    linears = 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)  # q,o + k,v (2 kv heads) + mlp, per layer
    rows = 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32)
    rest = report.total - linears
    assert report.memory["qlora"]["frozen_weights"] == linears + 4 * rows + 2 * rest


def test_qlora_quantizes_what_lorakit_quant_quantizes():
    # nf4 needs in_features % 64 == 0: of h=32, I=64 only down_proj (64 -> 32) is quantized
    report = estimate(tiny_llama(), 8, ["q_proj"], quantization="nf4")
    down = 2 * 64 * 32
    assert report.memory["qlora"]["frozen_weights"] == math.ceil(down * BYTES["nf4"] + (report.total - down) * 2)
    # GPT-2's Conv1D is not a bitsandbytes linear: its QLoRA base is the bf16 base
    gpt2 = estimate(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=64), 8, ["c_attn"])
    assert gpt2.memory["qlora"]["frozen_weights"] == gpt2.memory["lora"]["frozen_weights"] == 2 * gpt2.total


@pytest.mark.parametrize("name, cfg, targets", [
    ("gpt2 Conv1D", GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100, n_positions=64), ["c_attn"]),
    ("llama all-linear, tied", tiny_llama(tie_word_embeddings=True), "all-linear"),
    ("llama embedding", tiny_llama(), ["embed_tokens", "down_proj"]),
    ("vit Conv2d", ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8), ["projection", "query"]),
])
def test_counts_match_a_real_injection(name, cfg, targets):
    """The meta-device arithmetic equals what lorakit's injection creates on the real (tiny) model."""
    report = estimate(cfg, 4, targets)
    try:
        model = AutoModelForCausalLM.from_config(cfg)
    except ValueError:
        model = AutoModel.from_config(cfg)
    assert report.total == sum(p.numel() for p in model.parameters())
    add_lora(model, LoraConfig(r=4, target_modules=targets))
    trainable, _ = count_parameters(model)
    assert report.trainable == trainable


def test_gpt2_conv1d_is_r_times_in_plus_out():
    report = estimate(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100, n_positions=64), 8, ["c_attn"])
    assert report.targets == 3
    assert report.trainable == 3 * 8 * (32 + 3 * 32)  # c_attn: weight (in=32, out=96)


def test_activation_estimate_matches_saved_tensors():
    """ACT_PER_LAYER·s·b·h against the bytes autograd keeps per layer for a bf16 Llama with lorakit's LoRA."""

    def saved_bytes(layers: int) -> int:
        cfg = LlamaConfig(hidden_size=128, num_hidden_layers=layers, intermediate_size=344, vocab_size=256,
                          num_attention_heads=4, num_key_value_heads=4)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.randint(0, 256, (2, 64)))
        return sum(kept.values())

    per_layer = (saved_bytes(3) - saved_bytes(1)) / 2
    assert per_layer == pytest.approx(ACT_PER_LAYER * 2 * 64 * 128, rel=0.1)


def test_eager_attention_and_checkpointing_terms():
    b, s, h, layers, heads = 2, 64, 32, 2, 4
    sdpa = estimate(tiny_llama(), 4, ["q_proj"], batch_size=b, seq_len=s).memory["lora"]
    assert sdpa["activations"] == layers * ACT_PER_LAYER * s * b * h
    eager = estimate(tiny_llama(attn_implementation="eager"), 4, ["q_proj"], batch_size=b, seq_len=s)
    assert eager.memory["lora"]["activations"] == layers * (ACT_PER_LAYER * s * b * h + 5 * heads * s * s * b)
    ckpt = estimate(tiny_llama(), 4, ["q_proj"], batch_size=b, seq_len=s, gradient_checkpointing=True)
    assert ckpt.memory["lora"]["activations"] == layers * 2 * s * b * h + ACT_PER_LAYER * s * b * h
    excluded = estimate(tiny_llama(), 4, "all-linear", exclude_modules=["o_proj", "down_proj"])
    assert excluded.targets == 2 * 5


def test_target_matching_nothing_names_target_and_the_choices():
    with pytest.raises(LorakitError, match=r"--target nosuch .*available: .*q_proj"):
        estimate(tiny_llama(), 4, ["nosuch"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lorakit", "params", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_json_acceptance():
    out = run_cli("--model", "examples/configs/gpt3-175b-llama", "--r", "4", "--target", "q_proj,v_proj", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["trainable"], report["total"], report["targets"]) == (GPT3_LORA, GPT3_TOTAL, 192)
    assert isinstance(report["trainable"], int) and isinstance(report["total"], int)
    assert round(report["reduction"], -2) == 9300
    assert set(report["memory"]) == {"full", "lora", "qlora"}


def test_cli_bad_target_is_one_line_exit_2():
    out = run_cli("--model", "examples/configs/gpt3-175b-llama", "--target", "nosuch,other")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorakit: error: --target nosuch,other")
    assert "available:" in lines[0] and "q_proj" in lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_cli_yaml_prints_the_acceptance_table(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["params", "examples/configs/params.yaml"]) == 0
    text = capsys.readouterr().out
    assert "18,874,368" in text and "175,183,663,104" in text and "≈9,300×" in text
    assert "QLoRA (nf4 base)" in text and "batch 1 × seq 2048" in text


@pytest.mark.parametrize("model, expect", [
    ("/no/such/model", "--model /no/such/model: no such file or folder"),
    ("./missing-model", "--model ./missing-model: no such file or folder"),
    ("nosuch-org/nosuch-model", "--model nosuch-org/nosuch-model: not a local folder or config.json"),
])
def test_cli_missing_model_is_one_clear_line(model, expect, capsys, monkeypatch):
    import huggingface_hub.constants

    # a hub id fails at once instead of retrying the network (the env var is read at import)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["params", "--model", model, "--target", "q_proj,v_proj"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit: error: {expect}") and len(err.strip().splitlines()) == 1


def test_folder_without_config_json(tmp_path):
    with pytest.raises(LorakitError, match="no config.json"):
        estimate(str(tmp_path), 4, ["q_proj"])
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama().to_dict()))
    assert estimate(str(tmp_path / "config.json"), 4, ["q_proj"]).trainable == 2 * 4 * (32 + 32)
