"""Continuous batching over one base model and many adapters.

One engine thread owns the model. Each step it
  1. drops cancelled requests (a client that went away frees its slot at once),
  2. admits waiting requests while slots are free, up to PREFILL_TOKENS_PER_STEP prompt tokens, and prefills
     them in ONE forward: their prompts packed into one row, attention kept inside each prompt
     (``attention.packed``), each prompt's keys and values written into its own KV-cache row (so a prompt's
     cache never depends on what else is running),
  3. runs ONE decode forward over every running request, whatever its adapter (``BatchedLora`` routes each
     row to its adapter; base-only rows take no LoRA work), and samples each row with its own settings,
  4. lets finished requests leave at once: the last row moves into the hole, so rows stay 0..B-1.

Why not transformers' ``ContinuousBatchingManager`` (paged attention): it has no per-request adapter, one
sampling mode and seed for all requests, and no stop strings; and on CPU its paged attention falls back to
one SDPA over all requests' tokens packed into a single sequence with a block mask, so attention work grows
with the square of the whole batch's tokens. The per-request cache here keeps each row's attention to its own
keys, and the base model's own forward does the rest; on the base alone this scheduler's batch outruns
`transformers serve --continuous-batching` at 16 to 64 requests (README, Serving).

The KV cache is a set of fixed rows per layer, (rows, kv_heads, capacity, head_dim), grown as needed; the
model writes into it through the ``cache.update`` call every transformers decoder makes, and attends over
a view of the first B rows with a per-row mask (rows have different lengths).
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.serve.attention import packed, packed_spans, use_packed_attention
from lorakit.serve.registry import AdapterRegistry

log = logging.getLogger("lorakit.serve")

PREFILL_TOKENS_PER_STEP = 2048  # prompt tokens admitted per step: bounds the pause a burst of arrivals puts on
#                                 running requests' inter-token latency, while keeping prefill matmuls large
CACHE_BLOCK = 128  # the KV cache grows in multiples of this many positions


class QueueFull(Exception):
    """The waiting queue holds --max-queue requests already (or the server is shutting down)."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the k most likely


@dataclass
class Output:
    """One step's result for one request: a token, and/or the reason it finished."""

    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish: str | None = None  # "stop" (eos), "length", "cancelled" or "error"
    error: str | None = None
    status: int = 500  # the HTTP status of an error


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    adapter: str | None = None  # None: the base model
    stop_token_ids: frozenset[int] = frozenset()
    sink: object = None  # where the API layer collects this request's outputs (not used by the engine)
    generated: list[int] = field(default_factory=list)
    length: int = 0  # tokens in the KV cache
    slot: int = -1
    cancelled: bool = False
    finished: bool = False
    pinned: bool = False  # holds a use count on its adapter
    generator: torch.Generator | None = None


class SlotCache:
    """Per-request KV cache: layer l keeps K and V as (rows, kv_heads, capacity, head_dim); running request i
    owns row i. The model calls ``update`` once per layer and forward; ``prefill`` / ``decode`` say how."""

    def __init__(self, max_rows: int, max_len: int):
        self.max_rows, self.max_len = max_rows, max_len
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        self.rows = self.capacity = 0
        self._segments: list[tuple[int, int, int]] | None = None
        self._rows = self._pos = None
        self._len = 0

    def reserve(self, rows: int, length: int) -> None:
        """Room for ``rows`` rows of ``length`` positions (existing layers grow, keeping their contents)."""
        rows = min(self.max_rows, max(self.rows, 1 << max(rows - 1, 0).bit_length()))
        cap = min(self.max_len, max(self.capacity, -(-length // CACHE_BLOCK) * CACHE_BLOCK))
        if (rows, cap) == (self.rows, self.capacity):
            return
        for store in (self.k, self.v):
            for layer, old in store.items():
                new = old.new_zeros(rows, old.shape[1], cap, old.shape[3])
                new[: old.shape[0], :, : old.shape[2]] = old
                store[layer] = new
        self.rows, self.capacity = rows, cap

    def prefill(self, segments: list[tuple[int, int, int]]) -> None:
        """A packed prefill: (slot, start, stop) says which positions of the packed row are that slot's prompt."""
        self._segments = segments

    def decode(self, lengths: Tensor, kv_len: int) -> None:
        """Row i writes its new key at position lengths[i] and attends over the first ``kv_len`` positions."""
        self._segments = None
        self._rows = torch.arange(len(lengths), device=lengths.device)
        self._pos, self._len = lengths, kv_len

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        # key, value: (B, kv_heads, T, head_dim) with T = the packed prompts (prefill, B = 1) or 1 (decode)
        if layer_idx not in self.k:
            shape = (self.rows, key.shape[1], self.capacity, key.shape[3])
            self.k[layer_idx] = key.new_zeros(shape)
            self.v[layer_idx] = value.new_zeros(shape)
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self._segments is not None:
            for slot, start, stop in self._segments:
                k[slot, :, : stop - start] = key[0, :, start:stop]
                v[slot, :, : stop - start] = value[0, :, start:stop]
            return key, value  # attention over the packed row, each prompt alone (attention.packed)
        k[self._rows, :, self._pos] = key[:, :, 0]  # (B, kv_heads, head_dim) at each row's own position
        v[self._rows, :, self._pos] = value[:, :, 0]
        b = key.shape[0]
        return k[:b, :, : self._len], v[:b, :, : self._len]

    def move(self, src: int, dst: int, length: int) -> None:
        for store in (self.k, self.v):
            for t in store.values():
                t[dst, :, :length] = t[src, :, :length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly


class Engine:
    """The scheduler and its thread. ``deliver(events)`` is called from the engine thread once per step
    with [(request, Output)]; ``submit`` and ``cancel`` may be called from any thread."""

    def __init__(self, model: nn.Module, registry: AdapterRegistry, max_batch: int, max_queue: int,
                 max_context: int, deliver: Callable[[list[tuple[Request, Output]]], None] | None = None,
                 prefill_tokens: int = PREFILL_TOKENS_PER_STEP):
        self.model, self.registry = model.eval(), registry
        self.max_batch, self.max_queue, self.max_context = max_batch, max_queue, max_context
        self.prefill_tokens = prefill_tokens
        self.deliver = deliver or (lambda events: None)
        first = next(model.parameters())
        self.device = first.device
        self.mask_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.cache = SlotCache(max_batch, max_context)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
        self._keep_last = "logits_to_keep" in params
        self._last = torch.zeros(1, dtype=torch.long, device=self.device)  # a decode row's one position
        self.packed = use_packed_attention(model)  # False: prompts are prefilled one at a time
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # --- any thread ---------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self._running)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()

    def submit(self, req: Request) -> None:
        """Queue ``req``; QueueFull when the engine is stopping, or when --max-queue requests would wait beyond
        the free slots (at most max_batch + max_queue requests are ever held)."""
        if req.params.temperature > 0:
            seed = req.params.seed if req.params.seed is not None else int.from_bytes(os.urandom(8), "little")
            req.generator = torch.Generator(device=self.device).manual_seed(seed)
        with self._cv:
            free = self.max_batch - len(self._running)  # requests the next step admits at once do not wait
            if self._stopping or len(self._waiting) >= self.max_queue + free:
                raise QueueFull
            self._waiting.append(req)
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        """Stop generating for ``req`` (its client went away, or it hit a stop string); its slot frees at the
        next step boundary."""
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then end the thread; nothing new is accepted meanwhile."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the engine thread --------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._waiting or self._running or self._stopping):
                        self._cv.wait()
                    if self._stopping and not self._waiting and not self._running:
                        return
                try:
                    self.step()
                except Exception as e:  # a bug or out of memory: fail what is running, keep serving
                    log.exception("engine step failed")
                    self._fail_running(f"generation failed: {type(e).__name__}: {e}")

    def step(self) -> None:
        """One scheduling step: drop cancelled, admit and prefill, one decode forward, let finished leave."""
        events: list[tuple[Request, Output]] = []
        with self.registry.lock:
            self._drop_cancelled(events)
            self._leave()
            admitted = self._admit(events)
            if admitted:
                self._prefill_all(admitted, events)
                self.deliver(events)  # their first tokens go out now, not after the decode
                events = []
            self._leave()
            if self._running:
                self._decode(events)
                self._leave()
        self.steps += 1
        if events:
            self.deliver(events)

    def _drop_cancelled(self, events: list) -> None:
        with self._cv:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone + [r for r in self._running if r.cancelled and not r.finished]:
            r.finished = True
            events.append((r, Output(finish="cancelled")))

    def _admit(self, events: list) -> list[Request]:
        admitted: list[Request] = []
        budget = self.prefill_tokens
        while len(self._running) < self.max_batch and (budget > 0 or not admitted):
            with self._cv:
                if not self._waiting:
                    break
                req = self._waiting[0]
            if req.adapter is not None:
                try:
                    if not self.registry.acquire(req.adapter):
                        break  # every loaded adapter is busy and --max-adapters is reached: wait for one
                except LorakitError as e:  # deleted meanwhile, or its files changed and no longer load
                    with self._cv:
                        self._waiting.popleft()
                    req.finished = True
                    events.append((req, Output(finish="error", error=str(e), status=getattr(e, "status", 400))))
                    continue
                req.pinned = True
            with self._cv:
                self._waiting.popleft()
            req.slot = len(self._running)
            self._running.append(req)
            admitted.append(req)
            budget -= len(req.prompt)
        return admitted

    def _forward(self, ids: Tensor, positions: Tensor, mask: Tensor, adapters: list[str | None], keep: Tensor,
                 tokens: list[int] | None = None) -> Tensor:
        """Logits (len(keep) rows, vocab) at positions ``keep`` of each batch row (flattened over rows)."""
        kwargs = {self._cache_kw: self.cache, "use_cache": True}
        if self._keep_last:
            # positions as an index tensor, not the int 1: a slice [:, -1:] of (1, n, dim) keeps the stride n·dim
            # on its batch dimension, which sends the head's matmul to a bmm that first copies the whole (vocab,
            # dim) weight, 120 ms for a 32000 x 512 head; an index gathers a contiguous (B, k, dim)
            kwargs["logits_to_keep"] = keep
        with self.registry.batched.route(adapters, self.device, tokens):
            logits = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, **kwargs).logits
        if not self._keep_last:
            logits = logits[:, keep]
        return logits.reshape(-1, logits.shape[-1])  # (B·k, vocab), in the model's dtype

    def _prefill_all(self, reqs: list[Request], events: list) -> None:
        """Prefill the admitted prompts: packed into one forward where the model allows it; a forward that fails
        (out of memory?) is retried one prompt at a time, so only a prompt that fails alone fails."""
        if self.packed and len(reqs) > 1:
            try:
                return self._prefill(reqs, events)
            except Exception:
                log.exception("packed prefill failed; prefilling one prompt at a time")
        for req in reqs:
            try:
                self._prefill([req], events)
            except Exception as e:
                log.exception("prefill failed")
                req.finished = True
                events.append((req, Output(finish="error", error=f"generation failed: {type(e).__name__}: {e}")))

    def _prefill(self, reqs: list[Request], events: list) -> None:
        # one packed row of every prompt; each prompt's positions start at 0 and its keys go to its own cache row
        lengths = [len(r.prompt) for r in reqs]
        spans = packed_spans(lengths)
        self.cache.reserve(len(self._running), max(lengths) + 1)
        ids = torch.tensor([[t for r in reqs for t in r.prompt]], device=self.device)  # (1, T)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device)[None]  # (1, T)
        keep = torch.tensor([stop - 1 for _, stop in spans], device=self.device)  # each prompt's last position
        self.cache.prefill([(r.slot, a, b) for r, (a, b) in zip(reqs, spans, strict=True)])
        if self.packed:  # attention.packed_sdpa keeps each prompt to itself; a 4D mask stops transformers building
            mask = torch.zeros(1, 1, 1, 1, dtype=self.mask_dtype, device=self.device)  # a (T, T) one; unused
            with packed(spans):
                logits = self._forward(ids, positions, mask, [r.adapter for r in reqs], keep, lengths)
        else:  # one prompt: causal, additive (1, 1, n, n)
            (n,) = lengths
            blocked = torch.ones(n, n, dtype=torch.bool, device=self.device).triu(1)
            mask = torch.zeros(1, 1, n, n, dtype=self.mask_dtype, device=self.device)
            mask.masked_fill_(blocked, torch.finfo(self.mask_dtype).min)
            logits = self._forward(ids, positions, mask, [r.adapter for r in reqs], keep, lengths)
        for r, n in zip(reqs, lengths, strict=True):
            r.length = n
        self._sample(reqs, logits, events)

    def _decode(self, events: list) -> None:
        rows = self._running
        lengths = torch.tensor([r.length for r in rows], device=self.device)  # (B,) tokens cached per row
        kv_len = int(lengths.max()) + 1
        self.cache.reserve(len(rows), kv_len)
        ids = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)  # (B, 1)
        later = torch.arange(kv_len, device=self.device)[None] > lengths[:, None]  # (B, kv_len)
        mask = torch.zeros(len(rows), 1, 1, kv_len, dtype=self.mask_dtype, device=self.device)
        mask.masked_fill_(later[:, None, None], torch.finfo(self.mask_dtype).min)  # (B, 1, 1, kv_len)
        self.cache.decode(lengths, kv_len)
        logits = self._forward(ids, lengths[:, None], mask, [r.adapter for r in rows], self._last)
        for r in rows:
            r.length += 1
        self._sample(rows, logits, events)

    def _sample(self, rows: list[Request], logits: Tensor, events: list) -> None:
        """Each row's next token with its own settings; logits (n, vocab) in the model's dtype."""
        # max(-1).indices: the first maximal index, as argmax, and the same as on float32 (the conversion is
        # exact); on bf16 (64, 32000) logits 1.4 ms, where argmax takes 6.7 ms and float()+argmax 3.3 (one core)
        greedy = logits.max(-1).indices.tolist()
        logp = torch.log_softmax(logits.float(), -1) if any(r.params.logprobs is not None for r in rows) else None
        for i, r in enumerate(rows):
            p = r.params
            token = greedy[i] if p.temperature == 0 else _draw(logits[i].float(), p, r.generator)
            out = Output(token=token)
            if p.logprobs is not None and logp is not None:
                out.logprob = float(logp[i, token])
                if p.logprobs:
                    values, ids = logp[i].topk(p.logprobs)
                    out.top_logprobs = list(zip(ids.tolist(), values.tolist(), strict=True))
            r.generated.append(token)
            if token in r.stop_token_ids:
                out.finish = "stop"
            elif len(r.generated) >= p.max_tokens or r.length >= self.max_context:
                out.finish = "length"
            r.finished = out.finish is not None
            events.append((r, out))

    def _leave(self) -> None:
        """Finished rows leave: rows past the new batch size move into the holes, their cache with them."""
        rows = self._running
        done = [r for r in rows if r.finished]
        if not done:
            return
        size = len(rows) - len(done)
        holes = [i for i, r in enumerate(rows[:size]) if r.finished]
        movers = [r for r in rows[size:] if not r.finished]
        for hole, r in zip(holes, movers, strict=True):
            self.cache.move(r.slot, hole, r.length)
            r.slot = hole
            rows[hole] = r
        del rows[size:]
        for r in done:
            if r.pinned:
                r.pinned = False
                self.registry.release(r.adapter)

    def _fail_running(self, message: str) -> None:
        events = []
        with self.registry.lock:
            for r in self._running:
                r.finished = True
                events.append((r, Output(finish="error", error=message, status=500)))
            self._leave()
        self.deliver(events)


def _draw(logits: Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """A token from softmax(logits / temperature), restricted to the top_p nucleus (Holtzman et al. 2020)."""
    probs = torch.softmax(logits / p.temperature, -1)  # (vocab,)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
