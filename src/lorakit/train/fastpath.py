"""The training step's fast path: Llama-family decoder layers run through lorakit's fused pieces.

``enable(model)`` replaces, on this model's instances only (other models in the process are untouched),
each decoder layer's ``forward`` with ``fused_layer_forward``: RMSNorm, q/k/v and gate/up as one LoRA
projection node each (``lora/fused.py``: one x·A per shared input), RoPE fused with the head transpose and
the 1/√d scaling, attention (``train/kernels.py``), SiLU·up. It applies where a layer has exactly the
Llama structure (Llama, Mistral without sliding window, Qwen2, SmolLM, …: the numeric check below decides,
not a list of names) and the model is on CPU: on CUDA, liger-kernel's Triton kernels (RMSNorm, RoPE,
SwiGLU) are used where installed, and SDPA's flash kernels do attention.

The check: the model's logits on a short padded batch with and without the fast path must agree to the
compute dtype's precision; if not (an architecture with something extra, e.g. Qwen3's q/k norms or
Gemma's (1 + w) norm), the model is restored and runs as transformers wrote it.
"""

from __future__ import annotations

import types
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.lora.function import compute_dtype
from lorakit.lora.fused import fusable, project
from lorakit.train.kernels import attention, rms_norm, rope


def fused_layer_forward(layer: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                        position_ids: Tensor | None = None, cache=None, use_cache: bool | None = False,
                        position_embeddings: tuple[Tensor, Tensor] | None = None, **kwargs) -> Tensor:
    """A Llama decoder layer (pre-norm attention, then pre-norm SwiGLU MLP, residual around each) on
    hidden_states (B, S, H); generation with a KV cache goes to the layer's own forward."""
    if cache is not None or position_embeddings is None:
        return type(layer).forward(layer, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                   **kwargs)
    if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func(partial(_layer, layer, attention_mask=attention_mask,
                                                          position_embeddings=position_embeddings), hidden_states)
    return _layer(layer, hidden_states, attention_mask, position_embeddings)


def _layer(layer: nn.Module, x: Tensor, attention_mask: Tensor | None, position_embeddings: tuple[Tensor, Tensor]):
    attn, mlp = layer.self_attn, layer.mlp
    b, s, _ = x.shape
    dtype = compute_dtype(x)
    d = attn.head_dim
    cos, sin = position_embeddings  # (B|1, S, d)
    h = rms_norm(x, layer.input_layernorm.weight, _eps(layer.input_layernorm))
    q, k, v = _projections(h, [attn.q_proj, attn.k_proj, attn.v_proj], dtype, layer.training)  # (B, S, heads·d)
    q = rope(q, cos, sin, q.shape[-1] // d, attn.scaling)  # (B, H, S, d), pre-scaled
    k = rope(k, cos, sin, k.shape[-1] // d)  # (B, Hkv, S, d)
    v = v.view(b, s, -1, d).transpose(1, 2)  # (B, Hkv, S, d)
    x = x + attn.o_proj(attention(q, k, v, attention_mask))  # (B, S, H)
    h = rms_norm(x, layer.post_attention_layernorm.weight, _eps(layer.post_attention_layernorm))
    gate, up = _projections(h, [mlp.gate_proj, mlp.up_proj], dtype, layer.training)  # (B, S, I)
    # out of place: an in-place mul_ makes autograd clone silu's output for backward (one more (B, S, I) copy)
    return x + mlp.down_proj(F.silu(gate) * up)


def _projections(x: Tensor, modules: list[nn.Module], dtype: torch.dtype, training: bool) -> list[Tensor]:
    if fusable(modules, training):
        return project(x, modules, dtype)
    return [m(x).to(dtype) for m in modules]


def _eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)


def _structure_fits(layer: nn.Module) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")),
             ("mlp", ("gate_proj", "up_proj", "down_proj", "act_fn")),
             ("input_layernorm", ("weight",)), ("post_attention_layernorm", ("weight",)))
    if attn is None or mlp is None or not all(hasattr(getattr(layer, m, None), a) for m, attrs in names for a in attrs):
        return False
    return _is_silu(mlp.act_fn) and getattr(attn, "attention_dropout", 0.0) == 0.0


def _is_silu(act: nn.Module) -> bool:
    from transformers import activations

    return isinstance(act, (nn.SiLU, getattr(activations, "SiLUActivation", nn.SiLU)))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM (``model.model.layers`` and its kin), or []."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, ValueError):
        return []
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def llama_layers(model: nn.Module) -> tuple[list[nn.Module], str | None]:
    """(``model``'s decoder layers, None) when every one has the Llama structure the fused and compiled
    layers compute, with full causal attention; else ([], why not)."""
    layers = decoder_layers(model)
    kind = type(layers[0]) if layers else None
    if not layers or any(type(m) is not kind for m in layers) or not _structure_fits(layers[0]):
        return [], "no Llama-structured decoder layers found"
    config = model.config
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return [], f"{config._attn_implementation} attention"
    window = getattr(config, "sliding_window", None)  # Mistral; Qwen2 only with use_sliding_window
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()) or (
            window and getattr(config, "use_sliding_window", True)
            and window < getattr(config, "max_position_embeddings", window + 1)):
        return [], "sliding-window attention"
    return layers, None


def enable(model: nn.Module) -> str:
    """Switch ``model`` to the fast path where it applies; returns what runs (one line for the log)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return _enable_liger(model)
    layers, why_not = llama_layers(model)
    if why_not:
        return f"transformers' own layers ({why_not})"
    kind = type(layers[0])
    for layer in layers:
        layer.forward = types.MethodType(fused_layer_forward, layer)
    if not _same_logits(model):
        disable(model)
        return "transformers' own layers (the fused layer did not reproduce this architecture's logits)"
    return f"fused decoder layers ({len(layers)} × {kind.__name__})"


def disable(model: nn.Module) -> None:
    for layer in decoder_layers(model):
        layer.__dict__.pop("forward", None)


@torch.no_grad()
def _same_logits(model: nn.Module) -> bool:
    """The model's logits on a padded 2×12 batch, fused vs its own layers, agree to the weights' precision."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a right-padded row
    dtype = next(model.parameters()).dtype
    training = model.training
    model.eval()
    fused = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    layers = decoder_layers(model)
    saved = [layer.__dict__.pop("forward") for layer in layers]
    plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    for layer, fwd in zip(layers, saved, strict=True):
        layer.forward = fwd
    model.train(training)
    keep = mask.bool()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    scale = plain[keep].abs().max().clamp(min=1.0)
    return bool(((fused[keep] - plain[keep]).abs().max() / scale) <= tol)


def _enable_liger(model: nn.Module) -> str:
    """CUDA: liger-kernel's RMSNorm, RoPE and SwiGLU on this model instance where liger-kernel is installed."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return "transformers' own layers with SDPA (pip install liger-kernel for fused RMSNorm/RoPE/SwiGLU)"
    try:
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
    except (TypeError, ValueError, AttributeError, NotImplementedError) as e:
        return f"transformers' own layers with SDPA (liger-kernel does not patch {type(model).__name__}: {e})"
    return "liger-kernel RMSNorm, RoPE and SwiGLU; SDPA attention"
