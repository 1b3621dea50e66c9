"""``--compile``: the decoder layers through torch.compile (Inductor), kernels cached across runs.

For Llama-structured layers (the ones ``train/fastpath.py`` fuses by hand) the compiled function is
``plain_layer`` below: the same layer written in plain differentiable torch ops, LoRA included, so that
AOTAutograd derives its backward and Inductor fuses what surrounds the matmuls — RMSNorm with its
casts, RoPE with the LoRA term added to q and k, mask + softmax, SiLU·up, the residual adds — forward and
backward, into generated C++ (CPU) or Triton (CUDA) kernels; what backward keeps is chosen by Inductor's
partitioner (cheap pointwise results are recomputed, not stored). The matmuls stay oneDNN/cuBLAS calls.
Other architectures compile transformers' own layer with lorakit's LoRA autograd function inside.

One compile serves every layer (same code, the weights are inputs); a second sequence length makes
dynamo recompile once with a dynamic length. The first run pays for it (on 2 CPU cores ~25 s for a Llama
layer's forward and backward); the kernels are cached in ``$LORAKIT_CACHE/inductor`` and reused by later
runs. ``tests/unit/test_fused_step.py`` checks the layer is one graph (no breaks) and its numerics.
"""

from __future__ import annotations

import os
import sys
import time
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.device import cache_root
from lorakit.errors import LorakitError
from lorakit.lora.function import compute_dtype
from lorakit.lora.fused import Projection, fusable, projection
from lorakit.train import fastpath
from lorakit.train.kernels import additive_mask, math_attention_fits


def compile_layers(model: nn.Module, backend: str = "inductor", fullgraph: bool = False) -> str:
    """Compile ``model``'s decoder layers in place (lazily: at their first call); returns what runs.
    ``backend="eager", fullgraph=True``: graph capture alone, raising at a graph break (the tests)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    if backend == "inductor" and next(model.parameters()).device.type == "cpu":
        _check_cxx()
    llama, _ = fastpath.llama_layers(model)
    layers = llama or fastpath.decoder_layers(model)
    if not layers:
        return "transformers' own layers (--compile: no decoder layers found)"
    where = f"kernels cached in {os.environ['TORCHINDUCTOR_CACHE_DIR']}"
    if llama:
        for layer in layers:  # checked uncompiled: the same math, without paying for an inference graph
            layer.forward = types.MethodType(_plain_forward(plain_layer, steps_only=False), layer)
        if fastpath._same_logits(model):
            compiled = _reporting(torch.compile(plain_layer, backend=backend, fullgraph=fullgraph))
            for layer in layers:
                layer.forward = types.MethodType(_plain_forward(compiled), layer)
            return f"torch.compile'd fused decoder layers ({len(layers)} × {type(layers[0]).__name__}; {where})"
        fastpath.disable(model)
    for layer in layers:
        layer.compile(backend=backend, fullgraph=fullgraph, dynamic=True)
    return f"torch.compile'd decoder layers ({len(layers)} × {type(layers[0]).__name__}; {where})"


def _check_cxx() -> None:
    """Inductor writes C++ on CPU: without a working compiler the first step would fail deep inside it."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:  # InvalidCxxCompiler, or whatever probing the compiler raised
        raise LorakitError(f"--compile: no working C++ compiler for torch.compile on CPU ({e}); install g++ "
                           "(or set CXX to one), or train without --compile") from None


def _reporting(fn):
    """``fn`` that says on stderr when a call compiled a graph, and how long that call took: the compile
    time a run pays (once per run with a warm kernel cache, more with a cold one)."""
    from torch._dynamo.utils import counters

    def call(x: Tensor, *args):
        graphs = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        y = fn(x, *args)
        if counters["stats"]["unique_graphs"] != graphs:
            print(f"compile: decoder layer graph for input {tuple(x.shape)} ready in {time.perf_counter() - start:.1f} s "
                  f"(forward and backward; kernels in {os.environ.get('TORCHINDUCTOR_CACHE_DIR')})", file=sys.stderr)
        return y

    return call


def _plain_forward(fn, steps_only: bool = True):
    """A decoder layer's ``forward`` that runs ``fn`` (``plain_layer`` or its compiled self) where it can:
    training steps (grad on, no KV cache) whose projections are plain or single-adapter LoRA linears;
    anything else goes to the eager fast path (``fastpath.fused_layer_forward``), which routes further.
    ``steps_only=False`` takes inference calls too (the logits check)."""

    def forward(layer: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache=None, use_cache: bool | None = False,
                position_embeddings: tuple[Tensor, Tensor] | None = None, **kwargs) -> Tensor:
        attn, mlp = layer.self_attn, layer.mlp
        modules = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        # evaluation and generation (no grad) stay eager: an inference graph per shape is not worth compiling
        inference = not (layer.training and torch.is_grad_enabled())
        if (steps_only and inference) or cache is not None or position_embeddings is None or \
                layer.gradient_checkpointing or not fusable(modules, layer.training):
            return fastpath.fused_layer_forward(layer, hidden_states, attention_mask, position_ids, cache,
                                                use_cache, position_embeddings, **kwargs)
        dtype = compute_dtype(hidden_states)
        b, s, _ = hidden_states.shape
        heads = modules[0].weight.shape[0] // attn.head_dim
        # short sequences on CPU: attention as matmuls and a softmax Inductor fuses with the mask; else SDPA
        mask = additive_mask(attention_mask, s, dtype, hidden_states.device) \
            if math_attention_fits(b, heads, s, hidden_states.device) else attention_mask
        cos, sin = position_embeddings
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        return fn(hidden_states, mask, cos, sin, norms[0].weight, norms[1].weight, fastpath._eps(norms[0]),
                  attn.head_dim, attn.scaling, *(projection(m, dtype) for m in modules))

    return forward


def plain_layer(x: Tensor, mask: Tensor | None, cos: Tensor, sin: Tensor, norm1: Tensor, norm2: Tensor, eps: float,
                head_dim: int, scaling: float, q: Projection, k: Projection, v: Projection, o: Projection,
                gate: Projection, up: Projection, down: Projection) -> Tensor:
    """A Llama decoder layer in plain torch ops, as transformers computes it (eager attention, bf16 rounding
    where it rounds): x (B, S, H); mask additive (B|1, 1, S, S) for attention as matmuls, or transformers'
    boolean mask (B, 1, S, S) / None (causal) for SDPA; cos/sin (B|1, S, d) -> (B, S, H)."""
    b, s, _ = x.shape
    dtype = q[0].dtype
    h = _rms_norm(x, norm1, eps)
    qs, ks, vs = _linears(h, [q, k, v], dtype)  # (B, S, heads·d), (B, S, kv_heads·d) ×2
    c, sn = cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)  # (B|1, 1, S, d)
    qs = _rope(qs.view(b, s, -1, head_dim).transpose(1, 2), c, sn)  # (B, heads, S, d)
    ks = _rope(ks.view(b, s, -1, head_dim).transpose(1, 2), c, sn)  # (B, kv_heads, S, d)
    vs = vs.view(b, s, -1, head_dim).transpose(1, 2)
    groups = qs.shape[1] // ks.shape[1]
    if groups > 1:  # grouped-query attention: each k/v head serves `groups` query heads
        ks, vs = ks.repeat_interleave(groups, 1), vs.repeat_interleave(groups, 1)
    if mask is None or mask.dtype == torch.bool:  # SDPA's kernels: no (S, S) scores in memory
        attn = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scaling)
    else:
        scores = (qs @ ks.transpose(-1, -2)) * scaling + mask  # (B, heads, S, S)
        attn = torch.softmax(scores, -1, dtype=torch.float32).to(dtype) @ vs  # (B, heads, S, d)
    attn = attn.transpose(1, 2).reshape(b, s, -1)  # (B, S, heads·d)
    x = x + _linears(attn, [o], dtype)[0]
    h = _rms_norm(x, norm2, eps)
    g, u = _linears(h, [gate, up], dtype)  # (B, S, I) ×2
    return x + _linears(F.silu(g) * u, [down], dtype)[0]


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def _linears(x: Tensor, projections: list[Projection], dtype: torch.dtype) -> list[Tensor]:
    """y_i = x·W_iᵀ + b_i + s_i·(x·A_iᵀ)·B_iᵀ for projections sharing the input x (..., in): one x·[A_1; …]ᵀ
    for all their adapters (a skinny matmul costs about what reading x costs, so once, not per projection)."""
    x = x.to(dtype)
    lora = [p for p in projections if p[2] is not None]
    xa = torch.split(x @ torch.cat([p[2] for p in lora]).to(dtype).t(), [p[2].shape[0] for p in lora], -1) \
        if lora else ()
    outs, i = [], 0
    for w, bias, a, bm, scale in projections:
        y = F.linear(x, w, None if bias is None else bias.to(dtype))
        if a is not None:
            y = y + (xa[i] @ bm.to(dtype).t()) * scale
            i += 1
        outs.append(y)
    return outs
