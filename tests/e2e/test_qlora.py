"""QLoRA end to end: `lorakit train/generate/merge --quantization nf4` on a tiny Llama whose linears are all
NF4-quantizable, exact resume on the quantized base, the adapter in PEFT on the bf16 base, and streamed
loading that never holds the 16-bit model (peak RSS of a fresh process)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorakit import load_adapter
from lorakit.merging import merge_to_folder
from lorakit.quant import load_quantized
from tests.conftest import tiny_llama
from tests.e2e.test_train import build_tiny_model, lorakit, records, write_task


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    """The tokenizer of test_train's tiny model with a hidden-64 Llama: every linear's in_features is a
    multiple of NF4's 64-weight block, so all 14 are quantized."""
    root = tmp_path_factory.mktemp("qlora")
    folder = build_tiny_model(root / "model")
    model = tiny_llama(vocab=len(AutoTokenizer.from_pretrained(folder)), hidden=64)
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 0, 1, 2
    model.save_pretrained(folder)
    return {"model": folder, "train": write_task(root / "train.jsonl", 16), "root": root}


@pytest.fixture(scope="module")
def run(task) -> tuple[Path, subprocess.CompletedProcess]:
    out = task["root"] / "run"
    r = lorakit("train", "--model", task["model"], "--data", task["train"], "--output", out, "--quantization", "nf4",
                "--max-steps", "6", "--lr", "1e-2", "--batch-size", "4", "--seq-len", "64", "--dropout", "0.1",
                "--save-every", "3", "--threads", "1")
    assert r.returncode == 0, r.stderr
    return out, r


def logits(model: nn.Module, text: str = "Question 7: what is the answer?") -> torch.Tensor:
    """(1, T, V) fp32 logits of ``text`` (tokenized by the model folder's tokenizer)."""
    ids = AutoTokenizer.from_pretrained(model.config._name_or_path)(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def test_train_on_nf4_base_reports_it_and_learns(run):
    out, r = run
    assert "nf4: 14 linear layers quantized" in r.stderr
    assert "kept 16-bit: lm_head (output head" in r.stderr
    losses = [x["loss"] for x in records(out) if "loss" in x]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    assert "quantization: nf4" in (out / "config.yaml").read_text()


def test_resume_on_nf4_base_reproduces_the_uninterrupted_adapter(run):
    out, _ = run
    want = load_file(out / "adapter_model.safetensors")
    shutil.rmtree(out / "checkpoints" / "step-6")  # as if killed between steps 3 and 6; resumed in place
    r = lorakit("train", "--output", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr and "step-3" in r.stderr
    got = load_file(out / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_peft_loads_the_qlora_adapter_on_the_bf16_base(run, task):
    from peft import PeftModel

    out, _ = run
    base = AutoModelForCausalLM.from_pretrained(task["model"], dtype=torch.bfloat16)
    plain = logits(base)
    peft = logits(PeftModel.from_pretrained(base, out))
    ours = logits(load_adapter(AutoModelForCausalLM.from_pretrained(task["model"], dtype=torch.bfloat16), out))
    assert (peft - ours).abs().max() < 0.05 * ours.abs().max()
    assert (peft - plain).abs().max() > 0.5  # the adapter does something there
    on_nf4 = logits(load_adapter(load_quantized(task["model"], "nf4")[0], out))
    assert torch.equal(on_nf4.argmax(-1)[0, -3:], ours.argmax(-1)[0, -3:])  # the same answer on either base


def test_generate_and_merge_cli_on_nf4_base(run, task, tmp_path):
    out, _ = run
    g = lorakit("generate", "--adapter", out, "--quantization", "nf4", "--format", "alpaca",
                "--prompt", "Question 7: what is the answer?", "--max-new-tokens", "8")
    assert g.returncode == 0, g.stderr
    assert "nf4: 14 linear layers quantized" in g.stderr and "answer" in g.stdout
    m = lorakit("merge", "--adapter", out, "--output", tmp_path / "merged")
    assert m.returncode == 0, m.stderr
    diff = float(re.search(r"max \|logit difference\| vs the adapter on its nf4 base: ([\d.]+)", m.stdout)[1])
    assert diff < 0.5 and "warning" not in m.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    assert all(type(x) is nn.Linear for x in merged.modules() if isinstance(x, nn.Linear))
    on_nf4 = logits(load_adapter(load_quantized(task["model"], "nf4")[0], out))
    assert (logits(merged) - on_nf4).abs().max() <= diff + 1e-3


def test_merge_onto_16_bit_weights_drifts_more_and_warns(run, tmp_path, capsys):
    out, _ = run
    onto_nf4 = merge_to_folder(None, str(out), str(tmp_path / "nf4"))
    onto_16 = merge_to_folder(None, str(out), str(tmp_path / "bf16"), quantization="none", warn_above=onto_nf4 * 2)
    assert onto_16 > 2 * onto_nf4  # the adapter learned the NF4 base's errors; the 16-bit weights lack them
    captured = capsys.readouterr()
    # the checkpoint's own weights, named by their dtype (this tiny checkpoint is fp32)
    assert "onto the float32 base" in captured.out and "lorakit: warning: the merged model's logits differ" in captured.err
    assert (tmp_path / "bf16" / "model.safetensors").is_file()


def write_bf16_llama(folder: Path, cfg: LlamaConfig, shard_bytes: int = 32 * 2**20) -> int:
    """Random bf16 shards for ``cfg``, one tensor generated at a time; returns the checkpoint's bytes."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    cfg.save_pretrained(folder)
    weight_map, shard = {}, {}
    for i, (key, shape) in enumerate(shapes.items()):
        shard[key] = (torch.randn(shape) * 0.02).to(torch.bfloat16)
        if sum(t.numel() for t in shard.values()) * 2 >= shard_bytes or i == len(shapes) - 1:
            name = f"model-{len(set(weight_map.values())):05d}.safetensors"
            save_file(shard, folder / name)
            weight_map.update(dict.fromkeys(shard, name))
            shard = {}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return 2 * sum(s.numel() for s in shapes.values())


MEASURE = """
import json, sys
import transformers.models.llama.modeling_llama  # imported before the baseline: code, not data
from lorakit.device import peak_rss_bytes
from lorakit.quant import load_quantized
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
_, report = load_quantized(sys.argv[1], "nf4")
peak = peak_rss_bytes()  # this process's own (ru_maxrss would carry pytest's peak across exec)
print(json.dumps({"growth": peak - before, "base": report.base_bytes, "checkpoint": report.checkpoint_bytes}))
"""


def test_streamed_loading_never_holds_the_16_bit_model(tmp_path):
    """83M parameters, 158 MiB in bf16, NF4 base 42 MiB: a loader that held the 16-bit model would grow
    by 158 + 42 MiB at least; this one holds one tensor at a time (measured growth 85-110 MiB: the base,
    the quantizer's temporaries and allocator slack)."""
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=24,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    checkpoint = write_bf16_llama(tmp_path, cfg)
    r = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["checkpoint"] == checkpoint
    assert m["base"] < 0.3 * checkpoint
    assert m["growth"] < checkpoint, f"peak RSS grew {m['growth'] / 2**20:.0f} MiB while loading"
