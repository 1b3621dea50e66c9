"""``lorakit serve``: load the base model and its adapters, start the engine, serve HTTP until SIGTERM.

uvicorn handles SIGTERM and SIGINT: it stops accepting connections, lets in-flight requests (streams
included) finish, then runs the app's shutdown, which stops the engine thread. After a SIGTERM drain the
process exits 0 (uvicorn re-raises the signal once done; the handler installed here lets that pass)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import signal
import sys
from typing import Any

import torch

from lorakit.config import ServeRunConfig
from lorakit.device import bf16_native, cpu_threads
from lorakit.generate import chat_stop
from lorakit.model import default_device, load_model, load_tokenizer, resolve_model_path
from lorakit.serve.app import ServerState, create_app
from lorakit.serve.registry import AdapterRegistry
from lorakit.serve.scheduler import Engine

SWITCH_INTERVAL_S = 0.0002  # Python's GIL switch interval in the server process (default 0.005)
# end-of-turn markers of common chat templates; a chat answer stops at the one its template uses
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")


def build_state(cfg: ServeRunConfig) -> ServerState:
    """Everything the app needs: base model, tokenizer, adapters from --adapter, the engine (not started)."""
    sc = cfg.serve
    torch.set_num_threads(sc.threads or cpu_threads())
    model_cfg = cfg.model
    device = default_device()
    if model_cfg.dtype == "auto" and model_cfg.quantization == "none":
        # inference has no fp32 master weights to keep: bf16 wherever the hardware multiplies it natively
        model_cfg = dataclasses.replace(model_cfg, dtype="bfloat16" if bf16_native(device) else "float32")
    path = resolve_model_path(model_cfg.name_or_path)
    tokenizer = load_tokenizer(path)
    model = load_model(model_cfg, device=device).eval()
    emb = model.get_input_embeddings()
    dtype = emb.weight.dtype
    base_id = sc.served_model_name or model_cfg.name_or_path
    registry = AdapterRegistry(model, dtype, sc.max_adapters, sc.adapter_dir or None, reserved=(base_id,))
    for spec in sc.adapters:
        name, _, folder = spec.partition("=")
        registry.add(name.strip(), folder.strip(), trusted=True)
    max_context = int(getattr(model.config, "max_position_embeddings", None)
                      or getattr(model.config, "n_positions", None) or 2048)
    engine = Engine(model, registry, sc.max_batch, sc.max_queue, max_context)
    stop_ids, stop_text = chat_stops(tokenizer)
    return ServerState(engine=engine, registry=registry, tokenizer=tokenizer, base_id=base_id, base_path=path,
                       max_context=max_context, max_tokens_limit=sc.max_tokens_limit,
                       vocab_size=emb.num_embeddings, eos_ids=eos_ids(model, tokenizer), chat_stop_ids=stop_ids,
                       chat_stop_text=stop_text, api_key=sc.api_key or os.environ.get("LORAKIT_API_KEY") or None)


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Where generation ends: the generation config's eos ids (one or several) and the tokenizer's eos."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return frozenset(ids)


def chat_stops(tokenizer: Any) -> tuple[frozenset[int], list[str]]:
    """The chat template's end-of-turn: as a token id where the tokenizer has it as one special token, else
    as text (lorakit's ChatML fallback for a tokenizer without a template)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    special = set(tokenizer.all_special_tokens) | {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    ids = frozenset(tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN if t in template and t in special)
    return ids, ([] if ids else list(chat_stop(tokenizer) or []))


def serve(cfg: ServeRunConfig) -> int:
    import uvicorn

    sc = cfg.serve
    state = build_state(cfg)
    if not state.api_key and not _loopback(sc.host):
        print(f"lorakit serve: warning: listening on {sc.host} without an API key; anyone who reaches this "
              "port can use the model (set LORAKIT_API_KEY)", file=sys.stderr)
    names = ", ".join(state.registry.names()) or "none"
    print(f"lorakit serve: {state.base_id} ({state.registry.dtype}, {torch.get_num_threads()} threads, context "
          f"{state.max_context}), adapters: {names}; http://{sc.host}:{sc.port}/v1", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # what uvicorn restores and re-raises after draining
    # the engine thread lets go of the GIL in every torch op and needs it back right after; behind the event loop's
    # Python (a token event per stream per step) it would wait up to the default 5 ms switch interval each time
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    uvicorn.Server(uvicorn.Config(create_app(state), host=sc.host, port=sc.port, log_level="warning",
                                  timeout_graceful_shutdown=None)).run()
    print("lorakit serve: stopped", file=sys.stderr)
    return 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
