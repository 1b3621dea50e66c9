"""lorakit <-> PEFT on real models: the same adapter gives the same logits in both, both directions."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit import LoraConfig, LorakitError
from tests.conftest import randomize_lora, rel_err, tiny_bert, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _out(model, ids=IDS):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


CASES = {
    "llama": (tiny_llama, LoraConfig(r=4, alpha=8, target_modules="all-linear")),
    "llama-embed-rslora": (tiny_llama, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                  rslora=True)),
    "gpt2-conv1d": (tiny_gpt2, LoraConfig(r=4, alpha=16, target_modules=["c_attn", "c_proj"])),
    "bert": (tiny_bert, LoraConfig(r=8, alpha=8, target_modules=["query", "value"])),
}


@pytest.mark.parametrize("case", CASES)
def test_lorakit_to_peft_and_back(case, tmp_path):
    make, cfg = CASES[case]
    model = lorakit.add_lora(make(), cfg)
    randomize_lora(model)
    ours = _out(model)
    lorakit.save_adapter(model, tmp_path / "lk")
    saved = json.loads((tmp_path / "lk" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == cfg.r and saved["use_rslora"] == cfg.rslora

    peft_model = PeftModel.from_pretrained(make(), tmp_path / "lk")
    assert rel_err(_out(peft_model), ours) < 1e-4
    # the base without the adapter really differs, so the comparison above means something
    assert rel_err(_out(make()), ours) > 1e-3

    peft_model.save_pretrained(tmp_path / "pk")
    back = lorakit.load_adapter(make(), tmp_path / "pk")
    assert rel_err(_out(back), ours) < 1e-4


def test_peft_made_adapter_loads_in_lorakit(tmp_path, minilm_path):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["LoRA trains a low-rank update.", "The base stays frozen."], return_tensors="pt", padding=True)
    peft_model = get_peft_model(AutoModel.from_pretrained(minilm_path),
                                PeftLoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"]))
    randomize_lora_peft(peft_model)
    peft_model.eval()
    want = peft_model(**batch).last_hidden_state
    peft_model.save_pretrained(tmp_path / "pk")
    ours = lorakit.load_adapter(AutoModel.from_pretrained(minilm_path).eval(), tmp_path / "pk")
    got = ours(**batch).last_hidden_state
    assert rel_err(got, want) < 1e-4
    base = AutoModel.from_pretrained(minilm_path).eval()(**batch).last_hidden_state
    assert rel_err(base, want) > 1e-3


def randomize_lora_peft(model, std=0.05):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_conv2d_roundtrip_with_peft(tmp_path):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    x = torch.randn(2, 3, 6, 6)
    model = lorakit.add_lora(make(), LoraConfig(r=2, alpha=4, target_modules=["0", "2"]))
    randomize_lora(model)
    ours = model(x)
    lorakit.save_adapter(model, tmp_path / "lk")
    theirs = PeftModel.from_pretrained(make(), tmp_path / "lk")(x)
    assert rel_err(theirs, ours) < 1e-4
    merged = lorakit.merge_and_unload(model)
    assert rel_err(merged(x), ours) < 1e-4


def test_merge_unmerge_and_merge_and_unload_keep_outputs():
    model = lorakit.add_lora(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model)
    want = _out(model)
    lorakit.merge(model)
    assert rel_err(_out(model), want) < 1e-5
    lorakit.unmerge(model)
    assert rel_err(_out(model), want) < 1e-5
    plain = lorakit.merge_and_unload(model)
    assert rel_err(_out(plain), want) < 1e-5
    assert set(plain.state_dict()) == set(tiny_llama().state_dict())
    assert not any(isinstance(m, lorakit.lora.layer.LoraLayer) for m in plain.modules())


def test_safe_merge_refuses_nan_and_leaves_weights_untouched():
    model = lorakit.add_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.adapters["default"].lora_B.fill_(float("nan"))
    with pytest.raises(LorakitError, match="NaN"):
        lorakit.merge(model)
    assert torch.equal(layer.weight, before)


def test_scale_zero_equals_base_and_disable_context():
    base_out = _out(tiny_llama())
    model = lorakit.add_lora(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(model)
    adapted = _out(model)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(_out(model), base_out, rtol=0, atol=0)
    torch.testing.assert_close(_out(model), adapted)
    lorakit.set_adapter_scale(model, 0.0)
    torch.testing.assert_close(_out(model), base_out, rtol=0, atol=0)


def test_several_adapters_switch_and_sum(tmp_path):
    model = tiny_llama()
    lorakit.add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), name="a")
    lorakit.add_lora(model, LoraConfig(r=2, target_modules=["v_proj", "down_proj"]), name="b")
    assert lorakit.adapter_names(model) == ["a", "b"]
    randomize_lora(model)
    base = _out(tiny_llama())
    lorakit.set_adapter(model, "a")
    only_a = _out(model)
    lorakit.set_adapter(model, "b")
    only_b = _out(model)
    lorakit.set_adapter(model, [])
    torch.testing.assert_close(_out(model), base, rtol=0, atol=0)
    lorakit.set_adapter(model, ["a", "b"], weights=[1.0, 0.5])
    both = _out(model)
    lorakit.set_adapter_scale(model, 1.0, "b")
    lorakit.set_adapter(model, "b")
    lorakit.set_adapter_scale(model, 0.5, "b")
    half_b = _out(model)
    # The update is additive in the weights, but logits are not linear in them: compare with PEFT instead.
    assert rel_err(only_a, base) > 1e-3 and rel_err(only_b, base) > 1e-3 and rel_err(both, only_a) > 1e-4
    lorakit.set_adapter(model, ["a", "b"], weights=[1.0, 0.5])
    lorakit.save_adapter(model, tmp_path / "a", name="a")
    lorakit.save_adapter(model, tmp_path / "b", name="b")
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    peft_model.set_adapter("b")
    for module in peft_model.modules():
        if hasattr(module, "set_scale") and "b" in getattr(module, "scaling", {}):
            module.set_scale("b", 0.5)
    assert rel_err(_out(peft_model), half_b) < 1e-4
    reloaded = lorakit.load_adapter(lorakit.load_adapter(tiny_llama(), tmp_path / "a", name="a"), tmp_path / "b", name="b")
    lorakit.set_adapter(reloaded, ["a", "b"], weights=[1.0, 0.5])
    assert rel_err(_out(reloaded), both) < 1e-5
    with pytest.raises(LorakitError, match="no adapter named 'c'"):
        lorakit.set_adapter(model, "c")
    with pytest.raises(LorakitError, match="already has an adapter named 'a'"):
        lorakit.add_lora(model, LoraConfig(target_modules=["q_proj"]), name="a")


def test_pissa_adapter_is_saved_for_the_untouched_base(tmp_path):
    model = lorakit.add_lora(tiny_llama(), LoraConfig(r=4, alpha=4, target_modules=["q_proj", "o_proj"], init="pissa"))
    torch.testing.assert_close(_out(model), _out(tiny_llama()), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # "training" moves A and B away from their initial values
        for p in lorakit.lora_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    want = _out(model)
    lorakit.save_adapter(model, tmp_path / "pissa")
    cfg = json.loads((tmp_path / "pissa" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8
    assert rel_err(_out(PeftModel.from_pretrained(tiny_llama(), tmp_path / "pissa")), want) < 1e-4
    assert rel_err(_out(lorakit.load_adapter(tiny_llama(), tmp_path / "pissa")), want) < 1e-4


def test_no_match_names_close_matches_and_available():
    with pytest.raises(LorakitError) as e:
        lorakit.add_lora(tiny_llama(), LoraConfig(target_modules=["q_prj", "nothing"]))
    msg = str(e.value)
    assert "q_proj" in msg and "did you mean" in msg and "available:" in msg and "down_proj" in msg
    assert "\n" not in msg


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    model = lorakit.add_lora(tiny_llama(hidden=32), LoraConfig(r=4, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    with pytest.raises(LorakitError) as e:
        lorakit.load_adapter(tiny_llama(hidden=48), tmp_path / "a")
    msg = str(e.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in msg
    assert "(4, 32)" in msg and "(4, 48)" in msg


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(LorakitError, match="adapter folder not found"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "nope")
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(LorakitError, match="adapter_config.json: missing"):
        lorakit.load_adapter(tiny_llama(), d)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(LorakitError, match="unreadable adapter config"):
        lorakit.load_adapter(tiny_llama(), d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: must never be loaded
    with pytest.raises(LorakitError, match="pickled adapters are not loaded"):
        lorakit.load_adapter(tiny_llama(), d)
    (d / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LorakitError, match="not a readable safetensors file"):
        lorakit.load_adapter(tiny_llama(), d)
    save_file({"base_model.model.model.layers.0.self_attn.zz_proj.lora_A.weight": torch.zeros(4, 32),
               "base_model.model.model.layers.0.self_attn.zz_proj.lora_B.weight": torch.zeros(32, 4)},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(LorakitError, match="zz_proj names a module this base model does not have"):
        lorakit.load_adapter(tiny_llama(), d)


def test_saved_file_uses_peft_key_names(tmp_path):
    model = lorakit.add_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    lorakit.save_adapter(model, tmp_path / "a")
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert len(keys) == 2 * 2 + 2
