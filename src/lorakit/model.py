"""Load the base model and its tokenizer from a ``ModelConfig``: a local folder or a hub id.

``load_tokenizer`` is the data layer's (one loader for both); it is re-exported here."""

from __future__ import annotations

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
        from transformers import BitsAndBytesConfig

        if full_training:
            raise LorakitError(f"--quantization {cfg.quantization} freezes the base; it needs --method lora")
        compute = kwargs["dtype"] if kwargs["dtype"] != torch.float32 else torch.bfloat16
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if cfg.quantization == "int8"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute))
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except Exception as e:
        raise LorakitError(f"--model {cfg.name_or_path}: could not load the model ({_first_line(e)})") from None
    if cfg.quantization == "none":
        model.to(device)
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
