"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions (with FIM).

Streams are SSE with one compact JSON object per ``data:`` line, no comments, and ``data: [DONE]``
last; the response ends right after it. A client that goes away cancels its generation.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any, AsyncIterator

from litestar import Request, Response, get, post
from litestar.response import Stream

from codellm import __version__
from codellm.engine import grammar, prompts
from codellm.engine.manager import ModelManager
from codellm.engine.sampling import TokenLogprob
from codellm.engine.streams import AsyncStream
from codellm.engine.tools import check_tools
from codellm.errors import InvalidName, InvalidRequest, NotFound
from codellm.server.errors import error_body
from codellm.server.pinning import Pins
from codellm.server.pipeline import ChatTurn, Generation, TextTurn, choices, collect, generate
from codellm.server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, SamplingFields, dumps

FINGERPRINT = f"codellm-{__version__}"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def manager_of(request: Request) -> ModelManager:
    return request.app.state.manager


def sampling_overrides(data: SamplingFields, max_tokens: int | None, logprobs: int | None) -> dict:
    bias = None
    if data.logit_bias:
        try:
            bias = {int(k): float(v) for k, v in data.logit_bias.items()}
        except ValueError:
            raise InvalidRequest("logit_bias keys must be token ids", param="logit_bias") from None
    stop = [data.stop] if isinstance(data.stop, str) else data.stop
    if stop is not None and len(stop) > 64:
        raise InvalidRequest("at most 64 stop sequences", param="stop")
    return dict(
        temperature=data.temperature, top_p=data.top_p, top_k=data.top_k, min_p=data.min_p, seed=data.seed,
        presence_penalty=data.presence_penalty, frequency_penalty=data.frequency_penalty,
        repetition_penalty=data.repetition_penalty, logit_bias=bias, max_tokens=max_tokens, stop=stop,
        logprobs=logprobs, ignore_eos=data.ignore_eos or None, speculative=data.speculative,
    )


def usage(prompt: int, completion: int, cached: int = 0, drafted: int = 0, accepted: int = 0) -> dict:
    """OpenAI's usage; speculative drafts are counted as its predicted-output tokens are (kept, and not)."""
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}}
    if drafted:
        out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                            "rejected_prediction_tokens": drafted - accepted}
    return out


def _token_text(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def chat_logprobs(tok, infos: list[TokenLogprob]) -> dict:
    def entry(tid: int, lp: float) -> dict:
        text = _token_text(tok, tid)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**entry(i.token_id, i.logprob), "top_logprobs": [entry(t, v) for t, v in i.top]} for i in infos]}


def completion_logprobs(tok, infos: list[TokenLogprob], prompt: list[tuple[int, float | None]] = (), start: int = 0) -> dict:
    """Legacy-completions logprobs; ``text_offset`` counts characters from the start of the choice's text
    (``start``: where these tokens begin, for stream chunks after the first)."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = start
    for tid, lp in prompt:
        text = _token_text(tok, tid)
        tokens.append(text), lps.append(lp), tops.append(None), offsets.append(pos)
        pos += len(text)
    for info in infos:
        text = _token_text(tok, info.token_id)
        tokens.append(text), lps.append(info.logprob), offsets.append(pos)
        tops.append({_token_text(tok, t): v for t, v in info.top} or None)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def coalesce(events: AsyncIterator[bytes], stream: AsyncStream) -> AsyncIterator[bytes]:
    """Send events that are ready together in one write: when the event loop falls behind the engine
    (hundreds of streams), each stream catches up in one send instead of one per token."""
    held: list[bytes] = []
    async for event in events:
        held.append(event)
        if not stream.has_pending():
            yield b"".join(held)
            held = []
    if held:
        yield b"".join(held)


def _sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def _error_event(error: str | None) -> bytes:
    return _sse(error_body(f"generation failed: {error}", "server_error", "internal_error"))


@post("/v1/chat/completions", status_code=200, summary="Chat completion (OpenAI)")
async def chat_completions(request: Request, data: ChatCompletionRequest, pins: Pins) -> Response:
    served = await pins.get(data.model)
    tools = check_tools(data.tools) if data.tools and data.tool_choice != "none" else None
    logprobs = (data.top_logprobs or 0) if data.logprobs else None
    max_tokens = data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens
    turn = ChatTurn([msg_to_dict(m) for m in data.messages], tools, _forced_tool(data.tool_choice, tools),
                    sampling_overrides(data, max_tokens, logprobs), parallel_calls=data.parallel_tool_calls is not False,
                    n=data.n, grammar=response_grammar(data.response_format))
    gen = await generate(served, turn)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    tok = served.lm.tokenizer
    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        events = _chat_events(gen, data, rid, created, tok, include_usage)
        return Stream(pins.streamed(served, gen.stream, coalesce(events, gen.stream)), media_type="text/event-stream",
                      headers=SSE_HEADERS)
    answers = choices(gen, await collect(request, gen))
    body = []
    for index, c in enumerate(answers):
        message: dict = {"role": "assistant", "content": c.text}
        if c.calls:
            message = {"role": "assistant", "content": c.text.strip() or None, "tool_calls": [
                {"id": k.id, "type": "function", "function": {"name": k.name, "arguments": k.arguments_json}}
                for k in c.calls]}
        body.append({"index": index, "message": message,
                     "logprobs": chat_logprobs(tok, c.logprobs) if logprobs is not None else None,
                     "finish_reason": c.final.finish})
    return Response({
        "id": rid, "object": "chat.completion", "created": created, "model": data.model,
        "system_fingerprint": FINGERPRINT, "choices": body,
        "usage": usage(gen.prompt_tokens, *gen.counts([c.final for c in answers])),
    })


def response_grammar(fmt) -> str | None:
    """What ``response_format`` holds the reply to: any JSON object, a JSON schema, or nothing (text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return grammar.json_schema(None)
    return grammar.json_schema(response_schema(fmt.json_schema))


def response_schema(spec: dict | None) -> dict:
    """The schema of ``response_format: json_schema`` (``{"name", "schema", "strict"}``): required, as OpenAI
    requires it."""
    schema = (spec or {}).get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object", param="response_format")
    return schema


def _forced_tool(choice, tools: list | None) -> str | None:
    """``tool_choice`` as the call the output must be: a function name, "" for any of the tools (``required``;
    the only one when there is one), or None (the model decides)."""
    if choice in (None, "auto", "none"):
        return None
    if not tools:
        raise InvalidRequest("tool_choice needs tools", param="tool_choice")
    names = [(t.get("function") or {}).get("name") for t in tools]
    if choice == "required":
        return names[0] if len(names) == 1 else ""
    name = ((choice.get("function") or {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function"
            else None)
    if not isinstance(name, str):
        raise InvalidRequest('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                             '{"name": ...}}', param="tool_choice")
    if name not in names:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return name


def msg_to_dict(m) -> dict:
    out: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.content}
    for key in ("name", "tool_calls", "tool_call_id"):
        if getattr(m, key) is not None:
            out[key] = getattr(m, key)
    return out


async def _chat_events(gen: Generation, data: ChatCompletionRequest, rid: str, created: int, tok,
                       include_usage: bool) -> AsyncIterator[bytes]:
    """SSE chunks of a chat completion: each call as a first delta (id, type, name), then its arguments."""
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": data.model,
            "system_fingerprint": FINGERPRINT}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish: str | None = None, lp: dict | None = None) -> bytes:
        return _sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}], **extra})

    for index in range(data.n):
        yield chunk(index, {"role": "assistant", "content": ""})
    calls = [0] * data.n
    finals = []
    async for d in gen.deltas():
        lp = chat_logprobs(tok, d.logprobs) if data.logprobs and d.logprobs else None
        if d.kind == "text":
            yield chunk(d.index, {"content": d.text}, None, lp)
        elif d.kind == "call":
            k, calls[d.index] = calls[d.index], calls[d.index] + 1
            yield chunk(d.index, {"tool_calls": [{"index": k, "id": d.call.id, "type": "function",
                                                  "function": {"name": d.call.name, "arguments": ""}}]}, None, lp)
            yield chunk(d.index, {"tool_calls": [{"index": k, "function": {"arguments": d.call.arguments_json}}]})
        elif d.finish == "error":
            yield _error_event(d.error)
            return
        else:
            finals.append(d)
            yield chunk(d.index, {}, d.finish)
    if include_usage:
        yield _sse({**base, "choices": [], "usage": usage(gen.prompt_tokens, *gen.counts(finals))})
    yield DONE


@post("/v1/completions", status_code=200, summary="Text completion and fill-in-the-middle (OpenAI)")
async def completions(request: Request, data: CompletionRequest, pins: Pins) -> Response:
    served = await pins.get(data.model)
    served.generator()
    lm = served.lm
    raw = data.prompt
    if isinstance(raw, str) or (raw and all(isinstance(t, int) for t in raw)):
        prompt_list: list = [raw]
    elif all(isinstance(p, str) for p in raw) or all(isinstance(p, list) for p in raw):
        prompt_list = list(raw)
    else:
        raise InvalidRequest("prompt must be a string, a list of strings, a list of token ids, or a list of those lists",
                             param="prompt")
    if not prompt_list or any(p in ("", []) for p in prompt_list) and data.suffix is None:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if data.echo and data.suffix is not None:
        raise InvalidRequest("echo and suffix cannot be used together", param="echo")
    if len(prompt_list) * data.n > 64:
        raise InvalidRequest("at most 64 choices per request", param="n")
    encoded = [await prompts.render_off_loop((len(p) if isinstance(p, str) else 0) + len(data.suffix or ""),
                                             prompts.completion_prompt, lm, p, data.suffix) for p in prompt_list]
    max_tokens = data.max_tokens if data.max_tokens is not None else 16
    gen = await generate(served, TextTurn(encoded, sampling_overrides(data, max_tokens, data.logprobs), data.n,
                                          fim=data.suffix is not None, prompt_logprobs=data.echo and data.logprobs is not None))
    # the prompts as text, which only an echo shows
    texts = [p if isinstance(p, str) or not data.echo else lm.tokenizer.decode(p) for p in prompt_list]
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        events = _completion_events(gen, data, rid, created, lm.tokenizer, texts, include_usage)
        return Stream(pins.streamed(served, gen.stream, coalesce(events, gen.stream)), media_type="text/event-stream",
                      headers=SSE_HEADERS)
    answers = choices(gen, await collect(request, gen))
    body = []
    for index, c in enumerate(answers):
        lp = None
        if data.logprobs is not None:
            prompt_part = list(zip(gen.prompt_of(index), c.prompt_logprobs)) if data.echo and c.prompt_logprobs else []
            lp = completion_logprobs(lm.tokenizer, c.logprobs, prompt_part)
        prefix = texts[index // data.n] if data.echo else ""
        body.append({"index": index, "text": prefix + c.text, "logprobs": lp, "finish_reason": c.final.finish})
    return Response({
        "id": rid, "object": "text_completion", "created": created, "model": data.model,
        "system_fingerprint": FINGERPRINT, "choices": body,
        "usage": usage(gen.prompt_tokens, *gen.counts([c.final for c in answers])),
    })


async def _completion_events(gen: Generation, data: CompletionRequest, rid, created, tok, texts, include_usage):
    base = {"id": rid, "object": "text_completion", "created": created, "model": data.model,
            "system_fingerprint": FINGERPRINT}
    extra = {"usage": None} if include_usage else {}
    # where each choice's next token starts in its text (the echoed prompt comes first)
    offset = {i: len(texts[i // data.n]) if data.echo else 0 for i in range(gen.choices)}

    def chunk(index: int, text: str, finish: str | None, lp: dict | None = None) -> bytes:
        return _sse({**base, "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}], **extra})

    if data.echo:
        for index in range(gen.choices):
            yield chunk(index, texts[index // data.n], None)
    finals = []
    async for d in gen.deltas():
        if d.finish == "error":
            yield _error_event(d.error)
            return
        if d.kind == "finish":
            finals.append(d)
            yield chunk(d.index, "", d.finish)
            continue
        lp = None
        if data.logprobs is not None and d.logprobs:
            lp = completion_logprobs(tok, d.logprobs, start=offset[d.index])
            offset[d.index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
        yield chunk(d.index, d.text, None, lp)
    if include_usage:
        yield _sse({**base, "choices": [], "usage": usage(gen.prompt_tokens, *gen.counts(finals))})
    yield DONE


def model_card(entry, max_len: int | None = None) -> dict:
    c = entry.manifest.config
    card = {"id": str(entry.name), "object": "model", "created": int(entry.modified), "owned_by": "codellm",
            "root": c.source or str(entry.name), "parent": c.base,
            "max_model_len": max_len or c.context_length}
    return card


@get("/v1/models", summary="List models")
async def list_models(request: Request) -> dict:
    manager = manager_of(request)
    loaded = manager.loaded()
    entries = manager.registry.list()
    return {"object": "list", "data": [
        model_card(e, loaded[str(e.name)].lm.max_len if str(e.name) in loaded else None)
        for e in entries
    ]}


@get("/v1/models/{model_id:path}", summary="Describe a model")
async def get_model(request: Request, model_id: str) -> dict:
    manager = manager_of(request)
    name = model_id.lstrip("/")
    try:
        entry = manager.registry.get(name)
    except (InvalidName, NotFound):
        raise NotFound(f"The model `{name}` does not exist.", param="model") from None
    loaded = manager.loaded().get(str(entry.name))
    return model_card(entry, loaded.lm.max_len if loaded else None)


@post("/v1/embeddings", status_code=200, summary="Embeddings (OpenAI)")
async def embeddings(request: Request, data: EmbeddingRequest, pins: Pins) -> dict:
    import struct

    from codellm.engine.embeddings import embed_served, inputs, shorten

    served = await pins.get(data.model)
    vectors, n = await asyncio.to_thread(embed_served, served, inputs(data.input), truncate=False)
    vectors = shorten(vectors, data.dimensions)
    if data.encoding_format == "base64":  # float32 little-endian, what openai-node asks for by default
        items = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
    else:
        items = vectors
    return {"object": "list", "model": data.model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
            "usage": {"prompt_tokens": n, "total_tokens": n}}


ROUTES = [chat_completions, completions, list_models, get_model, embeddings]
