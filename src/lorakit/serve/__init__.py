"""``lorakit serve``: one base model, many LoRA adapters, one OpenAI-compatible endpoint.

Modules: ``app`` (HTTP, OpenAI schema), ``scheduler`` (continuous batching), ``batched_lora`` (per-row
adapters in one forward), ``attention`` (packed prefill), ``registry`` (adapters at runtime), ``server`` (the
command), ``vllm`` (``check-adapter --for vllm``). Nothing here is imported by ``import lorakit``: the HTTP
stack is the ``serve`` extra (``pip install 'lorakit[serve]'``)."""

from __future__ import annotations

import importlib.util

from lorakit.errors import LorakitError


def require_serve_extra() -> None:
    """A one-line error naming the extra, instead of an ImportError traceback, when it is not installed."""
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise LorakitError(f"lorakit serve needs {', '.join(missing)}: pip install 'lorakit[serve]'")
