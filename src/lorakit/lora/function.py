"""The fused LoRA linear: y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ as one autograd node.

Why a custom autograd function: the stock composition (linear, dropout, linear, linear, mul, add) records
six nodes and keeps their inputs alive. For a frozen W, backward needs only
    dx = dy·W + s·((dy·B)·A) ⊙ mask        dA = s·(dy·B)ᵀ·drop(x)        dB = s·dyᵀ·(drop(x)·Aᵀ)
so we save x (N, in), the dropout mask as bool (N, in) when dropout is on, and xa = drop(x)·Aᵀ (N, r),
and fold the update into the base matmul's output with one in-place addmm.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on for x's device, else x's own."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scaling: float, dropout: float, training: bool) -> Tensor:
        # x (..., in), weight (out, in) in the compute dtype already, lora_a (r, in), lora_b (out, r).
        dtype = weight.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)  # (N, in)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        mask = None
        if dropout > 0.0 and training:
            mask = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - dropout)
            xd = x2 * mask / (1.0 - dropout)
        else:
            xd = x2
        xa = xd @ a.t()  # (N, r)
        if bias is None:
            y = x2 @ weight.t()  # (N, out)
        else:
            y = torch.addmm(bias.to(dtype), x2, weight.t())
        y.addmm_(xa, b.t(), alpha=scaling)  # += s·(x·Aᵀ)·Bᵀ, no temporary (N, out)
        ctx.save_for_backward(x2, mask, xa, weight, a, b)
        ctx.scaling, ctx.dropout, ctx.shape = scaling, dropout, shape
        ctx.dtypes = (x.dtype, lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, mask, xa, weight, a, b = ctx.saved_tensors
        s = ctx.scaling
        x_dtype, a_dtype, b_dtype, bias_dtype = ctx.dtypes
        dy2 = dy.reshape(-1, dy.shape[-1]).to(weight.dtype)  # (N, out)
        dyb = dy2 @ b  # (N, r)
        xd = x2 if mask is None else x2 * mask / (1.0 - ctx.dropout)
        dx = dw = dbias = None
        da = (dyb.t() @ xd).mul_(s).to(a_dtype)  # (r, in)
        db = (dy2.t() @ xa).mul_(s).to(b_dtype)  # (out, r)
        if ctx.needs_input_grad[0]:
            if mask is None:
                dx = (dy2 @ weight).addmm_(dyb, a, alpha=s)  # (N, in), one fused add
            else:
                dx = (dy2 @ weight).add_((dyb @ a) * mask, alpha=s / (1.0 - ctx.dropout))
            dx = dx.view(ctx.shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            dw = dy2.t() @ x2
        if ctx.needs_input_grad[2]:
            dbias = dy2.sum(0).to(bias_dtype)
        return dx, dw, dbias, da, db, None, None, None
