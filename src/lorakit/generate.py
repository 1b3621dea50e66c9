"""`lorakit generate`: a base model (+ an adapter at some scale) completing a prompt or chatting,
streaming tokens to stdout as they come."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn
from transformers import TextStreamer

from lorakit.data.formats import CHATML_TEMPLATE, to_segments
from lorakit.data.tokenize import pad_token_id, prefix_ids
from lorakit.errors import LorakitError
from lorakit.lora import load_adapter, set_adapter_scale
from lorakit.model import load_model, load_tokenizer, model_config_for, resolve_model_path

PROMPT_FORMATS = ("raw", "alpaca", "chat")


def load_for_generation(model: str | None, adapter: str | None = None, scale: float = 1.0,
                        quantization: str | None = None) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer): the base (stored as ``quantization``, else as trained), plus the
    adapter at ``adapter`` scaled by ``scale``."""
    if adapter and not (Path(adapter) / "adapter_config.json").is_file() and (Path(adapter) / "config.json").is_file():
        raise LorakitError(f"--adapter {adapter}: a full model folder (from --method full), not an adapter; "
                           f"pass it as --model {adapter}")
    cfg = model_config_for(model, adapter, quantization)
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


def format_prompt(tokenizer: Any, prompt: str, fmt: str, input_text: str | None = None) -> str:
    """``prompt`` as training rendered it: as is (raw), in the alpaca template (``input_text`` as the
    record's ``input``), or as one chat turn."""
    if fmt == "alpaca":
        record = {"instruction": prompt, "input": input_text or "", "output": ""}
        return to_segments(record, "alpaca", tokenizer)[0][0]  # the prompt segment, exactly as trained
    if fmt == "chat":
        return chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
    return prompt


class _Streamer(TextStreamer):
    """TextStreamer (new text printed a word at a time) that hides a stop string and what follows it.
    Words reach ``on_finalized_text`` whole, so a stop string without spaces is never split."""

    def __init__(self, tokenizer: Any, stop: list[str] | None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stop, self.stopped = stop or [], False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.stopped:
            text = ""
        for s in self.stop:
            if s in text:
                text, self.stopped = text.split(s)[0], True
        if text or stream_end:
            super().on_finalized_text(text, stream_end)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids as training saw the start of an example: the tokenizer's prefix (bos, [CLS]) once, then
    the text; no suffix ([SEP], eos) that would end the sequence before the answer."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = prefix_ids(tokenizer)
    return ids if prefix and ids[:len(prefix)] == prefix else prefix + ids


@torch.no_grad()
def complete(model: nn.Module, tokenizer: Any, text: str, max_new_tokens: int = 128, temperature: float = 0.0,
             stop: list[str] | None = None, stream: bool = True) -> str:
    """Generate a continuation of ``text`` (greedy at temperature 0) until eos, a ``stop`` string or
    ``max_new_tokens``, printing tokens to stdout as they come when ``stream`` (ending with a newline);
    returns the new text without special tokens or the stop string."""
    ids = encode_prompt(tokenizer, text)
    if not ids:
        raise LorakitError("the prompt is empty and the tokenizer has no bos token to start from")
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)  # (1, T)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id(tokenizer), use_cache=True, stop_strings=stop, tokenizer=tokenizer if stop else None,
        streamer=_Streamer(tokenizer, stop) if stream else None,
        **sampling)  # (1, T + new)
    new = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
    for s in stop or []:
        new = new.split(s)[0]
    return new


def chat_stop(tokenizer: Any) -> list[str] | None:
    """ChatML's end of turn is plain text to a tokenizer that lacks it as a special token: stop on it.
    A tokenizer's own chat template ends turns with its eos, where generation stops anyway."""
    return None if getattr(tokenizer, "chat_template", None) else ["<|im_end|>"]


def chat(model: nn.Module, tokenizer: Any, lines: TextIO, max_new_tokens: int,
         temperature: float) -> list[dict[str, str]]:
    """A REPL: each input line is a user turn, answered with the whole conversation so far as the prompt;
    a blank line ends each reply, and lines read from a pipe are echoed as ``> line`` so the transcript
    shows both sides. Returns the conversation."""
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
        if not interactive:  # a terminal echoes what was typed; a pipe does not
            print(f"> {messages[-1]['content']}", flush=True)
        reply = complete(model, tokenizer, chat_prompt(tokenizer, messages), max_new_tokens, temperature,
                         chat_stop(tokenizer))
        print(flush=True)  # the turn separator
        messages.append({"role": "assistant", "content": reply.strip()})
    return messages


def generate_command(model: str | None, adapter: str | None, scale: float, max_new_tokens: int,
                     temperature: float, prompt: str | None, fmt: str, seed: int, quantization: str | None = None,
                     input_text: str | None = None) -> int:
    """What ``lorakit generate`` runs: one completion of ``prompt``, or the chat REPL when it is None."""
    if max_new_tokens < 1:
        raise LorakitError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise LorakitError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    if fmt not in PROMPT_FORMATS:
        raise LorakitError(f"--format must be one of {', '.join(PROMPT_FORMATS)}, got {fmt!r}")
    if input_text is not None and (fmt != "alpaca" or prompt is None):
        raise LorakitError("--input is the alpaca record's input: it goes with --format alpaca and --prompt")
    torch.manual_seed(seed)
    m, tokenizer = load_for_generation(model, adapter, scale, quantization)
    if prompt is None:
        chat(m, tokenizer, sys.stdin, max_new_tokens, temperature)
    else:
        stop = chat_stop(tokenizer) if fmt == "chat" else None
        complete(m, tokenizer, format_prompt(tokenizer, prompt, fmt, input_text), max_new_tokens, temperature, stop)
    return 0
