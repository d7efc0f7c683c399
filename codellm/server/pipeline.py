"""A chat turn in no API's words, and its generation as a stream of deltas: a dialect translates its request into
a ``ChatTurn``, takes ``Delta``s out, and writes them in its own shape (the way Ollama's OpenAI middleware turns
OpenAI requests into its native chat).

The turn is rendered through the model's chat template (in the bounded sandbox), a forced tool call starts the
turn inside the family's call syntax with the arguments decoded under the JSON constraint, and the family's tool
calls are parsed out of the text as it streams.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

from codellm.engine import grammar, prompts
from codellm.engine.manager import Served
from codellm.engine.streams import AsyncStream
from codellm.engine.tools import ToolCall, ToolCallParser, args_key, check_tools, forced_call, tool_format
from codellm.errors import InvalidRequest


TEXT_BLOCKS = ("text", "input_text", "output_text")  # what each dialect calls a block of plain text


def block_text(content, where: str, param: str) -> str:
    """The text of a message's content: a string, or a list of text blocks (anything else is refused)."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in TEXT_BLOCKS and isinstance(block.get("text"), str):
            parts.append(block["text"])
        else:
            raise InvalidRequest(f"{where}: content of type {kind!r} is not supported here (text only)", param=param)
    return "".join(parts)


@dataclass
class ChatTurn:
    messages: list[dict]  # role, content, and tool_calls / tool_call_id / name where they apply
    tools: list[dict] | None = None  # {"type": "function", "function": {name, description, parameters}}
    forced: str | None = None  # a tool the turn must call: its name, "" for any of them; None: the model decides
    sampling: dict = field(default_factory=dict)  # SamplingParams fields
    parallel_calls: bool = True


@dataclass
class Delta:
    kind: str  # text | call | finish
    text: str = ""
    call: ToolCall | None = None
    finish: str | None = None  # stop | length | tool_calls | error
    stop: str | None = None  # the stop sequence that ended it
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from the prefix cache


@dataclass
class Generation:
    stream: AsyncStream
    prompt_tokens: int
    fmt: str | None
    lead: str
    tail: str
    parallel: bool

    async def deltas(self) -> AsyncIterator[Delta]:
        parser = ToolCallParser(self.fmt) if self.fmt else None
        calls = 0

        def events(text: str, final: bool) -> list[tuple]:
            if parser is None:
                return [("text", text)] if text else []
            out = parser.feed(text) if text else []
            return out + (parser.finish() if final else [])

        pending = events(self.lead, False) if self.lead else []
        completion = 0
        async for out in self.stream:
            completion = out.completion_tokens
            if out.finish_reason == "error":
                yield Delta("finish", finish="error", error=out.error, prompt_tokens=self.prompt_tokens,
                            completion_tokens=completion)
                return
            final = out.finish_reason is not None
            for kind, value in pending + events(out.text + (self.tail if final else ""), final):
                if kind == "text" and value:
                    yield Delta("text", text=value)
                elif kind == "call" and (self.parallel or calls == 0):
                    calls += 1
                    yield Delta("call", call=value)
            pending = []
            if final:
                finish = "tool_calls" if calls else out.finish_reason
                yield Delta("finish", finish=finish, stop=out.stop, prompt_tokens=self.prompt_tokens,
                            completion_tokens=completion, cached_tokens=out.cached_tokens)


async def collect(request, gen: "Generation") -> list[Delta]:
    """Every delta of a turn answered whole (not streamed); a client that hangs up meanwhile cancels it."""
    from codellm.server.openai import watch_disconnect

    watcher = asyncio.create_task(watch_disconnect(request, gen.stream))
    try:
        return [d async for d in gen.deltas()]
    finally:
        watcher.cancel()
        gen.stream.cancel()


async def prompt_of(served: Served, turn: ChatTurn) -> tuple[list[int], str | None, str, str, str]:
    """(prompt ids, tool-call format, and for a forced call: the text the turn starts with, the JSON object's start
    within it, and the text that closes the call) of a turn."""
    lm = served.lm
    tools = check_tools(turn.tools)
    size = sum(len(str(m.get("content") or "")) for m in turn.messages) + (len(str(tools)) if tools else 0)
    ids = await prompts.render_off_loop(size, prompts.chat_prompt, lm, turn.messages, tools=tools)
    fmt = tool_format(lm.tokenizer.chat_template, lm.config.family) if tools else None
    lead = start = tail = ""
    if turn.forced is not None and fmt:
        head, start, tail = forced_call(fmt, turn.forced or None)
        ids = ids + prompts.encode(lm, head + start, add_special_tokens=False)
        lead = head + start
    return ids, fmt, lead, start, tail


async def generate(served: Served, turn: ChatTurn) -> Generation:
    """Start the turn on the model's engine (one choice)."""
    engine = served.generator()
    ids, fmt, lead, start, tail = await prompt_of(served, turn)
    engine.check_prompt(len(ids), served.lm)
    params = served.sampling(turn.sampling)
    if lead:  # the model completes the call's JSON object, its arguments held to the tool's parameter schema
        params.grammar = grammar.tool_call(check_tools(turn.tools), turn.forced or None, args_key(fmt))
        params.grammar_prefix = start
    stream = AsyncStream().add(engine, ids, params, lm=served.lm)
    return Generation(stream, len(ids), fmt, lead, tail, turn.parallel_calls)
