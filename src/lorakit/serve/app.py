"""The HTTP face of ``lorakit serve``: OpenAI's chat and completions endpoints (with server-sent-event
streaming), the model list, runtime adapter loading, health and Prometheus metrics, as a FastAPI app.

Every error, whatever raised it (validation, auth, an unknown route, a full queue), has OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; the model generates in the engine thread
(``scheduler.Engine``), and this module turns its token events into text, usage and latency metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest

from lorakit.errors import LorakitError
from lorakit.generate import chat_prompt, encode_prompt
from lorakit.serve import schema as s
from lorakit.serve.metrics import Metrics
from lorakit.serve.registry import AdapterError, AdapterRegistry
from lorakit.serve.scheduler import Engine, Output, QueueFull, Request, SamplingParams
from lorakit.serve.text import TextStream

MAX_BODY_BYTES = 16 * 2**20  # a request body beyond this is refused before it is read whole
MAX_STOP_STRINGS = 4  # OpenAI's limit
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
                404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 503: "server_error"}
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "function-before"}


@dataclass
class ServerState:
    """What the endpoints need: the engine and its registry, the tokenizer, limits and metrics."""

    engine: Engine
    registry: AdapterRegistry
    tokenizer: Any
    base_id: str
    base_path: str
    max_context: int
    max_tokens_limit: int
    vocab_size: int
    eos_ids: frozenset[int]
    chat_stop_ids: frozenset[int] = frozenset()  # the chat template's end of turn, where it is its own token
    chat_stop_text: list[str] = field(default_factory=list)  # the same as text, where it is not
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), e.status, headers=e.headers)


class Guard:
    """ASGI middleware in front of everything: the API key (constant-time comparison) on every path but
    /health, and a cap on the request body's size."""

    def __init__(self, app: Any, api_key: str | None):
        self.app, self.key = app, (api_key or "").encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                message = "Incorrect API key provided" if token else "Missing API key: send 'Authorization: Bearer KEY'"
                return await JSONResponse(error_body(401, message, code="invalid_api_key"), 401,
                                          headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return await JSONResponse(error_body(413, f"request body over {MAX_BODY_BYTES} bytes"), 413)(
                scope, receive, send)
        return await self.app(scope, receive, send)


def _param(loc: tuple) -> str | None:
    parts = []
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, str) and (p in _UNION_TAGS or "[" in p):
            break
        parts.append(str(p))
    return ".".join(parts) or None


def _validation_message(err: dict) -> str:
    param = _param(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})"
    if kind == "extra_forbidden":
        return f"unknown field {param!r}: not a parameter this server supports"
    if kind == "missing":
        return f"{param} is required"
    if kind in ("model_type", "dict_type") and param is None:
        return "the body must be a JSON object"
    return f"{param}: {err.get('msg')}" if param else str(err.get("msg"))


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving ``state``'s model. Its lifespan starts and stops the engine thread."""
    engine, registry, tokenizer = state.engine, state.registry, state.tokenizer
    state.metrics = state.metrics or Metrics(lambda: engine.queue_depth, lambda: engine.batch_size,
                                             lambda: len(registry.loaded))
    metrics = state.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def dispatch(events: list[tuple[Request, Output]]) -> None:
            for req, out in events:
                req.sink.put_nowait(out)

        engine.deliver = lambda events: loop.call_soon_threadsafe(dispatch, events)
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, 30.0)  # SIGTERM: uvicorn has drained in-flight requests by now

    app = FastAPI(title="lorakit serve", version="1", lifespan=lifespan,
                  description="One base model, many LoRA adapters, one OpenAI-compatible endpoint.")
    errors = {code: {"model": s.ErrorResponse} for code in (400, 401, 404, 429)}

    @app.exception_handler(ApiError)
    async def _api_error(request: HttpRequest, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HttpRequest, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        param = None if first.get("type") == "json_invalid" else _param(tuple(first.get("loc", ())))
        return error_response(ApiError(400, _validation_message(first), param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: HttpRequest, e: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(ApiError(e.status_code, message.get(e.status_code, str(e.detail)),
                                       headers=getattr(e, "headers", None)))

    # --- models and adapters ----------------------------------------------------------------------------

    def card(name: str, path: object) -> s.ModelCard:
        if name == state.base_id:
            return s.ModelCard(id=name, created=state.created, root=state.base_path)
        return s.ModelCard(id=name, created=state.created, root=str(path), parent=state.base_id)

    @app.get("/health", response_model=s.Health, tags=["server"])
    async def health() -> s.Health:
        return s.Health(status="ok", running=engine.batch_size, waiting=engine.queue_depth)

    @app.get("/metrics", tags=["server"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, 401: errors[401]})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=s.ModelList, responses={401: errors[401]}, tags=["models"])
    async def list_models() -> s.ModelList:
        adapters = dict(registry.paths)  # a snapshot: an adapter may be deleted meanwhile
        return s.ModelList(data=[card(state.base_id, None)] + [card(n, p) for n, p in adapters.items()])

    @app.get("/v1/models/{model_id:path}", response_model=s.ModelCard, responses={401: errors[401], 404: errors[404]},
             tags=["models"])
    async def get_model(model_id: str) -> s.ModelCard:
        path = registry.paths.get(model_id)
        if model_id != state.base_id and path is None:
            raise ApiError(404, f"The model {model_id!r} does not exist", "model", "model_not_found")
        return card(model_id, path)

    adapter_errors = {code: {"model": s.ErrorResponse} for code in (400, 401, 403, 409)}

    @app.post("/v1/adapters", response_model=s.ModelCard, responses=adapter_errors, tags=["models"])
    async def load_adapter(body: s.AdapterLoadRequest) -> s.ModelCard:
        try:
            await asyncio.to_thread(registry.add, body.name, body.path)
        except AdapterError as e:
            raise ApiError(e.status, str(e), e.param or "path") from None
        except LorakitError as e:  # from the PEFT reader (bad config, a pickle, shapes): the files' fault
            raise ApiError(400, str(e), "path") from None
        except Exception as e:  # a malformed file that gets past the reader's checks (an r that is not a number)
            raise ApiError(400, f"could not load the adapter: {type(e).__name__}: {e}", "path") from None
        return card(body.name, registry.paths.get(body.name))

    @app.delete("/v1/adapters/{name:path}", response_model=s.Deleted, responses={401: errors[401], 404: errors[404]},
                tags=["models"])
    async def unload_adapter(name: str) -> s.Deleted:
        try:
            await asyncio.to_thread(registry.remove, name)
        except AdapterError as e:
            raise ApiError(e.status, str(e), "name", "model_not_found") from None
        return s.Deleted(id=name, deleted=True)

    # --- generation -------------------------------------------------------------------------------------

    stream_200 = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}

    @app.post("/v1/chat/completions", response_model=s.ChatCompletion, responses={**stream_200, **errors},
              tags=["generation"])
    async def chat_completions(body: s.ChatCompletionRequest, request: HttpRequest) -> Response:
        adapter = _adapter_for(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        try:
            text = chat_prompt(tokenizer, messages)
        except Exception as e:  # the template refused the conversation (e.g. roles must alternate)
            raise ApiError(400, f"the chat template refused these messages: {e}", "messages") from None
        prompt = encode_prompt(tokenizer, text)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return await _generate(request, body, adapter, prompt, asked, "messages", top, chat=True)

    @app.post("/v1/completions", response_model=s.Completion, responses={**stream_200, **errors},
              tags=["generation"])
    async def completions(body: s.CompletionRequest, request: HttpRequest) -> Response:
        adapter = _adapter_for(body.model)
        if body.echo:
            raise ApiError(400, "echo is not supported", "echo")
        prompt: Any = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (send a request per prompt)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = encode_prompt(tokenizer, prompt)
        else:
            ids = list(prompt)
            if any(not 0 <= t < state.vocab_size for t in ids):
                raise ApiError(400, f"token ids must be in [0, {state.vocab_size})", "prompt")
        return await _generate(request, body, adapter, ids, body.max_tokens, "prompt", body.logprobs, chat=False)

    def _adapter_for(model: str) -> str | None:
        if model == state.base_id:
            return None
        if model in registry.paths:
            return model
        metrics.requests.labels("unknown", "404").inc()
        raise ApiError(404, f"The model {model!r} does not exist; GET /v1/models lists the base and its adapters",
                       "model", "model_not_found")

    def _limit(asked: int | None, prompt_len: int, prompt_param: str) -> int:
        room = state.max_context - prompt_len
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {state.max_context} tokens; the "
                           f"{prompt_param} take {prompt_len}", prompt_param, "context_length_exceeded")
        if asked is None:
            return min(room, state.max_tokens_limit)
        if asked > state.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {asked}; this server allows at most {state.max_tokens_limit} "
                           "(--max-tokens-limit)", "max_tokens")
        if asked > room:
            raise ApiError(400, f"This model's maximum context length is {state.max_context} tokens; you asked "
                           f"for {prompt_len + asked} ({prompt_len} in the {prompt_param}, {asked} in the "
                           "completion)", "max_tokens", "context_length_exceeded")
        return asked

    async def _generate(request: HttpRequest, body: s._Sampling, adapter: str | None, prompt: list[int],
                        asked: int | None, prompt_param: str, logprobs: int | None, chat: bool) -> Response:
        if not prompt:
            raise ApiError(400, f"the {prompt_param} is empty and the tokenizer has no bos token to start from",
                           prompt_param)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", "stop")
        params = SamplingParams(max_tokens=_limit(asked, len(prompt), prompt_param),
                                temperature=1.0 if body.temperature is None else body.temperature,
                                top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, logprobs=logprobs)
        stop_ids = state.eos_ids | (state.chat_stop_ids if chat else frozenset())
        req = Request(prompt, params, adapter, stop_ids, sink=asyncio.Queue())
        name = body.model
        try:
            engine.submit(req)
        except QueueFull:
            if engine.stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down") from None
            metrics.requests.labels(name, "429").inc()
            raise ApiError(429, f"the queue is full ({engine.max_queue} requests waiting); retry shortly",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        gen = _Generation(state, req, name, TextStream(tokenizer, stop + (state.chat_stop_text if chat else [])),
                          chat, time.perf_counter())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(gen, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_cancel_on_disconnect(request, gen))
        try:
            async for _ in gen.pieces():
                pass
        finally:
            watcher.cancel()
        if gen.cancelled:
            return Response(status_code=499)  # nobody is listening
        return JSONResponse(jsonable_encoder(gen.response(), exclude_none=False))

    async def _cancel_on_disconnect(request: HttpRequest, gen: _Generation) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        gen.cancel()

    async def _sse(gen: _Generation, include_usage: bool) -> AsyncIterator[str]:
        try:
            async for delta, lps, finish in gen.pieces():
                yield "data: " + json.dumps(gen.chunk(delta, lps, finish)) + "\n\n"
            if include_usage:
                yield "data: " + json.dumps(gen.usage_chunk()) + "\n\n"
        except ApiError as e:  # the headers are out already: the error travels as an event
            yield "data: " + json.dumps(error_body(e.status, e.message, e.param, e.code)) + "\n\n"
        finally:
            gen.cancel()  # a no-op once finished; else the client went away mid-stream
        yield "data: [DONE]\n\n"

    app.openapi = lambda: _openapi_without_422(app)
    app.add_middleware(Guard, api_key=state.api_key)
    return app


class _Generation:
    """One request as the API sees it: text pieces, logprobs, usage, latency metrics, its final response."""

    def __init__(self, state: ServerState, req: Request, model: str, text: TextStream, chat: bool, start: float):
        self.state, self.req, self.model, self.text, self.chat = state, req, model, text, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.start = self.last = start
        self.tokens: list[tuple[int, float | None, list[tuple[int, float]] | None]] = []
        self.content = ""
        self.finish: str | None = None
        self.cancelled = False

    async def pieces(self) -> AsyncIterator[tuple[str, list, str | None]]:
        """(new text, the tokens' logprob entries, finish reason or None) as tokens arrive."""
        m = self.state.metrics
        while self.finish is None and not self.cancelled:
            out: Output = await self.req.sink.get()
            now = time.perf_counter()
            delta, entries = "", []
            if out.token is not None and not self.text.stopped:
                (m.itl if self.tokens else m.ttft).observe(now - (self.last if self.tokens else self.start))
                self.last = now
                self.tokens.append((out.token, out.logprob, out.top_logprobs))
                entries.append(self.tokens[-1])
                delta = self.text.add(out.token)
            if self.text.stopped:
                self.finish = "stop"
                self.state.engine.cancel(self.req)  # the stop string ended it: free the slot now
            elif out.finish in ("stop", "length"):
                delta += self.text.finish()
                self.finish = out.finish
            elif out.finish == "error":
                self._count(str(out.status))
                raise ApiError(out.status, out.error or "generation failed")
            elif out.finish == "cancelled":
                self.cancelled = True
                return
            self.content += delta
            if self.finish is not None:
                self._count("200")
            if delta or entries or self.finish is not None:
                yield delta, entries, self.finish

    def cancel(self) -> None:
        if self.finish is None and not self.cancelled:
            self.cancelled = True
            self.state.engine.cancel(self.req)
            self._count("499")

    def _count(self, status: str) -> None:
        m = self.state.metrics
        m.requests.labels(self.model, status).inc()
        m.prompt_tokens.labels(self.model).inc(len(self.req.prompt))
        m.completion_tokens.labels(self.model).inc(self.completion_tokens)

    @property
    def completion_tokens(self) -> int:
        return self.text.tokens_used

    def usage(self) -> s.Usage:
        n, m = len(self.req.prompt), self.completion_tokens
        return s.Usage(prompt_tokens=n, completion_tokens=m, total_tokens=n + m)

    def _token_text(self, token: int) -> str:
        return self.state.tokenizer.decode([token])

    def _chat_logprobs(self, entries: list) -> s.ChatLogprobs | None:
        if self.req.params.logprobs is None:
            return None
        content = []
        for token, lp, top in entries:
            t = self._token_text(token)
            tops = [s.TopLogprob(token=self._token_text(i), logprob=v, bytes=list(self._token_text(i).encode()))
                    for i, v in top or []]
            content.append(s.TokenLogprob(token=t, logprob=lp, bytes=list(t.encode()), top_logprobs=tops))
        return s.ChatLogprobs(content=content)

    def _completion_logprobs(self, entries: list, offset: int) -> s.CompletionLogprobs | None:
        if self.req.params.logprobs is None:
            return None
        texts = [self._token_text(t) for t, _, _ in entries]
        offsets = []
        for t in texts:
            offsets.append(offset)
            offset += len(t)
        return s.CompletionLogprobs(
            tokens=texts, token_logprobs=[lp for _, lp, _ in entries],
            top_logprobs=[{self._token_text(i): v for i, v in top or []} for _, _, top in entries],
            text_offset=offsets)

    def response(self) -> s.ChatCompletion | s.Completion:
        if self.chat:
            choice = s.ChatChoice(index=0, message=s.AssistantMessage(content=self.content),
                                  logprobs=self._chat_logprobs(self.tokens), finish_reason=self.finish)
            return s.ChatCompletion(id=self.id, created=self.created, model=self.model, choices=[choice],
                                    usage=self.usage())
        choice = s.CompletionChoice(index=0, text=self.content, logprobs=self._completion_logprobs(self.tokens, 0),
                                    finish_reason=self.finish)
        return s.Completion(id=self.id, created=self.created, model=self.model, choices=[choice], usage=self.usage())

    def chunk(self, delta: str, entries: list, finish: str | None) -> dict:
        base = {"id": self.id, "created": self.created, "model": self.model}
        if self.chat:
            d: dict[str, Any] = {"content": delta}
            if not getattr(self, "_role_sent", False):
                d["role"], self._role_sent = "assistant", True
            lps = self._chat_logprobs(entries)
            return {**base, "object": "chat.completion.chunk", "choices": [{
                "index": 0, "delta": d, "logprobs": lps.model_dump() if lps else None, "finish_reason": finish}]}
        lps = self._completion_logprobs(entries, len(self.content) - len(delta))
        return {**base, "object": "text_completion", "choices": [{
            "index": 0, "text": delta, "logprobs": lps.model_dump() if lps else None, "finish_reason": finish}]}

    def usage_chunk(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "created": self.created, "model": self.model, "object": kind, "choices": [],
                "usage": self.usage().model_dump()}


def _openapi_without_422(app: FastAPI) -> dict:
    """FastAPI's schema, less the 422 responses it adds by itself: this server answers bad input with 400."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema
