"""`lorakit merge`: fold a trained adapter into its base and save an ordinary model folder, checked.

The arithmetic (W ← W + s·B·A, NaN-checked) is ``lorakit.lora.merge``; this module is the command around it:
which base to load, in which storage, and how far the merged model's logits moved."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.lora.io import load_adapter
from lorakit.lora.merge import dense_dtype, merge_and_unload
from lorakit.model import load_model, load_tokenizer, model_config_for, quiet_weight_bars, resolve_model_path

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
