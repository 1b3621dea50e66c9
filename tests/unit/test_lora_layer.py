"""The LoRA layer's math: no-op init, the fused autograd function against plain autograd, scaling, strength."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.lora.function import LoraLinearFunction
from lorakit.lora.layer import LoraConv2d, LoraEmbedding, LoraLinear, init_adapter, wrap


def test_fused_function_matches_autograd_reference():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.double, requires_grad=True)
    w, bias = torch.randn(12, 16, dtype=torch.double), torch.randn(12, dtype=torch.double)
    a = torch.randn(4, 16, dtype=torch.double, requires_grad=True)
    b = torch.randn(12, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: LoraLinearFunction.apply(x, w, bias, a, b, 0.5, 0.0, True),
                                    (x, a, b))
    y = LoraLinearFunction.apply(x, w, bias, a, b, 0.5, 0.0, True)
    ref = x @ w.t() + bias + 0.5 * (x @ a.t()) @ b.t()
    torch.testing.assert_close(y, ref)


def test_fused_function_dropout_gradients_use_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 16, dtype=torch.double, requires_grad=True)
    w = torch.randn(8, 16, dtype=torch.double)
    a = torch.randn(4, 16, dtype=torch.double, requires_grad=True)
    b = torch.randn(8, 4, dtype=torch.double, requires_grad=True)
    torch.manual_seed(3)
    y = LoraLinearFunction.apply(x, w, None, a, b, 2.0, 0.3, True)
    # the same mask drawn again: bernoulli on a bool tensor of x's shape with the same seed
    torch.manual_seed(3)
    mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(0.7)
    xd = x * mask / 0.7
    ref = x @ w.t() + 2.0 * (xd @ a.t()) @ b.t()
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b), g)
    want = torch.autograd.grad(ref, (x, a, b), g)
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("base", [nn.Linear(16, 12), Conv1D(12, 16), nn.Embedding(20, 12),
                                  nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 1)])
def test_fresh_adapter_is_a_no_op_and_delta_matches_forward(base):
    torch.manual_seed(0)
    layer = wrap(base)
    layer.add_adapter("default", r=4, scaling=2.0, dropout=0.0)
    init_adapter(layer, "default", "kaiming")
    if isinstance(layer, LoraEmbedding):
        x = torch.randint(0, 20, (2, 5))
    elif isinstance(layer, LoraConv2d):
        x = torch.randn(2, 3, 8, 8)
    else:
        x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0 (A = 0 for embeddings): exact
    with torch.no_grad():
        for p in layer.adapters["default"].parameters():
            p.normal_()
    merged = copy.deepcopy(base)
    with torch.no_grad():
        merged.weight += layer.delta_weight("default").to(merged.weight.dtype)
    torch.testing.assert_close(layer(x), merged(x), rtol=1e-4, atol=1e-4)


def test_scaling_and_rslora():
    assert lorakit.LoraConfig(r=16, alpha=32).scaling == 2.0
    assert lorakit.LoraConfig(r=16, alpha=32, rslora=True).scaling == 8.0


def test_strength_zero_equals_base_and_half_halves_the_update():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoraLinear(base)
    layer.add_adapter("default", 4, 1.0, 0.0)
    nn.init.normal_(layer.adapters["default"].lora_A)
    nn.init.normal_(layer.adapters["default"].lora_B)
    x = torch.randn(3, 16)
    full = layer(x) - base(x)
    layer.adapters["default"].scale = 0.5
    torch.testing.assert_close(layer(x) - base(x), 0.5 * full)
    layer.adapters["default"].scale = 0.0
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_frozen_weight_cast_once_under_autocast():
    torch.manual_seed(0)
    base = nn.Linear(32, 32)
    layer = LoraLinear(base)
    layer.add_adapter("default", 4, 1.0, 0.0)
    x = torch.randn(4, 32)
    base.weight.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1 = layer(x)
        cached = layer._cast[1]
        layer(x)
        assert layer._cast[1] is cached  # not re-cast on the second step
    assert y1.dtype == torch.bfloat16
    with torch.no_grad():
        base.weight.add_(1.0)  # an in-place change bumps the version: the cache must refresh
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert layer._cast[1] is not cached


def test_pissa_moves_principal_components_out_of_w():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    original = base.weight.detach().clone()
    x = torch.randn(5, 16)
    before = base(x)
    layer = LoraLinear(base)
    layer.add_adapter("default", 4, 2.0, 0.0)
    init_adapter(layer, "default", "pissa")
    torch.testing.assert_close(layer(x), before, rtol=1e-4, atol=1e-4)  # W_res + s·B·A == W
    assert not torch.allclose(base.weight, original)
    s_full = torch.linalg.svdvals(original)
    s_res = torch.linalg.svdvals(base.weight.detach())
    torch.testing.assert_close(s_res[:8], s_full[4:], rtol=1e-4, atol=1e-4)  # top-4 moved into A, B
