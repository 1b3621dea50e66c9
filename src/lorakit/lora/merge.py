"""Fold adapters into the base weight and back: W ← W + s·B·A (checked for NaN/inf), W ← W − s·B·A."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.inject import lora_layers


def merge(model: nn.Module, safe: bool = True) -> None:
    """Merge every active, unmerged adapter into its base weight, in place. With ``safe`` the sum is
    computed aside and checked for non-finite values first, so a broken adapter leaves W untouched."""
    for path, layer in lora_layers(model):
        if layer.disabled:
            continue
        for name in layer.active_adapters:
            if name in layer.merged_adapters:
                continue
            w = layer.weight
            merged = w.detach().float() + layer.delta_weight(name).to(w.device)
            if safe and not torch.isfinite(merged).all():
                raise LorakitError(f"merging adapter {name!r} into {path} gives NaN/inf weights; "
                                   "the adapter is broken (check its training loss)")
            w.data.copy_(merged.to(w.dtype))
            layer.merged_adapters.append(name)


def unmerge(model: nn.Module) -> None:
    """Undo ``merge``: subtract each merged adapter's update again (exact up to the weight dtype's rounding)."""
    for _, layer in lora_layers(model):
        for name in reversed(layer.merged_adapters):
            w = layer.weight
            w.data.copy_((w.detach().float() - layer.delta_weight(name).to(w.device)).to(w.dtype))
        layer.merged_adapters.clear()


def merge_and_unload(model: nn.Module, safe: bool = True) -> nn.Module:
    """Merge the active adapters and put the original modules back: the plain transformers model, whose
    ``state_dict()`` keys equal the base's."""
    merge(model, safe=safe)
    for path, layer in list(lora_layers(model)):
        base = layer.base_layer
        base.weight = layer.weight
        if layer.bias is not None:
            base.bias = layer.bias
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, base)
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    return model
