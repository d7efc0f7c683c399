"""Ollama request bodies as msgspec Structs: every field typed at the edge (a wrong type is a 400 in Ollama's
shape, not a failure deeper in), unknown fields ignored as Ollama ignores them, and the served OpenAPI schema
shows what each route takes."""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta, Struct, field

Name = Annotated[str, Meta(max_length=300)]
KeepAlive = str | float | None  # a duration ("5m", "-1") or seconds
TokenId = Annotated[int, Meta(ge=0, lt=1 << 31)]


class Named(Struct, kw_only=True):
    """Ollama takes ``model``, and the older ``name`` that some clients still send."""

    model: Name | None = None
    name: Name | None = None


class ToolCallFunction(Struct):
    name: str
    arguments: dict[str, Any] | str = {}


class ToolCall(Struct):
    function: ToolCallFunction
    id: str | None = None
    type: str | None = None


class Message(Struct, kw_only=True):
    role: Annotated[str, Meta(max_length=32)]
    content: str = ""
    tool_calls: list[ToolCall] | None = None
    name: str | None = None
    tool_name: str | None = None
    images: list[str] | None = None
    thinking: str | None = None


class Generation(Named, kw_only=True):
    options: dict[str, Any] | None = None
    think: bool | str | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    stream: bool = True


class GenerateRequest(Generation, kw_only=True):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    context: Annotated[list[TokenId], Meta(max_length=1 << 20)] | None = None
    images: list[str] | None = None


class ChatRequest(Generation, kw_only=True):
    messages: list[Message] = []
    tools: list[dict[str, Any]] | None = None


class ShowRequest(Named, kw_only=True):
    verbose: bool = False


class PullRequest(Named, kw_only=True):
    stream: bool = True
    insecure: bool = False


class CreateRequest(Named, kw_only=True):
    modelfile: str | None = None
    from_: str | None = field(default=None, name="from")
    parameters: dict[str, Any] | None = None
    template: str | None = None
    system: str | None = None
    messages: list[Message] | None = None
    license: str | list[str] | None = None
    files: dict[str, str] | None = None  # filename -> digest of a blob uploaded through /api/blobs
    adapters: dict[str, str] | None = None  # the same, for an adapter's files
    stream: bool = True


class CopyRequest(Struct, kw_only=True):
    source: Name
    destination: Name


class DeleteRequest(Named, kw_only=True):
    pass


class EmbedRequest(Named, kw_only=True):
    input: str | list[str] = []
    truncate: bool = True
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    dimensions: Annotated[int, Meta(ge=1)] | None = None


class EmbeddingsRequest(Named, kw_only=True):
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
