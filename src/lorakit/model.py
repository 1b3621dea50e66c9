"""Load the base model and its tokenizer from a ``ModelConfig``: a local folder or a hub id.

``load_tokenizer`` is the data layer's (one loader for both); it is re-exported here."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lorakit.config import ModelConfig
from lorakit.data.tokenize import load_tokenizer

__all__ = ["default_device", "load_model", "load_tokenizer", "resolve_dtype", "resolve_model_path"]
from lorakit.errors import LorakitError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(cfg: ModelConfig, full_training: bool = False) -> torch.dtype:
    """``auto``: bf16 weights on a GPU that supports them, else fp32. Training every weight (``--method
    full``) keeps fp32 master weights under ``auto``: AdamW updates below bf16's resolution would vanish;
    bf16 autocast still does the matmuls in bf16."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if not full_training and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_model_path(name_or_path: str) -> str:
    """An existing local folder -> its absolute path (so config.yaml works from any directory); a string
    that only looks like a path -> a LorakitError; anything else is taken as a hub id."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise LorakitError(f"--model {name_or_path}: no config.json in this folder; point --model at a "
                               "Hugging Face model folder")
        return str(p.resolve())
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or not name_or_path
    if looks_like_path:
        raise LorakitError(f"--model {name_or_path}: no such folder; give a model folder or a hub id")
    return name_or_path


def load_model(cfg: ModelConfig, full_training: bool = False, device: torch.device | None = None) -> PreTrainedModel:
    """The model for ``cfg`` on ``device`` (quantized when asked); errors name --model and say what to do.
    Its tokenizer comes from ``load_tokenizer(resolve_model_path(...))``: load it first, it is cheap,
    and check the data with it before paying for the weights."""
    name = resolve_model_path(cfg.name_or_path)
    device = device or default_device()
    kwargs: dict = {"dtype": resolve_dtype(cfg, full_training)}
    if cfg.quantization != "none":
        if full_training:
            raise LorakitError(f"--quantization {cfg.quantization} freezes the base; it needs --method lora")
        from lorakit.quant import load_quantized

        # each linear is quantized as it is read; the rest is bf16 unless --dtype says otherwise (QLoRA)
        model, report = load_quantized(name, cfg.quantization, torch.bfloat16 if cfg.dtype == "auto" else
                                       kwargs["dtype"], device)
        print(report.summary(), file=sys.stderr)
        return model
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except Exception as e:
        raise LorakitError(f"--model {cfg.name_or_path}: could not load the model ({_first_line(e)})") from None
    return model.to(device)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
