"""Load the base model and its tokenizer from a ``ModelConfig``: a local folder, a hub id, or a GGUF file
(or a folder holding one), which ``lorakit.gguf`` converts once into a cached model folder.

``load_tokenizer`` is the data layer's (one loader for both); it is re-exported here. Every command that
takes a model goes through ``resolve_model_path``, ``load_tokenizer`` and ``load_model``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lorakit.config import ModelConfig, load_config
from lorakit.data.tokenize import load_tokenizer
from lorakit.errors import LorakitError
from lorakit.gguf import converted_folder, find_gguf, recorded_base
from lorakit.hub import missing_model_message
from lorakit.lora.io import read_adapter

__all__ = ["default_device", "load_model", "load_tokenizer", "quiet_weight_bars", "recorded_base", "resolve_dtype",
           "resolve_model_path"]


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
    """An existing local folder -> its absolute path (so config.yaml works from any directory); a GGUF file,
    or a folder without config.json holding exactly one, -> that file's absolute path (what an adapter
    records as its base); a string that can only be meant as a local path (or any missing one while the
    hub is offline) -> a LorakitError naming its close matches (``lorakit.hub``); anything else is taken
    as a hub id."""
    gguf = find_gguf(name_or_path)
    if gguf is not None:
        return str(gguf)
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            what = "file is neither a model folder nor a GGUF file" if p.is_file() else "folder has no config.json"
            raise LorakitError(f"--model {name_or_path}: this {what}; point --model at a Hugging Face model "
                               "folder, a .gguf file, or a hub id")
        return str(p.resolve())
    missing = missing_model_message(name_or_path)  # a mistyped local path is not sent to the hub
    if missing:
        raise LorakitError(missing)
    return name_or_path


# transformers' bars for reading and writing weights from local disk: drawn on every command, and in a log or
# the quickstart's prefixed lines they are noise. Hub downloads keep their bars (huggingface_hub's own).
QUIET_BARS = ("Loading weights", "Writing model shards")


@contextmanager
def quiet_weight_bars() -> Iterator[None]:
    """Within the block, transformers draws no ``QUIET_BARS`` progress bar (others are untouched)."""
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)  # transformers >= 5; older ones draw neither bar
    if set_hook is None:
        yield
        return
    previous = getattr(hf_logging, "_tqdm_hook", None)

    def hook(factory: Any, args: tuple, kwargs: dict) -> Any:
        if str(kwargs.get("desc", "")).startswith(QUIET_BARS):
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous else factory(*args, **kwargs)

    set_hook(hook)
    try:
        yield
    finally:
        set_hook(previous)


def load_model(cfg: ModelConfig, full_training: bool = False, device: torch.device | None = None) -> PreTrainedModel:
    """The model for ``cfg`` on ``device`` (quantized when asked); errors name --model and say what to do.
    Its tokenizer comes from ``load_tokenizer(resolve_model_path(...))``: load it first, it is cheap,
    and check the data with it before paying for the weights."""
    name = resolve_model_path(cfg.name_or_path)
    gguf = find_gguf(name)
    if gguf is not None:  # read from its cached conversion; the GGUF file stays the model's name
        name = str(converted_folder(gguf))
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
    else:
        try:
            with quiet_weight_bars():
                model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except Exception as e:
            raise LorakitError(f"--model {cfg.name_or_path}: could not load the model ({_first_line(e)})") from None
        model = model.to(device)
    if gguf is not None:
        model.config._name_or_path = str(gguf)
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def model_config_for(model: str | None, adapter: str | None, quantization: str | None = None) -> ModelConfig:
    """The base to load: ``--model``, else the one the adapter was trained on (its ``config.yaml`` from
    ``lorakit train``, with the same dtype and quantization, else ``adapter_config.json``); ``quantization``
    (``--quantization``) overrides the trained one."""
    trained = Path(adapter) / "config.yaml" if adapter else None
    if trained is not None and trained.is_file():
        cfg = load_config(trained).model
        return ModelConfig(name_or_path=model or cfg.name_or_path, dtype=cfg.dtype,
                           quantization=quantization or cfg.quantization)
    if model:
        return ModelConfig(name_or_path=model, quantization=quantization or "none")
    if adapter:
        base = read_adapter(adapter)[0].get("base_model_name_or_path")
        if base:
            return ModelConfig(name_or_path=base, quantization=quantization or "none")
    raise LorakitError("--model is required (the adapter folder names no base model)")
