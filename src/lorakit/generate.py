"""`lorakit generate`: a base model (+ an adapter at some scale) completing a prompt or chatting,
streaming tokens to stdout as they come."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn
from transformers import TextStreamer

from lorakit.config import ModelConfig, load_config
from lorakit.data.formats import ALPACA_PROMPT_NO_INPUT, CHATML_TEMPLATE
from lorakit.data.tokenize import _prefix_ids, pad_token_id
from lorakit.errors import LorakitError
from lorakit.lora import load_adapter, read_adapter, set_adapter_scale
from lorakit.model import load_model, load_tokenizer, resolve_model_path

PROMPT_FORMATS = ("raw", "alpaca", "chat")


def model_config_for(model: str | None, adapter: str | None) -> ModelConfig:
    """The base to load: ``--model``, else the one the adapter was trained on (its ``config.yaml`` from
    ``lorakit train``, with the same dtype and quantization, else ``adapter_config.json``)."""
    trained = Path(adapter) / "config.yaml" if adapter else None
    if trained is not None and trained.is_file():
        cfg = load_config(trained).model
        return ModelConfig(name_or_path=model or cfg.name_or_path, dtype=cfg.dtype, quantization=cfg.quantization)
    if model:
        return ModelConfig(name_or_path=model)
    if adapter:
        base = read_adapter(adapter)[0].get("base_model_name_or_path")
        if base:
            return ModelConfig(name_or_path=base)
    raise LorakitError("--model is required (the adapter folder names no base model)")


def load_for_generation(model: str | None, adapter: str | None = None, scale: float = 1.0) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer): the base, plus the adapter at ``adapter`` scaled by ``scale``."""
    if adapter and not (Path(adapter) / "adapter_config.json").is_file() and (Path(adapter) / "config.json").is_file():
        raise LorakitError(f"--adapter {adapter}: a full model folder (from --method full), not an adapter; "
                           f"pass it as --model {adapter}")
    cfg = model_config_for(model, adapter)
    tokenizer = load_tokenizer(resolve_model_path(cfg.name_or_path))
    base = load_model(cfg)
    if adapter:
        load_adapter(base, adapter)
        set_adapter_scale(base, scale)
    return base.eval(), tokenizer


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The conversation rendered up to the assistant's turn: the tokenizer's chat template, else ChatML
    (what ``lorakit train --format chat`` trained on)."""
    template = None if getattr(tokenizer, "chat_template", None) else CHATML_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def format_prompt(tokenizer: Any, prompt: str, fmt: str) -> str:
    """``prompt`` as training rendered it: as is (raw), in the alpaca template, or as one chat turn."""
    if fmt == "alpaca":
        return ALPACA_PROMPT_NO_INPUT.format(instruction=prompt)
    if fmt == "chat":
        return chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
    return prompt


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids as training saw the start of an example: the tokenizer's prefix (bos, [CLS]) once, then
    the text; no suffix ([SEP], eos) that would end the sequence before the answer."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = _prefix_ids(tokenizer)
    return ids if prefix and ids[:len(prefix)] == prefix else prefix + ids


@torch.no_grad()
def complete(model: nn.Module, tokenizer: Any, text: str, max_new_tokens: int = 128, temperature: float = 0.0,
             stop: list[str] | None = None, stream: bool = True) -> str:
    """Generate a continuation of ``text`` (greedy at temperature 0) until eos, a ``stop`` string or
    ``max_new_tokens``, printing tokens to stdout as they come when ``stream``; returns the new text
    without special tokens or the stop string."""
    ids = encode_prompt(tokenizer, text)
    if not ids:
        raise LorakitError("the prompt is empty and the tokenizer has no bos token to start from")
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)  # (1, T)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id(tokenizer), use_cache=True, stop_strings=stop, tokenizer=tokenizer if stop else None,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None,
        **sampling)  # (1, T + new)
    new = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
    for s in stop or []:
        new = new.split(s)[0]
    return new


def chat(model: nn.Module, tokenizer: Any, lines: TextIO, max_new_tokens: int, temperature: float) -> None:
    """A REPL: each input line is a user turn; the history grows with both sides of the conversation."""
    messages: list[dict[str, str]] = []
    interactive = lines.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        if not line:
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        # ChatML's end of turn is plain text to a tokenizer that lacks it as a special token: stop on it
        stop = None if getattr(tokenizer, "chat_template", None) else ["<|im_end|>"]
        reply = complete(model, tokenizer, chat_prompt(tokenizer, messages), max_new_tokens, temperature, stop)
        print(flush=True)
        messages.append({"role": "assistant", "content": reply.strip()})


def generate_command(model: str | None, adapter: str | None, scale: float, max_new_tokens: int,
                     temperature: float, prompt: str | None, fmt: str, seed: int) -> int:
    """What ``lorakit generate`` runs: one completion of ``prompt``, or the chat REPL when it is None."""
    if max_new_tokens < 1:
        raise LorakitError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise LorakitError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    if fmt not in PROMPT_FORMATS:
        raise LorakitError(f"--format must be one of {', '.join(PROMPT_FORMATS)}, got {fmt!r}")
    torch.manual_seed(seed)
    m, tokenizer = load_for_generation(model, adapter, scale)
    if prompt is None:
        chat(m, tokenizer, sys.stdin, max_new_tokens, temperature)
    else:
        complete(m, tokenizer, format_prompt(tokenizer, prompt, fmt), max_new_tokens, temperature)
        print(flush=True)
    return 0
