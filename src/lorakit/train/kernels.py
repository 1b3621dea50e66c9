"""Fused pieces of a Llama-family decoder layer for CPU training, each one autograd node over plain torch ops.

Why: on CPUs with native bf16 the GEMMs are fast enough that the passes over memory around them (norms,
RoPE, softmax, casts) and the fresh tensors each pass allocates take a large share of a step. Each
function below computes what transformers' modules compute, in fewer passes, keeping fewer and smaller
tensors for backward (bf16 where the reference kept fp32). ``tests/unit/test_fused_step.py`` checks every one
against the reference, forward and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class RMSNorm(torch.autograd.Function):
    """y = w · round(x · rsqrt(mean(x²) + eps)) with the mean in fp32 (LlamaRMSNorm; Zhang & Sennrich 2019).

    Reference passes: upcast, square, mean, rsqrt-mul, downcast, weight-mul, each a new (N, H) tensor, and
    autograd keeps two fp32 copies. Here: one fp32 reduction, one multiply into x's dtype, the weight
    multiply; backward keeps x and the (N, 1) inverse RMS."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        # x (..., H), weight (H,)
        inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)  # (..., 1)
        inv = inv.pow_(2).div_(x.shape[-1]).add_(eps).rsqrt_()
        normed = torch.mul(x, inv, out=torch.empty_like(x))  # (..., H) in x's dtype: one pass, rounded as the reference
        ctx.save_for_backward(x, inv, weight)
        return weight * normed  # type promotion as the reference: fp32 when the weight is fp32

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, inv, weight = ctx.saved_tensors
        xhat = x.float() * inv  # (..., H) fp32
        gw = grad.float() * weight.float()  # (..., H) fp32
        # d/dx of x·inv(x): inv·(gw − x̂·mean(gw·x̂))
        dot = (gw * xhat).mean(-1, keepdim=True)
        dx = gw.sub_(xhat.mul_(dot)).mul_(inv).to(x.dtype)
        dw = None
        if ctx.needs_input_grad[1]:
            normed = torch.mul(x, inv, out=torch.empty_like(x)).float()
            dw = (grad.float() * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return RMSNorm.apply(x, weight, eps)


class Rope(torch.autograd.Function):
    """Rotary position embedding (Su et al. 2021) in transformers' half-split layout, x·cos + rotate_half(x)·sin,
    written straight into the (B, heads, S, d) layout attention wants, from the (B, S, heads·d) projection
    output: the transpose copy and the rotation are one pass. ``scale`` multiplies the result (the query's
    1/sqrt(d), so attention needs no extra pass over its scores)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, heads: int, scale: float) -> Tensor:
        # x (B, S, heads·d); cos, sin (B or 1, S, d) -> (B, heads, S, d)
        b, s, _ = x.shape
        d = cos.shape[-1]
        h = d // 2
        xs = x.view(b, s, heads, d).transpose(1, 2)  # (B, heads, S, d), strided
        c = (cos * scale).to(x.dtype).unsqueeze(1)  # (B|1, 1, S, d)
        sn = (sin * scale).to(x.dtype).unsqueeze(1)
        out = torch.empty(b, heads, s, d, dtype=x.dtype, device=x.device)
        x1, x2 = xs[..., :h], xs[..., h:]
        torch.mul(x1, c[..., :h], out=out[..., :h])
        out[..., :h].addcmul_(x2, sn[..., :h], value=-1)  # x1·cos − x2·sin
        torch.mul(x2, c[..., h:], out=out[..., h:])
        out[..., h:].addcmul_(x1, sn[..., h:])  # x2·cos + x1·sin
        ctx.save_for_backward(c, sn)
        ctx.shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        c, sn = ctx.saved_tensors
        b, s, _ = ctx.shape
        h = c.shape[-1] // 2
        g1, g2 = grad[..., :h], grad[..., h:]
        dx = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
        dxs = dx.view(b, s, -1, 2 * h).transpose(1, 2)  # (B, heads, S, d) view of (B, S, heads·d)
        torch.mul(g1, c[..., :h], out=dxs[..., :h])
        dxs[..., :h].addcmul_(g2, sn[..., h:])  # dx1 = g1·cos + g2·sin
        torch.mul(g2, c[..., h:], out=dxs[..., h:])
        dxs[..., h:].addcmul_(g1, sn[..., :h], value=-1)  # dx2 = g2·cos − g1·sin
        return dx, None, None, None, None


def rope(x: Tensor, cos: Tensor, sin: Tensor, heads: int, scale: float = 1.0) -> Tensor:
    return Rope.apply(x, cos, sin, heads, scale)


class Attention(torch.autograd.Function):
    """softmax(q·kᵀ + mask)·v for short sequences, with q already scaled; grouped-query heads by reshaping q
    (no repeated k, v). Scores and probabilities stay in the compute dtype (the softmax itself accumulates
    in fp32), probabilities are what backward keeps: B·heads·S² values. For the sequence lengths it is used
    at (``math_attention_fits``) this beats the fused SDPA kernel on CPU (measured on the benchmark's
    shapes, 4×8 heads×256×64 bf16: 11–14 ms against 30 ms forward+backward), whose blocking targets long
    sequences."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        # q (B, H, S, d) contiguous; k, v (B, Hkv, S, d); mask additive (B|1, 1, S, S) in q's dtype -> (B, S, H·d)
        b, heads, s, d = q.shape
        kv_heads = k.shape[1]
        g = heads // kv_heads
        qg = q.view(b, kv_heads, g * s, d)  # heads sharing a k/v head stacked along the rows
        scores = qg @ k.transpose(-1, -2)  # (B, Hkv, g·S, S)
        scores.view(b, kv_heads, g, s, s).add_(mask.unsqueeze(2))
        probs = torch.softmax(scores, -1)  # fp32 accumulation inside, rounded to the compute dtype
        out = probs @ v  # (B, Hkv, g·S, d)
        ctx.save_for_backward(qg, k, v, probs)
        return out.view(b, heads, s, d).transpose(1, 2).reshape(b, s, heads * d)

    @staticmethod
    def backward(ctx, grad: Tensor):
        qg, k, v, probs = ctx.saved_tensors
        b, kv_heads, gs, d = qg.shape
        s = k.shape[2]
        heads = gs // s * kv_heads
        do = grad.reshape(b, s, heads, d).transpose(1, 2).reshape(b, kv_heads, gs, d)
        dv = probs.transpose(-1, -2) @ do  # (B, Hkv, S, d), summed over the group's heads
        dp = do @ v.transpose(-1, -2)  # (B, Hkv, g·S, S)
        ds = torch._softmax_backward_data(dp, probs, -1, probs.dtype)
        dq = (ds @ k).view(b, heads, s, d)
        dk = ds.transpose(-1, -2) @ qg
        return dq, dk, dv, None


def math_attention_fits(batch: int, heads: int, seq: int, device: torch.device) -> bool:
    """Where ``Attention`` is the better choice: on CPU, while the probabilities it keeps for backward
    (batch·heads·seq² values per layer) stay under 16M (32 MiB in bf16); SDPA's fused kernels elsewhere."""
    return device.type == "cpu" and batch * heads * seq * seq <= 1 << 24


_CAUSAL: dict[tuple, Tensor] = {}


def additive_mask(mask: Tensor | None, seq: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """transformers' boolean attention mask (B, 1, S, S), True = attend, or None for plain causal, as the
    additive (B|1, 1, S, S) mask ``Attention`` takes: 0 where attended, the dtype's minimum elsewhere (a
    fully masked padding row then attends uniformly instead of giving NaN, as transformers' eager path)."""
    low = torch.finfo(dtype).min
    if mask is None:
        key = (seq, dtype, device)
        cached = _CAUSAL.get(key)  # read once: another thread (train/cores.py) may replace the entry
        if cached is None:
            causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
            cached = torch.zeros(1, 1, seq, seq, dtype=dtype, device=device).masked_fill_(~causal, low)
            _CAUSAL.clear()
            _CAUSAL[key] = cached
        return cached
    if mask.dtype != torch.bool:  # already additive (eager-style)
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, low)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Causal self-attention of pre-scaled q (B, H, S, d) over k, v (B, Hkv, S, d) with transformers' mask
    (boolean (B, 1, S, S) or None) -> (B, S, H·d): ``Attention`` where it fits, else SDPA."""
    b, heads, s, _ = q.shape
    if math_attention_fits(b, heads, s, q.device):
        return Attention.apply(q, k, v, additive_mask(mask, s, q.dtype, q.device))
    groups = heads // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and s > 1, scale=1.0)
    return out.transpose(1, 2).reshape(b, s, -1)
