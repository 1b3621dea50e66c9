"""Fold adapters into the base weight and back: W ← W + s·B·A (checked for NaN/inf), W ← W − s·B·A."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.lora.inject import lora_layers
from lorakit.lora.layer import LoraLayer


def merge(model: nn.Module, safe: bool = True) -> None:
    """Merge every active, unmerged adapter into its base weight, in place. With ``safe`` the sum is
    computed aside and checked for non-finite values first, so a broken adapter leaves W untouched.

    A quantized (QLoRA) base is dequantized first, the adapter is added to exactly the weights it was
    trained against, and the layer keeps the sum as a plain ``nn.Linear`` in the dtype of the model's
    unquantized weights (``dense_dtype``: bf16 for QLoRA's usual base): quantizing it again would add a
    second rounding error on top of the adapter."""
    dense = dense_dtype(model)
    for path, layer in lora_layers(model):
        if layer.disabled:
            continue
        for name in layer.active_adapters:
            if name in layer.merged_adapters:
                continue
            quantized = getattr(layer, "quantized", False)
            w = layer.weight
            base = layer.weight_as(torch.float32) if quantized else w.detach().float()
            merged = base + layer.delta_weight(name).to(w.device)
            if safe and not torch.isfinite(merged).all():
                raise LorakitError(f"merging adapter {name!r} into {path} gives NaN/inf weights; "
                                   "the adapter is broken (check its training loss)")
            if quantized:
                _replace_quantized_base(layer, merged.to(dense))
            else:
                w.data.copy_(merged.to(w.dtype))
            layer.merged_adapters.append(name)


def dense_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's unquantized weights: its input embeddings', else its first frozen floating
    weight's; bf16 when it has none."""
    get = getattr(model, "get_input_embeddings", None)
    weight = getattr(get() if get else None, "weight", None)
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad),
                torch.bfloat16)


def _replace_quantized_base(layer: LoraLayer, weight: Tensor) -> None:
    """Swap the layer's bitsandbytes base module for a plain ``nn.Linear`` holding ``weight`` (out, in)."""
    layer._base[0] = _plain_linear(layer.in_features, layer.out_features, weight, layer.bias)
    layer.weight = layer.base_layer.weight


def _plain_linear(in_features: int, out_features: int, weight: Tensor, bias: Tensor | None) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = bias
    return linear


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def unmerge(model: nn.Module) -> None:
    """Undo ``merge``: subtract each merged adapter's update again (exact up to the weight dtype's rounding)."""
    for _, layer in lora_layers(model):
        for name in reversed(layer.merged_adapters):
            w = layer.weight
            w.data.copy_((w.detach().float() - layer.delta_weight(name).to(w.device)).to(w.dtype))
        layer.merged_adapters.clear()


def merge_and_unload(model: nn.Module, safe: bool = True) -> nn.Module:
    """Merge the active adapters and put the original modules back: the plain transformers model, whose
    ``state_dict()`` keys equal the base's. On a quantized base every linear comes back as an ``nn.Linear``
    in ``dense_dtype`` (untargeted ones dequantized), so ``save_pretrained`` writes an ordinary checkpoint."""
    dense = dense_dtype(model)
    merge(model, safe=safe)
    for path, layer in list(lora_layers(model)):
        base = layer.base_layer
        base.weight = layer.weight
        if layer.bias is not None:
            base.bias = layer.bias
        _set_submodule(model, path, base)
    for path, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and m.weight.dtype in (torch.uint8, torch.int8):  # bitsandbytes-packed
            from lorakit.quant.bnb import dequantize

            _set_submodule(model, path, _plain_linear(m.in_features, m.out_features,
                                                      dequantize(m.weight, m, dense), m.bias))
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    return model
