"""QLoRA's quantized base: NF4/int8 round trips, LoRA over a quantized linear (forward, gradients, what
autograd keeps), streamed loading from shards, training, merging onto a dequantized base."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LoraConfig, add_lora, merge_and_unload, save_adapter
from lorakit.errors import LorakitError
from lorakit.lora.inject import lora_layers
from lorakit.quant import NF4_BITS, dequantize, load_quantized
from lorakit.quant import bnb as bnb_mod
from lorakit.quant.bnb import empty_quantized_linear, set_quantized_weight, storage_bytes
from tests.conftest import randomize_lora, rel_err, tiny_llama


def quantized_linear(weight: torch.Tensor, quantization: str, bias: torch.Tensor | None = None) -> nn.Linear:
    out_f, in_f = weight.shape
    module = empty_quantized_linear(nn.Linear(in_f, out_f, bias=bias is not None, device="meta"), quantization,
                                    torch.bfloat16)
    set_quantized_weight(module, weight)
    if bias is not None:
        module.bias = nn.Parameter(bias, requires_grad=False)
    return module


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny bf16 Llama whose linears are all NF4-quantizable (in_features 64 or 128), in 3 shards."""
    folder = tmp_path_factory.mktemp("llama")
    model = tiny_llama(hidden=64).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="50KB")
    return folder, model


@pytest.mark.parametrize("quantization, bound", [("nf4", 0.1), ("int8", 0.01)])
def test_round_trip_error_on_gaussian_weights(quantization, bound):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    m = quantized_linear(w, quantization)
    back = dequantize(m.weight, m, torch.float32)
    assert back.shape == (256, 1024)
    err = rel_err(back, w.float())
    assert 0 < err <= bound


def test_nf4_storage_is_4_127_bits_per_weight():
    m = quantized_linear(torch.randn(1024, 1024).to(torch.bfloat16), "nf4")
    bits = 8 * storage_bytes(m.weight, m) / (1024 * 1024)
    # 4 + 8/64 + 32/(64·256), plus the two lookup tables (16 + 256 fp32 values) per layer
    assert abs(NF4_BITS - 4.127) < 1e-3
    assert NF4_BITS <= bits < NF4_BITS + 0.01
    assert m.weight.quant_state.blocksize == 64 and m.weight.quant_state.state2.blocksize == 256


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_row_slabs_dequantize_exactly_the_rows_of_w(quantization, monkeypatch):
    m = quantized_linear(torch.randn(100, 256).to(torch.bfloat16), quantization)
    monkeypatch.setattr(bnb_mod, "SLAB_BYTES", 2 * 256 * 30)  # 30 rows a slab: 30, 30, 30, 10
    slabs = bnb_mod.row_slabs(m)
    assert [(s.start, s.stop) for s in slabs] == [(0, 30), (30, 60), (60, 90), (90, 100)]
    whole = dequantize(m.weight, m, torch.bfloat16)
    assert torch.equal(torch.cat([dequantize(m.weight, m, torch.bfloat16, s) for s in slabs]), whole)


@pytest.mark.parametrize("quantization, slab_rows", [("nf4", 1000), ("nf4", 32), ("int8", 1000), ("int8", 32)])
def test_lora_over_quantized_linear_matches_the_dequantized_reference(quantization, slab_rows, monkeypatch):
    monkeypatch.setattr(bnb_mod, "SLAB_BYTES", 2 * 128 * slab_rows)  # 32: the matmuls run in 3 slabs
    torch.manual_seed(0)
    w, b = torch.randn(96, 128).to(torch.bfloat16), torch.randn(96).to(torch.bfloat16)
    model = nn.Sequential(quantized_linear(w, quantization, b))
    add_lora(model, LoraConfig(r=4, target_modules=["0"]))
    randomize_lora(model)
    layer = model[0]
    assert layer.quantized and (layer.in_features, layer.out_features) == (128, 96)
    x = torch.randn(5, 128, requires_grad=True)
    ad = layer.adapters["default"]
    y = model(x.to(torch.bfloat16))
    y.float().square().sum().backward()
    got = (x.grad, ad.lora_A.grad, ad.lora_B.grad)

    # the same computation spelled out, with W dequantized once by hand
    x2 = x.detach().clone().requires_grad_()
    a, bb = ad.lora_A.detach().clone().requires_grad_(), ad.lora_B.detach().clone().requires_grad_()
    wd = dequantize(layer.weight, layer.base_layer, torch.bfloat16)
    xb = x2.to(torch.bfloat16)
    ref = F.linear(xb, wd, b) + (xb @ a.to(torch.bfloat16).t()) @ bb.to(torch.bfloat16).t() * ad.scaling
    ref.float().square().sum().backward()
    assert rel_err(y.float(), ref.float()) < 1e-2
    for g, r in zip(got, (x2.grad, a.grad, bb.grad), strict=True):
        assert rel_err(g.float(), r.float()) < 2e-2
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_autograd_keeps_no_dequantized_weight():
    """The memory claim: between forward and backward no (out, in) tensor is alive, only activations."""
    model = nn.Sequential(quantized_linear(torch.randn(256, 512).to(torch.bfloat16), "nf4"))
    add_lora(model, LoraConfig(r=4, target_modules=["0"]))
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = model(torch.randn(3, 512, dtype=torch.bfloat16))
    assert saved and all(s != (256, 512) and s.numel() < 256 * 512 for s in saved)
    y.float().sum().backward()


def test_streamed_load_reads_one_tensor_at_a_time(saved_llama):
    folder, model = saved_llama
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2  # the loader has to follow the index across shards
    qm, report = load_quantized(folder, "nf4")
    linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and p != "lm_head"]
    assert sorted(report.quantized) == sorted(linears)
    assert report.kept == {"lm_head": "output head (QLoRA keeps it 16-bit)"}
    assert type(qm.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert qm.model.embed_tokens.weight.dtype == torch.bfloat16
    assert report.checkpoint_bytes == sum(p.numel() * 2 for p in model.state_dict().values())
    # never more than the largest single tensor (the embedding) of the 16-bit checkpoint at once
    assert report.largest_tensor_bytes == max(t.numel() * 2 for t in model.state_dict().values())
    assert report.largest_tensor_bytes < report.checkpoint_bytes / 8
    assert not report.unexpected
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(ids).logits.float(), qm(ids).logits.float()
    assert rel_err(got, ref) < 0.15  # NF4 noise, not a broken model
    inv_freq = qm.model.rotary_emb.inv_freq  # buffers are computed by the modules, not left on meta
    assert inv_freq.dtype == torch.float32 and torch.allclose(inv_freq, model.model.rotary_emb.inv_freq.float(), rtol=1e-2)


def test_shapes_the_kernels_refuse_stay_16_bit(tmp_path):
    tiny_llama(hidden=32).save_pretrained(tmp_path)  # in_features 32: not whole NF4 blocks of 64
    qm, report = load_quantized(tmp_path, "nf4", dtype=torch.bfloat16)
    assert report.quantized == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]  # in 64
    assert "not a multiple of the NF4 block size 64" in report.kept["model.layers.0.self_attn.q_proj"]
    assert "kept 16-bit: model.layers.0.self_attn.q_proj" in report.summary()
    assert isinstance(qm.model.layers[0].self_attn.q_proj, nn.Linear)
    assert qm.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    _, report8 = load_quantized(tmp_path, "int8")
    assert len(report8.quantized) == 14  # int8 scales whole rows: any shape


def test_tied_embeddings_stay_tied(tmp_path):
    tiny_llama(hidden=64, tie=True).save_pretrained(tmp_path)
    qm, _ = load_quantized(tmp_path, "nf4")
    assert qm.lm_head.weight is qm.model.embed_tokens.weight


def test_missing_or_pickled_checkpoints_are_named(tmp_path, saved_llama):
    (tmp_path / "config.json").write_text((saved_llama[0] / "config.json").read_text())
    with pytest.raises(LorakitError, match="no model.safetensors"):
        load_quantized(tmp_path, "nf4")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(LorakitError, match="never unpickles"):
        load_quantized(tmp_path, "nf4")


def test_training_lowers_the_loss_and_only_lora_learns(saved_llama):
    folder, _ = saved_llama
    torch.manual_seed(0)
    qm, _ = load_quantized(folder, "nf4")
    add_lora(qm, LoraConfig(r=8, alpha=16))
    before = {n: p.detach().clone() for n, p in qm.named_parameters()}
    qm.train()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in qm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = qm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    changed = {n for n, p in qm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".adapters." in n for n in changed)


def test_pissa_needs_a_16_bit_base(saved_llama):
    qm, _ = load_quantized(saved_llama[0], "nf4")
    with pytest.raises(LorakitError, match="pissa"):
        add_lora(qm, LoraConfig(init="pissa"))


@pytest.mark.parametrize("targets, dtype", [(["q_proj", "v_proj"], torch.bfloat16), ("all-linear", torch.bfloat16),
                                           ("all-linear", torch.float32)])
def test_merge_onto_quantized_base_gives_a_plain_model_in_its_dtype(saved_llama, tmp_path, targets, dtype):
    """Linears come back in the dtype of the rest of the model: bf16 for QLoRA's usual base, fp32 where the
    run kept the unquantized weights in fp32 (--dtype float32, e.g. a CPU without bf16 matmuls)."""
    folder, model = saved_llama
    qm, _ = load_quantized(folder, "nf4", dtype)
    add_lora(qm, LoraConfig(r=4, target_modules=targets))
    randomize_lora(qm, std=0.05)
    save_adapter(qm, tmp_path / "adapter")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = qm(ids).logits.float()
        merged = merge_and_unload(qm)
        after = merged(ids).logits.float()
    assert not list(lora_layers(merged))
    linears = [m for m in merged.modules() if isinstance(m, nn.Linear)]
    assert all(type(m) is nn.Linear and m.weight.dtype == dtype for m in linears)
    assert {p.dtype for p in merged.parameters()} == {dtype}
    assert set(merged.state_dict()) == set(model.state_dict())
    assert (after - before).abs().max().item() < 0.05 * before.abs().max().item()
