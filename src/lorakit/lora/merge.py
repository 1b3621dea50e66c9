"""Fold adapters into the base weight and back: W ← W + s·B·A (checked for NaN/inf), W ← W − s·B·A."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

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


# Texts on which `lorakit merge` compares the merged model with the adapter on its training base.
CHECK_PROMPTS = ("The quick brown fox jumps over the lazy dog.", "def fibonacci(n):\n    if n < 2:",
                 "Question: What is the capital of France?\nAnswer:", "Once upon a time, in a small village,")
LOGIT_DIFF_WARNING = 0.5


@torch.no_grad()
def logits_on(model: nn.Module, input_ids: list[Tensor]) -> list[Tensor]:
    """The model's fp32 logits (1, T, V) for each sequence (1, T) in ``input_ids``."""
    model.eval()
    device = next(model.parameters()).device
    return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in input_ids]


def merge_to_folder(model: str | None, adapter: str, output: str, quantization: str | None = None,
                    warn_above: float = LOGIT_DIFF_WARNING) -> float:
    """`lorakit merge`: fold the adapter at ``adapter`` into its base and save the merged model, an ordinary
    Hugging Face folder, at ``output``. The base is ``model`` (else the adapter's own), loaded as the adapter
    was trained (its run's config.yaml: dtype, quantization); ``quantization`` merges onto another storage of
    it (``none``: the 16-bit weights, the usual PEFT route after QLoRA). A quantized base is dequantized and
    merged in the dtype of its unquantized weights (bf16 unless the run chose ``--dtype``).

    Returns and prints the largest |logit| difference, on ``CHECK_PROMPTS``, between the adapter on the base
    it was trained on and the merged model, with a warning above ``warn_above``: an adapter trained on an
    NF4 base and merged onto the 16-bit weights can silently lose what it learned.
    """
    from lorakit.generate import model_config_for  # here: both import lorakit.lora
    from lorakit.lora.io import load_adapter
    from lorakit.model import load_model, load_tokenizer, quiet_weight_bars, resolve_model_path

    dest = Path(output)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise LorakitError(f"--output {dest}: exists and is not empty; choose a new folder")
    trained = model_config_for(model, adapter)
    target = model_config_for(model, adapter, quantization)
    tokenizer = load_tokenizer(resolve_model_path(trained.name_or_path))
    ids = [tokenizer(p, return_tensors="pt")["input_ids"] for p in CHECK_PROMPTS]
    base = load_adapter(load_model(trained), adapter)
    reference = logits_on(base, ids)
    trained_as = trained.quantization if trained.quantization != "none" else _dtype_name(dense_dtype(base))
    if target.quantization != trained.quantization:
        del base
        base = load_adapter(load_model(target), adapter)
    merged = merge_and_unload(base)
    diff = max((m - r).abs().max().item() for m, r in zip(logits_on(merged, ids), reference, strict=True))

    tmp = dest.parent / f".tmp-{dest.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with quiet_weight_bars():
            merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    onto = _dtype_name(dense_dtype(merged))  # float32, bfloat16...: what was saved, not a guess
    if target.quantization != "none":
        onto = f"dequantized {target.quantization} ({onto})"
    print(f"merged {adapter} onto the {onto} base {target.name_or_path}, saved to {dest}; max |logit difference| "
          f"vs the adapter on its {trained_as} base: {diff:.4f} ({sum(i.numel() for i in ids)} tokens)")
    if diff > warn_above:
        print(f"lorakit: warning: the merged model's logits differ by up to {diff:.3f} (> {warn_above}) from the "
              "adapter on the base it was trained on; the merge changed the model's behaviour (compare with "
              "lorakit generate before serving it)", file=sys.stderr)
    return diff


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
