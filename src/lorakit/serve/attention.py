"""Packed prefill: the prompts admitted in one step run as ONE forward over one row of all their tokens, and
attention stays inside each prompt.

The linear layers see every admitted token at once (one weight read, large matmuls), which is where a prefill
spends its time; attention must not mix prompts. A block-diagonal mask over the packed row would do it, but
SDPA then computes all T x T scores and discards most (12 prompts of ~170 tokens: 35 ms a layer against 5 ms
for one causal SDPA per prompt, measured on one core). So this registers an attention function with
transformers' ``AttentionInterface`` that, inside ``packed(spans)``, runs SDPA causally on each prompt's own
slice of q, k and v, and outside it is transformers' SDPA unchanged (the decode step).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

from torch import Tensor, nn

NAME = "lorakit_packed_sdpa"
_spans: ContextVar[Sequence[tuple[int, int]] | None] = ContextVar("lorakit_packed_spans", default=None)


def packed_sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                **kwargs) -> tuple[Tensor, None]:
    # query (1, heads, T, head_dim), key/value (1, kv_heads, T, head_dim): the packed row; returns (1, T, heads, hd)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = _spans.get()
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
    for start, stop in spans:
        out[:, start:stop], _ = sdpa_attention_forward(module, query[:, :, start:stop], key[:, :, start:stop],
                                                       value[:, :, start:stop], None, is_causal=True, **kwargs)
    return out, None


def use_packed_attention(model: nn.Module) -> bool:
    """Switch ``model`` to ``packed_sdpa`` (SDPA itself outside ``packed``); False where the model does not
    take an attention function from transformers' ``AttentionInterface``."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # masks as for SDPA, where transformers builds one
    try:
        model.set_attn_implementation(NAME)
    except Exception:  # not a transformers model, or one that picks its attention otherwise
        return False
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME


def packed_spans(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) of each of the prompts of ``lengths`` tokens, packed one after another into one row."""
    ends = list(itertools.accumulate(lengths))
    return list(zip([0, *ends[:-1]], ends, strict=True))


@contextmanager
def packed(spans: Sequence[tuple[int, int]]) -> Iterator[None]:
    """Within the block, attention runs on each [start, stop) of the packed row alone, causally."""
    token = _spans.set(spans)
    try:
        yield
    finally:
        _spans.reset(token)
