"""Projections that share an input (q/k/v; gate/up) as one autograd node with one x·Aᵀ.

For projections i = 1..k of the same x (N, in), each y_i = x·W_iᵀ + b_i + s_i·(x·A_iᵀ)·B_iᵀ:
    forward    xa = x·[A_1; …; A_k]ᵀ (N, Σr) once, then y_i = x·W_iᵀ, y_i += s_i·xa_i·B_iᵀ (in place)
    backward   g = [s_1·dy_1·B_1, …, s_k·dy_k·B_k] (N, Σr)
               dx = g·[A_1; …; A_k] + Σ dy_i·W_i      (one skinny GEMM, then k GEMMs accumulated in place)
               d[A_1; …; A_k] = gᵀ·x                    (one GEMM for all adapters)
               dB_i = s_i·dy_iᵀ·xa_i,  dW_i = dy_iᵀ·x (only when W_i trains, --method full)
Against k separate LoRA nodes this reads x for the adapters once instead of k times, and autograd does not
add k input gradients (N, in) together pass by pass. A projection without an adapter (not targeted, or
--method full) has r = 0 and only its W. LoRA dropout needs a separate mask per projection, so layers
with dropout in training, several adapters, or a quantized base go through their own modules instead
(``fusable``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.lora.layer import LoraLinear


def fusable(modules: list[nn.Module], training: bool) -> bool:
    """Whether ``modules`` (the projections of one input) can run as one ``project`` call."""
    for m in modules:
        if isinstance(m, LoraLinear):
            run = m.running()
            if m.quantized or m.fan_in_fan_out or len(run) > 1 or (run and training and run[0].dropout > 0):
                return False
        elif type(m) is not nn.Linear:
            return False
    return True


# One projection as plain tensors: (weight (out, in) in the compute dtype, bias | None, lora_A (r, in) | None,
# lora_B (out, r) | None, scaling)
Projection = tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, float]


def projection(m: nn.Module, dtype: torch.dtype) -> Projection:
    """A ``fusable`` projection's parts: its base weight in ``dtype``, bias, and its one running adapter's A,
    B and scaling (None, None, 0.0 without one)."""
    lora = isinstance(m, LoraLinear)
    weight = m.weight_as(dtype) if lora else m.weight.to(dtype)
    run = m.running() if lora else []
    if not run:
        return weight, m.bias, None, None, 0.0
    return weight, m.bias, run[0].lora_A, run[0].lora_B, run[0].scaling * run[0].scale


def project(x: Tensor, modules: list[nn.Module], dtype: torch.dtype) -> list[Tensor]:
    """``[m(x) for m in modules]`` in ``dtype`` through one ``ProjectionGroup`` node; ``fusable(modules)``."""
    weights, biases, lora_a, lora_b, scalings = zip(*(projection(m, dtype) for m in modules), strict=True)
    k = len(modules)
    return list(ProjectionGroup.apply(x, k, list(scalings), *weights, *biases, *lora_a, *lora_b))


class ProjectionGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, k: int, scalings: list[float], *tensors: Tensor | None):
        # x (..., in); tensors: k weights (out_i, in) in the compute dtype, k biases, k lora_A (r_i, in), k lora_B
        weights, biases, lora_a, lora_b = (list(tensors[i * k:(i + 1) * k]) for i in range(4))
        dtype = weights[0].dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)  # (N, in)
        adapters = [i for i in range(k) if lora_a[i] is not None]
        a_cat = torch.cat([lora_a[i].to(dtype) for i in adapters]) if adapters else None  # (Σr, in)
        b = [None if t is None else t.to(dtype) for t in lora_b]
        xa = x2 @ a_cat.t() if adapters else None  # (N, Σr): one pass over x for every adapter
        outs, offsets, start = [], {}, 0
        for i in range(k):
            bias = biases[i]
            y = x2 @ weights[i].t() if bias is None else torch.addmm(bias.to(dtype), x2, weights[i].t())
            if lora_a[i] is not None:
                r = lora_a[i].shape[0]
                offsets[i] = (start, start + r)
                y.addmm_(xa[:, start:start + r], b[i].t(), alpha=scalings[i])  # += s·(x·Aᵀ)·Bᵀ in place
                start += r
            outs.append(y.view(*shape[:-1], y.shape[-1]))
        ctx.save_for_backward(x2, xa, a_cat, *weights, *b)
        ctx.k, ctx.scalings, ctx.offsets, ctx.shape = k, scalings, offsets, shape
        ctx.dtypes = (x.dtype, [_dtype(t) for t in lora_a], [_dtype(t) for t in lora_b],
                      [t is not None for t in biases], [_dtype(t) for t in biases])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        k = ctx.k
        x2, xa, a_cat, *rest = ctx.saved_tensors
        weights, b = rest[:k], rest[k:]
        x_dtype, a_dtypes, b_dtypes, has_bias, bias_dtypes = ctx.dtypes
        dtype = weights[0].dtype
        n = x2.shape[0]
        dys = [g.reshape(n, -1).to(dtype) for g in grads]  # (N, out_i)
        d_a, d_b, d_w, d_bias = [None] * k, [None] * k, [None] * k, [None] * k
        need = ctx.needs_input_grad  # (x, k, scalings, weights…, biases…, lora_a…, lora_b…)
        dx = None
        if a_cat is not None:
            g = torch.cat([(dys[i] @ b[i]).mul_(ctx.scalings[i]) for i in ctx.offsets], 1)  # (N, Σr)
            d_a_cat = g.t() @ x2  # (Σr, in)
            for i, (lo, hi) in ctx.offsets.items():
                d_a[i] = d_a_cat[lo:hi].to(a_dtypes[i])
                d_b[i] = (dys[i].t() @ xa[:, lo:hi]).mul_(ctx.scalings[i]).to(b_dtypes[i])  # (out_i, r_i)
            if need[0]:
                dx = g @ a_cat  # (N, in)
        for i in range(k):
            dy = dys[i]
            if need[0]:
                dx = dy @ weights[i] if dx is None else dx.addmm_(dy, weights[i])  # accumulate in place
            if need[3 + i]:
                d_w[i] = dy.t() @ x2  # (out_i, in)
            if has_bias[i] and need[3 + k + i]:
                d_bias[i] = dy.sum(0).to(bias_dtypes[i])
        if dx is not None:
            dx = dx.view(ctx.shape).to(x_dtype)
        return (dx, None, None, *d_w, *d_bias, *d_a, *d_b)


def _dtype(t: Tensor | None) -> torch.dtype | None:
    return None if t is None else t.dtype
