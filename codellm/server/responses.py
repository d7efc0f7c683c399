"""OpenAI's Responses API (``/v1/responses``), for agents built on it (Codex style): a codec over the neutral chat
pipeline. ``input`` (a string, or message / function_call / function_call_output items), ``instructions``, function
``tools``, ``tool_choice``, ``max_output_tokens``, and ``stream`` with the semantic events the ``openai`` SDK's
``responses.stream`` assembles. ``previous_response_id`` continues a stored conversation: responses are kept in
memory, the newest ``STORE_SIZE`` of them, for ``STORE_SECONDS``.
"""

from __future__ import annotations

import collections
import json
import threading
import time
import uuid
from typing import Annotated, Any, AsyncIterator

import msgspec
from litestar import Request, Response, get, post
from litestar.response import Stream
from msgspec import Meta, Struct

from codellm.errors import InvalidRequest, NotFound
from codellm.server.openai import SSE_HEADERS
from codellm.server.pinning import Pins
from codellm.server.pipeline import ChatTurn, Delta, block_text, collect, generate
from codellm.server.schemas import Seed

STORE_SIZE, STORE_SECONDS = 1000, 3600.0


class ResponsesRequest(Struct, kw_only=True):
    model: Annotated[str, Meta(max_length=300)]
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    seed: Seed | None = None  # not OpenAI's: for reproducible runs against this server
    speculative: bool | None = None  # False: no speculative decoding for this request (as on the other OpenAI routes)


class Store:
    """Finished conversations by response id, the newest ``size`` for ``seconds`` each."""

    def __init__(self, size: int = STORE_SIZE, seconds: float = STORE_SECONDS):
        self.size, self.seconds = size, seconds
        self._items: collections.OrderedDict[str, tuple[float, list[dict], dict]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, rid: str, messages: list[dict], response: dict) -> None:
        with self._lock:
            self._items[rid] = (time.monotonic() + self.seconds, messages, response)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, rid: str) -> tuple[list[dict], dict]:
        with self._lock:
            item = self._items.get(rid)
            if item is None or item[0] < time.monotonic():
                self._items.pop(rid, None)
                raise NotFound(f"no stored response with id {rid!r} (responses are kept {self.seconds:g} s)",
                               param="previous_response_id", code="response_not_found")
            return item[1], item[2]


# -- requests into a chat turn --------------------------------------------------------------------------------------
def _items(items: list[dict]) -> list[dict]:
    out: list[dict] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") in ("user", "assistant", "system", "developer"):
            role = "system" if item["role"] == "developer" else item["role"]
            out.append({"role": role, "content": block_text(item.get("content"), f"input.{i}.content", "input")})
        elif kind == "function_call" and isinstance(item.get("name"), str):
            call = {"id": str(item.get("call_id") or ""), "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant":  # the calls of one turn go with its text, in one message
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id") or ""),
                        "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue
        else:
            raise InvalidRequest(f"input.{i}: item type {kind!r} is not supported (message, function_call, "
                                 "function_call_output)", param="input")
    return out


# tools that OpenAI's platform runs itself, which clients such as Codex list beside their function tools
HOSTED_TOOLS = {"web_search", "web_search_preview", "file_search", "code_interpreter", "image_generation",
                "computer_use_preview", "mcp", "local_shell"}


def _tools(data: ResponsesRequest) -> tuple[list[dict] | None, str | None]:
    tools = []
    for i, tool in enumerate(data.tools or []):
        if tool.get("type") in HOSTED_TOOLS:  # run by OpenAI's servers, not by a model: nothing here can run them
            continue
        if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"tools.{i}: only function tools are supported ({{type: function, name, ...}})",
                                 param="tools")
        tools.append({"type": "function", "function": {"name": tool["name"], "description": tool.get("description") or "",
                                                       "parameters": tool.get("parameters") or {"type": "object"}}})
    choice = data.tool_choice
    if not tools or choice == "none":
        if choice == "required" or isinstance(choice, dict):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return None, None
    names = [t["function"]["name"] for t in tools]
    if choice in (None, "auto"):
        return tools, None
    if choice == "required":
        return tools, names[0] if len(names) == 1 else ""
    name = choice.get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if name not in names:
        raise InvalidRequest(f"tool_choice must be none, auto, required or a function among the tools, not {choice!r}",
                             param="tool_choice")
    return tools, name


def turn_of(data: ResponsesRequest, history: list[dict]) -> ChatTurn:
    messages = list(history)
    if data.instructions:  # instructions apply to this turn only, as the system message
        messages = [m for m in messages if m["role"] != "system"]
        messages.insert(0, {"role": "system", "content": data.instructions})
    messages += [{"role": "user", "content": data.input}] if isinstance(data.input, str) else _items(data.input)
    tools, forced = _tools(data)
    sampling = {"max_tokens": data.max_output_tokens, "temperature": data.temperature, "top_p": data.top_p,
                "seed": data.seed, "speculative": data.speculative}
    return ChatTurn(messages, tools, forced, sampling, data.parallel_tool_calls is not False)


# -- responses ------------------------------------------------------------------------------------------------------
def _text_item(text: str) -> dict:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(call) -> dict:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": call.id, "name": call.name,
            "arguments": call.arguments_json, "status": "completed"}


def _response(data: ResponsesRequest, rid: str, created: int, output: list, final: Delta | None, status: str) -> dict:
    incomplete = final is not None and final.finish == "length"
    return {
        "id": rid, "object": "response", "created_at": created, "model": data.model,
        "status": "incomplete" if incomplete else status, "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": data.instructions, "metadata": data.metadata or {}, "previous_response_id": data.previous_response_id,
        "tools": data.tools or [], "tool_choice": data.tool_choice or "auto",
        "parallel_tool_calls": data.parallel_tool_calls is not False, "temperature": data.temperature,
        "top_p": data.top_p, "max_output_tokens": data.max_output_tokens, "text": {"format": {"type": "text"}},
        "usage": None if final is None else {
            "input_tokens": final.prompt_tokens, "output_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens,
            "input_tokens_details": {"cached_tokens": final.cached_tokens}, "output_tokens_details": {"reasoning_tokens": 0}},
    }


def _history(turn: ChatTurn, output: list[dict]) -> list[dict]:
    """The conversation after this turn, as the next turn's history."""
    reply: dict = {"role": "assistant", "content": "".join(p["text"] for o in output if o["type"] == "message"
                                                             for p in o["content"])}
    calls = [{"id": o["call_id"], "type": "function", "function": {"name": o["name"], "arguments": o["arguments"]}}
             for o in output if o["type"] == "function_call"]
    if calls:
        reply["tool_calls"] = calls
    return turn.messages + [reply]


def _output(deltas: list[Delta]) -> tuple[list[dict], Delta | None]:
    output: list[dict] = []
    final = None
    for d in deltas:
        if d.kind == "text":
            if output and output[-1]["type"] == "message":
                output[-1]["content"][0]["text"] += d.text
            else:
                output.append(_text_item(d.text))
        elif d.kind == "call":
            output.append(_call_item(d.call))
        else:
            final = d
    return output, final


async def _events(data, rid: str, created: int, gen, store: Store | None, turn: ChatTurn) -> AsyncIterator[bytes]:
    seq = [0]

    def event(kind: str, **fields) -> bytes:
        seq[0] += 1
        return b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode(
            {"type": kind, "sequence_number": seq[0] - 1, **fields}) + b"\n\n"

    yield event("response.created", response=_response(data, rid, created, [], None, "in_progress"))
    yield event("response.in_progress", response=_response(data, rid, created, [], None, "in_progress"))
    output: list[dict] = []
    text_open = False

    def close_text() -> list[bytes]:
        item = output[-1]
        text = item["content"][0]["text"]
        index = len(output) - 1
        return [event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0, text=text),
                event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                      part=item["content"][0]),
                event("response.output_item.done", output_index=index, item=item)]

    final = None
    async for d in gen.deltas():
        if d.kind == "text":
            if not text_open:
                output.append(_text_item(""))
                item, index = output[-1], len(output) - 1
                yield event("response.output_item.added", output_index=index, item={**item, "status": "in_progress",
                                                                                    "content": []})
                yield event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": []})
                text_open = True
            output[-1]["content"][0]["text"] += d.text
            yield event("response.output_text.delta", item_id=output[-1]["id"], output_index=len(output) - 1,
                        content_index=0, delta=d.text)
        elif d.kind == "call":
            if text_open:
                for chunk in close_text():
                    yield chunk
                text_open = False
            item = _call_item(d.call)
            output.append(item)
            index = len(output) - 1
            yield event("response.output_item.added", output_index=index, item={**item, "arguments": "",
                                                                                "status": "in_progress"})
            yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                        delta=item["arguments"])
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        arguments=item["arguments"])
            yield event("response.output_item.done", output_index=index, item=item)
        elif d.finish == "error":
            yield event("error", code="server_error", message=f"generation failed: {d.error}", param=None)
            return
        else:
            final = d
    if text_open:
        for chunk in close_text():
            yield chunk
    body = _response(data, rid, created, output, final, "completed")
    if store is not None:
        store.put(rid, _history(turn, output), body)
    yield event("response.incomplete" if body["status"] == "incomplete" else "response.completed", response=body)


def _store(request: Request) -> Store:
    return request.app.state.responses


@post("/v1/responses", status_code=200, summary="Create a response (OpenAI Responses API)")
async def create_response(request: Request, data: ResponsesRequest, pins: Pins) -> Response:
    store = _store(request)
    history = store.get(data.previous_response_id)[0] if data.previous_response_id else []
    turn = turn_of(data, history)
    served = await pins.get(data.model)
    gen = await generate(served, turn)
    rid, created = f"resp_{uuid.uuid4().hex[:24]}", int(time.time())
    keep = store if data.store else None
    if data.stream:
        return Stream(pins.streamed(served, gen.stream, _events(data, rid, created, gen, keep, turn)),
                      media_type="text/event-stream", headers=SSE_HEADERS)
    deltas = await collect(request, gen)
    output, final = _output(deltas)
    body = _response(data, rid, created, output, final, "completed")
    if keep is not None:
        keep.put(rid, _history(turn, output), body)
    return Response(body)


@get("/v1/responses/{response_id:str}", summary="A stored response (OpenAI Responses API)")
async def get_response(request: Request, response_id: str) -> dict:
    return _store(request).get(response_id)[1]


ROUTES = [create_response, get_response]
