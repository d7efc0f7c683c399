"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``), for agents built on it: a codec over
the neutral chat pipeline. Requests are translated into a ``ChatTurn`` (system, text, ``tool_use`` and
``tool_result`` blocks, tools and ``tool_choice``), and deltas come back as Anthropic's message or its event stream
(``message_start``, ``content_block_*``, ``message_delta``, ``message_stop``, ``ping``), as the ``anthropic`` SDK
parses them. Errors have Anthropic's shape, from this router's own handlers.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, AsyncIterator, Literal

import msgspec
from litestar import Request, Response, Router, post
from litestar.response import Stream
from msgspec import Meta, Struct

from codellm.errors import InvalidRequest, QueueFull
from codellm.server.errors import ANTHROPIC_TYPES, Shape, handlers
from codellm.server.openai import SSE_HEADERS
from codellm.server.pinning import Pins
from codellm.server.pipeline import ChatTurn, Delta, block_text, collect, generate, prompt_of
from codellm.server.schemas import Seed


class ToolChoice(Struct, kw_only=True):
    type: Literal["auto", "any", "tool", "none"] = "auto"
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Tool(Struct, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    description: str | None = None
    input_schema: dict[str, Any] = {}
    type: str | None = None  # custom tools only


class Message(Struct, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class CountTokensRequest(Struct, kw_only=True):
    model: Annotated[str, Meta(max_length=300)]
    messages: list[Message]
    system: str | list[dict[str, Any]] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


class MessagesRequest(CountTokensRequest, kw_only=True):
    max_tokens: Annotated[int, Meta(ge=1)]
    stop_sequences: Annotated[list[str], Meta(max_length=64)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    seed: Seed | None = None  # not Anthropic's: for reproducible runs against this server
    speculative: bool | None = None  # not Anthropic's: False turns speculative decoding off for this request


# -- requests into a chat turn --------------------------------------------------------------------------------------
def _messages(data: CountTokensRequest) -> list[dict]:
    out: list[dict] = []
    if data.system:
        out.append({"role": "system", "content": block_text(data.system, "system", "system")})
    for i, m in enumerate(data.messages):
        where = f"messages.{i}.content"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text, calls = [], []
        for j, block in enumerate(m.content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                text.append(block["text"])
            elif kind == "tool_use" and m.role == "assistant" and isinstance(block.get("name"), str):
                calls.append({"id": str(block.get("id") or ""), "type": "function",
                              "function": {"name": block["name"], "arguments": block.get("input") or {}}})
            elif kind == "tool_result" and m.role == "user":
                content = block.get("content")
                result = block_text(content, f"{where}.{j}.content", "messages") if content is not None else ""
                if block.get("is_error"):
                    result = f"Error: {result}"
                out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id") or ""), "content": result})
            elif kind in ("thinking", "redacted_thinking") and m.role == "assistant":
                continue  # earlier reasoning: not part of what the model reads again
            else:
                raise InvalidRequest(f"{where}.{j}: block type {kind!r} is not supported in a {m.role} message "
                                     "(text, tool_use, tool_result)", param=where)
        if text or calls or m.role == "assistant":
            message: dict = {"role": m.role, "content": "".join(text)}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
    return out


def _tools(data: CountTokensRequest) -> tuple[list[dict] | None, str | None, bool]:
    """(tools, the forced call, parallel calls allowed)."""
    choice = data.tool_choice or ToolChoice()
    if not data.tools or choice.type == "none":
        if choice.type in ("any", "tool"):
            raise InvalidRequest(f"tool_choice {choice.type!r} needs tools", param="tool_choice")
        return None, None, True
    # server tools (web search, code execution: a ``type`` other than custom) run on Anthropic's side, and nothing
    # here runs them: they are left out, as a model here could only call them into the void
    own = [t for t in data.tools if t.type in (None, "custom")]
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                               "parameters": t.input_schema or {"type": "object"}}} for t in own] or None
    names = [t.name for t in own]
    if tools is None:
        if choice.type in ("any", "tool"):
            raise InvalidRequest(f"tool_choice {choice.type!r} needs tools this server can run", param="tool_choice")
        return None, None, True
    forced = None
    if choice.type == "any":
        forced = names[0] if len(names) == 1 else ""
    elif choice.type == "tool":
        if choice.name not in names:
            raise InvalidRequest(f"tool_choice names {choice.name!r}, which is not among the tools", param="tool_choice")
        forced = choice.name
    return tools, forced, not choice.disable_parallel_tool_use


def turn_of(data: MessagesRequest) -> ChatTurn:
    tools, forced, parallel = _tools(data)
    sampling = {"max_tokens": data.max_tokens, "temperature": data.temperature, "top_p": data.top_p,
                "top_k": data.top_k, "stop": data.stop_sequences, "seed": data.seed, "speculative": data.speculative}
    return ChatTurn(_messages(data), tools, forced, sampling, parallel)


# -- responses ------------------------------------------------------------------------------------------------------
def _usage(d: Delta) -> dict:
    # Anthropic counts tokens read from the cache apart from input_tokens
    return {"input_tokens": d.prompt_tokens - d.cached_tokens, "output_tokens": d.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": d.cached_tokens}


def _stop_reason(d: Delta) -> str:
    if d.finish == "tool_calls":
        return "tool_use"
    if d.finish == "length":
        return "max_tokens"
    return "stop_sequence" if d.stop else "end_turn"


def _tool_use(call) -> dict:
    return {"type": "tool_use", "id": f"toolu_{call.id.removeprefix('call_')}", "name": call.name,
            "input": call.arguments if isinstance(call.arguments, dict) else {}}


def _event(kind: str, obj: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode({"type": kind, **obj}) + b"\n\n"


async def _events(gen, message: dict) -> AsyncIterator[bytes]:
    yield _event("message_start", {"message": {**message, "content": [], "stop_reason": None, "stop_sequence": None,
                                               "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": 0,
                                                         "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}})
    yield _event("ping", {})
    index, open_text = 0, False
    async for d in gen.deltas():
        if d.kind == "text":
            if not open_text:
                yield _event("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
                open_text = True
            yield _event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": d.text}})
        elif d.kind == "call":
            if open_text:
                yield _event("content_block_stop", {"index": index})
                index, open_text = index + 1, False
            block = _tool_use(d.call)
            yield _event("content_block_start", {"index": index, "content_block": {**block, "input": {}}})
            yield _event("content_block_delta", {"index": index, "delta": {"type": "input_json_delta",
                                                                            "partial_json": json.dumps(block["input"])}})
            yield _event("content_block_stop", {"index": index})
            index += 1
        elif d.finish == "error":
            yield _event("error", {"error": {"type": "api_error", "message": f"generation failed: {d.error}"}})
            return
        else:
            if open_text:
                yield _event("content_block_stop", {"index": index})
            yield _event("message_delta", {"delta": {"stop_reason": _stop_reason(d), "stop_sequence": d.stop},
                                           "usage": _usage(d)})  # the cache's share is known only now
            yield _event("message_stop", {})


@post("/messages", status_code=200, summary="Create a message (Anthropic Messages API)")
async def messages(request: Request, data: MessagesRequest, pins: Pins) -> Response:
    served = await pins.get(data.model)
    gen = await generate(served, turn_of(data))
    message = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": data.model}
    if data.stream:
        return Stream(pins.streamed(served, gen.stream, _events(gen, message)), media_type="text/event-stream",
                      headers=SSE_HEADERS)
    deltas = await collect(request, gen)
    content: list[dict] = []
    final = Delta("finish", finish="stop", prompt_tokens=gen.prompt_tokens)
    for d in deltas:
        if d.kind == "text":
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += d.text
            else:
                content.append({"type": "text", "text": d.text})
        elif d.kind == "call":
            content.append(_tool_use(d.call))
        else:
            final = d
    return Response({**message, "content": content, "stop_reason": _stop_reason(final), "stop_sequence": final.stop,
                     "usage": _usage(final)})


@post("/messages/count_tokens", status_code=200, summary="Count the tokens of a message (Anthropic Messages API)")
async def count_tokens(request: Request, data: CountTokensRequest, pins: Pins) -> dict:
    served = await pins.get(data.model)
    tools, forced, _ = _tools(data)
    ids, *_ = await prompt_of(served, ChatTurn(_messages(data), tools, forced))
    return {"input_tokens": len(ids)}


# -- errors in Anthropic's shape, for this router's routes ------------------------------------------------------------


class AnthropicShape(Shape):
    """``{"type": "error", "error": {"type", "message"}}``, the type named after the status."""

    def body(self, status, message, type_, code=None, param=None) -> dict:
        kind = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    def headers(self, exc) -> dict:
        return {"Retry-After": "1"} if isinstance(exc, QueueFull) else {}

    def invalid(self, detail, param) -> dict:
        return self.body(400, f"{param}: {detail}" if param else detail, "invalid_request_error")


ROUTER = Router(path="/v1", route_handlers=[messages, count_tokens], exception_handlers=handlers(AnthropicShape()))
