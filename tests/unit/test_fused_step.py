"""The training step's fused paths compute what the reference computes, forward and gradients.

fp32: equal to rounding (1e-5 relative). bf16: each fused path's error against the fp32 result is within
a small factor of the reference's own bf16 error (the two round at different places, neither is "exact").
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

import lorakit
from lorakit.lora.fused import project
from lorakit.lora.layer import LoraLinear
from lorakit.train import compile as compile_module
from lorakit.train import fastpath, fused_loss, precision
from lorakit.train.compile import compile_layers
from lorakit.train.kernels import additive_mask, attention, rms_norm, rope
from tests.conftest import randomize_lora, rel_err, tiny_llama

BF16 = torch.bfloat16
fused_layer = fastpath._layer


def close_as_reference(fused: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor, factor: float = 3.0):
    """bf16: the fused result is no further from the fp32 truth than ``factor`` × the reference's error."""
    fused_err, ref_err = rel_err(fused.float(), truth.float()), rel_err(reference.float(), truth.float())
    assert fused_err <= factor * ref_err + 1e-3, (fused_err, ref_err)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_chunked_cross_entropy_equals_the_reference(dtype, monkeypatch):
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 64 * 500)  # several chunks of 64 rows
    g = torch.Generator().manual_seed(0)
    hidden32 = torch.randn(300, 48, generator=g)
    weight32 = torch.randn(500, 48, generator=g) * 0.3
    targets = torch.randint(0, 500, (300,), generator=g)
    targets[::7] = fused_loss.IGNORE_INDEX

    def run(fn, dt):
        h = hidden32.to(dt).detach().requires_grad_()
        w = weight32.to(dt).detach().requires_grad_()  # trainable head (--method full): its gradient too
        loss = fn(h, w)
        (loss * 0.37).backward()
        return loss.float().detach(), h.grad.float(), w.grad.float()

    def reference(h, w):
        return F.cross_entropy((h @ w.t()).float(), targets, reduction="sum")

    def fused(h, w):
        return fused_loss.linear_cross_entropy(h, w, targets)

    truth = run(reference, torch.float32)
    ours, ref = run(fused, dtype), run(reference, dtype)
    for a, b, t in zip(ours, ref, truth, strict=True):
        if dtype == torch.float32:
            assert rel_err(a, b) < 1e-5
        else:
            close_as_reference(a, b, t)
    loss, correct = fused_loss.linear_cross_entropy_eval(hidden32, weight32, targets)
    keep = targets != fused_loss.IGNORE_INDEX
    assert loss == pytest.approx(float(reference(hidden32, weight32)), rel=1e-5)
    assert correct == int(((hidden32 @ weight32.t()).argmax(1) == targets)[keep].sum())


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_kernels_equal_transformers_modules(dtype):
    g = torch.Generator().manual_seed(0)
    b, s, heads, kv_heads, d = 2, 12, 4, 2, 16
    hidden = heads * d
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, 9:] = False  # a right-padded row
    bool_mask = torch.ones(s, s, dtype=torch.bool).tril()[None, None] & mask[:, None, None, :]  # (B, 1, S, S)
    inputs32 = {"x": torch.randn(b, s, hidden, generator=g), "w": 1 + 0.1 * torch.randn(hidden, generator=g),
                "q": torch.randn(b, s, heads * d, generator=g), "k": torch.randn(b, s, kv_heads * d, generator=g),
                "v": torch.randn(b, s, kv_heads * d, generator=g)}
    angles = torch.arange(s)[:, None] * (10000 ** (-torch.arange(0, d, 2) / d))[None]
    cos, sin = torch.cat([angles, angles], -1).cos()[None], torch.cat([angles, angles], -1).sin()[None]

    def reference(t):
        norm = SimpleNamespace(weight=t["w"], variance_epsilon=1e-6)  # what LlamaRMSNorm.forward reads
        q = t["q"].view(b, s, heads, d).transpose(1, 2)
        k = t["k"].view(b, s, kv_heads, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype))
        module = torch.nn.Module()
        module.num_key_value_groups, module.training = heads // kv_heads, False
        add = torch.zeros(bool_mask.shape, dtype=q.dtype).masked_fill_(~bool_mask, torch.finfo(q.dtype).min)
        out, _ = eager_attention_forward(module, q, k, t["v"].view(b, s, kv_heads, d).transpose(1, 2), add, d**-0.5)
        return LlamaRMSNorm.forward(norm, t["x"]), q, k, out.reshape(b, s, -1)

    def fused(t):
        q, k = rope(t["q"], cos, sin, heads, d**-0.5), rope(t["k"], cos, sin, kv_heads)
        v = t["v"].view(b, s, kv_heads, d).transpose(1, 2)
        return rms_norm(t["x"], t["w"], 1e-6), q * d**0.5, k, attention(q, k, v, bool_mask)

    def run(fn, dt):
        t = {n: v.to(dt).detach().requires_grad_() for n, v in inputs32.items()}
        outs = fn(t)
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
        sum(((o.float() * wt)[..., :].sum() if o.dim() != 4 else (o.float() * wt).sum())
            for o, wt in zip(outs, weights, strict=True)).backward()
        rows = mask[:, :, None]  # padded query rows attend to nothing useful in either: compare real rows
        return [outs[0], outs[1], outs[2], outs[3] * rows] + [t[n].grad for n in inputs32]

    truth, ref, ours = run(reference, torch.float32), run(reference, dtype), run(fused, dtype)
    for a, r, t in zip(ours, ref, truth, strict=True):
        if dtype == torch.float32:
            assert rel_err(a.float(), r.float()) < 1e-5
        else:
            close_as_reference(a, r, t)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_one_projection_node_equals_separate_lora_layers(dtype):
    torch.manual_seed(0)
    base = [torch.nn.Linear(24, 40, bias=True), torch.nn.Linear(24, 16, bias=False), torch.nn.Linear(24, 8)]
    layers = [LoraLinear(base[0]), LoraLinear(base[1]), base[2]]  # the last: no adapter, trainable W
    for layer, r in zip(layers[:2], (4, 6), strict=True):
        layer.add_adapter("default", r, 2.0 / r, 0.0)
        torch.nn.init.normal_(layer.adapters["default"].lora_A, std=0.3)
        torch.nn.init.normal_(layer.adapters["default"].lora_B, std=0.3)
        for p in (layer.weight, layer.bias):  # a frozen base, as add_lora leaves it
            if p is not None:
                p.requires_grad_(False)
    x32 = torch.randn(3, 5, 24)

    def run(fused: bool, dt: torch.dtype):
        x = x32.clone().requires_grad_()
        with torch.autocast("cpu", dtype=BF16, enabled=dt == BF16):
            outs = project(x, layers, dt) if fused else [m(x) for m in layers]
        sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        params = [p for m in layers for p in m.parameters() if p.requires_grad]
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return [*outs, x.grad, *grads]

    truth, ref, ours = run(False, torch.float32), run(False, dtype), run(True, dtype)
    assert len(ours) == 3 + 1 + 6  # 3 outputs, dx, A and B of two adapters, W and b of the plain linear
    for a, r, t in zip(ours, ref, truth, strict=True):
        if dtype == torch.float32:
            assert rel_err(a.float(), r.float()) < 1e-5
        else:
            close_as_reference(a, r, t)


def logits_and_grads(model, ids, mask, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=BF16, enabled=bf16):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    (logits[mask.bool()] ** 2).mean().backward()
    return [logits[mask.bool()].detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]


def assert_same_as_transformers(model, fast) -> None:
    """``fast`` (a copy of ``model`` on a fast path) gives ``model``'s logits and gradients on a padded batch:
    equal to rounding in fp32, as close to the fp32 result as the reference in bf16."""
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 15:], mask[2, 6:] = 0, 0
    truth = logits_and_grads(model, ids, mask, bf16=False)
    for bf16 in (False, True):
        ref, ours = logits_and_grads(model, ids, mask, bf16), logits_and_grads(fast, ids, mask, bf16)
        assert len(ours) == len(truth)
        for a, r, t in zip(ours, ref, truth, strict=True):
            if not bf16:
                assert rel_err(a, r) < 1e-5
            else:
                close_as_reference(a, r, t)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fused_decoder_layers_equal_transformers_layers(method, monkeypatch):
    """The eager fast path (train/fastpath.py)."""
    model = tiny_llama(hidden=64, layers=2)
    if method == "lora":
        lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8))
        randomize_lora(model)
    model.config.use_cache = False
    model.train()
    fused = copy.deepcopy(model)
    assert fastpath.enable(fused).startswith("fused decoder layers (2 × LlamaDecoderLayer)")
    # the fused layer must be what runs: it hands back to transformers' own forward when it meets a KV
    # cache or a signature it does not know, which would make this comparison trivially equal
    ran = []
    monkeypatch.setattr(fastpath, "_layer", lambda *a, **k: ran.append(1) or fused_layer(*a, **k))
    assert_same_as_transformers(model, fused)
    assert len(ran) == 2 * 2  # two layers, two passes


def test_fast_path_declines_an_architecture_it_does_not_reproduce():
    """Qwen3 has the Llama layout plus RMS norms on q and k: the logits check catches what the fused layer
    leaves out, and the model keeps transformers' layers."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with torch.no_grad():  # norms that are not the identity, so leaving them out shows
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
    note = fastpath.enable(model)
    assert "did not reproduce" in note
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


def test_fast_paths_decline_sliding_window_attention():
    """Mistral's sliding window (here 16 positions) is not the full causal attention the fused and compiled
    layers compute: both leave such a model to transformers' own layers (the short logits check alone would
    not see it)."""
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=16, max_position_embeddings=128))
    assert fastpath.enable(model) == "transformers' own layers (sliding-window attention)"
    assert compile_layers(model, backend="eager").startswith("torch.compile'd decoder layers (2 × MistralDecoderLayer")
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


def test_fused_head_only_where_logits_are_the_plain_head():
    model = tiny_llama(tie=True)
    assert fused_loss.fused_head(model) is model.lm_head
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["lm_head"]))
    assert fused_loss.fused_head(model) is None  # a LoRA-wrapped head keeps the reference loss


@pytest.mark.parametrize("method,attention", [("lora", "math"), ("full", "math"), ("lora", "sdpa")])
def test_compiled_layers_are_one_graph_and_equal_transformers_layers(method, attention, monkeypatch):
    """--compile on a Llama: train/compile.py's plain layer, captured by dynamo as one graph per call
    (fullgraph=True raises at the first break; the eager backend: capture is what decides breaks, Inductor's
    code generation is not run here), forward and gradients equal to transformers' layers, padding included;
    attention as matmuls (short sequences on CPU) or through SDPA (long ones, CUDA)."""
    monkeypatch.setattr(compile_module, "math_attention_fits", lambda *args: attention == "math")
    model = tiny_llama(hidden=64, layers=2)
    if method == "lora":
        lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                               "o_proj", "gate_proj", "down_proj"]))
        randomize_lora(model)  # up_proj left plain: a group with and without an adapter
    model.config.use_cache = False
    model.train()
    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    assert compile_layers(compiled, backend="eager", fullgraph=True).startswith("torch.compile'd fused decoder")
    assert_same_as_transformers(model, compiled)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]


def test_compiled_decoder_layer_has_no_graph_breaks():
    """--compile on a layer the plain path does not take: dynamo captures transformers' layer with the LoRA
    autograd function inside as one graph (fullgraph=True raises at the first break)."""
    model = tiny_llama(hidden=64)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8))
    model.config.use_cache = False
    model.train()
    layer = model.model.layers[0]
    x = torch.randn(2, 16, 64, requires_grad=True)
    position = model.model.rotary_emb(x, torch.arange(16)[None])
    compiled = torch.compile(layer, backend="eager", fullgraph=True, dynamic=True)
    with torch.autocast("cpu", dtype=BF16):  # fp32 weights cast for bf16 matmuls inside the graph
        y = compiled(x, attention_mask=None, position_embeddings=position)
    y.float().sum().backward()
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)


def test_precision_probe_is_cached_and_leaves_no_trace(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    model = tiny_llama(hidden=64)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4))
    model.train()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    calls = []

    def probe(bf16: bool) -> float:
        calls.append(bf16)
        torch.rand(1)  # draws from the global generator, as dropout would
        with torch.autocast("cpu", dtype=BF16, enabled=bf16):
            seconds = precision.timed(lambda: model(input_ids=ids, labels=ids).loss.backward())
        model.zero_grad(set_to_none=True)
        return seconds

    state = torch.get_rng_state()
    key = {"model": "tiny", "batch": 4}
    bf16, why = precision.resolve("auto", torch.device("cpu"), torch.float32, key, probe)
    assert torch.equal(torch.get_rng_state(), state)
    if not precision.bf16_native("cpu"):  # AVX2: fp32 by the hardware flag, nothing measured
        assert (bf16, calls) == (False, [])
        return
    assert len(calls) == 12 and "measured" in why  # a warm-up and 5 rounds of each
    assert (tmp_path / "precision.json").is_file()
    again, why_again = precision.resolve("auto", torch.device("cpu"), torch.float32, key, probe)
    assert (again, len(calls)) == (bf16, 12) and "cached" in why_again
    assert precision.resolve("fp32", torch.device("cpu"), torch.float32, key, probe)[0] is False


def test_lorakit_sets_passive_omp_wait_policy_before_torch_loads(tmp_path):
    """GNU OpenMP reads OMP_WAIT_POLICY once, when torch loads it: ``import lorakit`` sets PASSIVE first
    (``os.environ.setdefault``: a user's own value is kept). --compile's kernel cache is lorakit's, though
    importing the training stack would set torch's own default first."""
    code = ("import os, sys; assert 'torch' not in sys.modules; import lorakit; import lorakit.train.text; "
            "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules, os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "TORCHINDUCTOR_CACHE_DIR")}
    env["LORAKIT_CACHE"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "True", str(tmp_path / "inductor")]


def test_causal_mask_is_cached_per_length():
    a = additive_mask(None, 8, BF16, torch.device("cpu"))
    assert a is additive_mask(None, 8, BF16, torch.device("cpu"))
    assert a.shape == (1, 1, 8, 8) and a[0, 0, 0, 1] == torch.finfo(BF16).min and a[0, 0, 1, 0] == 0
