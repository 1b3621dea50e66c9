"""The OpenAI API's request and response bodies that ``lorakit serve`` implements, as pydantic models (they
also make the server's /openapi.json). Requests are strict, as OpenAI's API is: a string where a number
belongs, or a field this server does not know, is a 400 naming the field, not a silent coercion."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str = Field(description="the base model's id, or an adapter's name (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="default: what fits in the context, up to "
                                   "--max-tokens-limit")
    temperature: float | None = Field(None, ge=0, le=2, description="0 (default): greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=1, description="only 1")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the answer (not included)")
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] = Field(description="text, token ids, or a list of one text")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = Field(False, description="only false")


class AdapterLoadRequest(_Request):
    name: str = Field(description="the model id requests will use")
    path: str = Field(description="adapter folder, relative to --adapter-dir")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[TokenLogprob] | None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lorakit"
    root: str | None = None
    parent: str | None = Field(None, description="the base model's id, for an adapter")


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Deleted(_Response):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


class Health(_Response):
    status: Literal["ok"]
    running: int
    waiting: int


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Response):
    error: ErrorDetail
