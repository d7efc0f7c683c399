"""OpenAI request bodies as msgspec Structs: validated at the edge, unknown fields ignored
(clients send plenty of them)."""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

Temperature = Annotated[float, Meta(ge=0, le=2)]
Probability = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
Positive = Annotated[int, Meta(ge=1)]
NonNegative = Annotated[int, Meta(ge=0)]
Seed = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]


NULL_MEANS_DEFAULT = ("n", "stream", "ignore_eos", "logprobs", "echo")


class StreamOptions(Struct):
    include_usage: bool = False


class ResponseFormat(Struct):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class ChatMessage(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class SamplingFields(Struct, kw_only=True):
    model: str
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: NonNegative | None = None
    min_p: Probability | None = None
    n: Annotated[int, Meta(ge=1, le=16)] | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: NonNegative | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Meta(gt=0, le=10)] | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100, le=100)]] | None = None
    seed: Seed | None = None
    user: str | None = None
    ignore_eos: bool | None = False
    speculative: bool | None = None  # False: no speculative decoding for this request (where the server offers it)

    def __post_init__(self) -> None:
        """An explicit null means the default (the OpenAI spec allows null here; wrappers forward None)."""
        for name, default in _null_defaults(type(self)):
            if getattr(self, name) is None:
                setattr(self, name, default)


@functools.cache
def _null_defaults(cls: type) -> tuple[tuple[str, Any], ...]:
    """``cls``'s fields where null means the default, with their defaults: read once a class (reading a struct's
    fields evaluates its annotations, a cost every request paid)."""
    return tuple((f.name, f.default) for f in msgspec.structs.fields(cls) if f.name in NULL_MEANS_DEFAULT)


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: NonNegative | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: str | list[str | int | list[int]]
    suffix: str | None = None
    echo: bool | None = False
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    best_of: int | None = None


def dumps(obj: Any) -> bytes:
    """Compact JSON: one object per SSE ``data:`` line, as strict client parsers want."""
    return msgspec.json.encode(obj)


class EmbeddingRequest(Struct, kw_only=True):
    model: str
    input: str | list[Any]  # a string, strings, token ids, or lists of token ids (``embeddings.inputs``)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None
