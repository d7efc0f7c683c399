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
from codellm.engine import prompts
from codellm.engine.manager import ModelManager, Served
from codellm.engine.sampling import TokenLogprob
from codellm.engine.outputs import Output
from codellm.engine.streams import AsyncStream, closing
from codellm.engine import grammar
from codellm.engine.tools import ToolCallParser, args_key, check_tools, forced_call, parse_all, tool_format
from codellm.errors import CodellmError, InvalidName, InvalidRequest, NotFound
from codellm.server.errors import error_body
from codellm.server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, SamplingFields, dumps

FINGERPRINT = f"codellm-{__version__}"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def manager_of(request: Request) -> ModelManager:
    return request.app.state.manager


async def served_model(request: Request, name: str) -> Served:
    """The loaded model, counted as busy until ``release``: keep-alive never unloads it mid-request."""
    manager = manager_of(request)
    try:
        served = manager.ready(name)  # loaded already: no disk, no thread hop
        if served is None:
            manager.registry.get(name)
            served = await asyncio.to_thread(manager.get, name)
    except (InvalidName, NotFound):
        raise NotFound(f"The model `{name}` does not exist.", param="model") from None
    served.active += 1
    return served


def release(request: Request, served: Served) -> None:
    served.active -= 1
    manager_of(request).touch(served)


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
        logprobs=logprobs, ignore_eos=data.ignore_eos or None,
    )


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def cached_tokens(by_choice: dict[int, int], n: int) -> int:
    """Prompt tokens read from the prefix cache, once per prompt (its first choice's count) of ``n`` choices each."""
    return sum(count for index, count in by_choice.items() if index % n == 0)


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


async def watch_disconnect(request: Request, stream: AsyncStream) -> None:
    """Non-streaming requests: cancel the generation if the client hangs up while waiting."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stream.cancel()
            return


async def collect(request: Request, stream: AsyncStream, choices: int) -> list[list[Output]]:
    results: list[list[Output]] = [[] for _ in range(choices)]
    watcher = asyncio.create_task(watch_disconnect(request, stream))
    try:
        async for out in stream:
            results[out.index].append(out)
            if out.finish_reason == "error":
                raise CodellmError(f"generation failed: {out.error}")
    finally:
        watcher.cancel()
        stream.cancel()
    return results


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


def _released(request: Request, served: Served, stream: AsyncStream, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A stream body that cancels what is still generating and marks its model idle again when it ends, however
    it ends (see ``closing``)."""
    def cleanup() -> None:
        stream.cancel()
        release(request, served)

    return closing(events, cleanup)


def _sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def _error_event(out: Output) -> bytes:
    return _sse(error_body(f"generation failed: {out.error}", "server_error", "internal_error"))


@post("/v1/chat/completions", status_code=200, summary="Chat completion (OpenAI)")
async def chat_completions(request: Request, data: ChatCompletionRequest) -> Response:
    return await _guarded(request, data, _chat)


async def _guarded(request: Request, data, handler) -> Response:
    """Run ``handler`` with the model counted busy; a failure before a response marks it idle again
    (a stream marks it idle when it ends)."""
    served = await served_model(request, data.model)
    try:
        return await handler(request, data, served)
    except BaseException:
        release(request, served)
        raise


async def _chat(request: Request, data: ChatCompletionRequest, served: Served) -> Response:
    served.generator()
    lm = served.lm
    messages = [msg_to_dict(m) for m in data.messages]
    tools = check_tools(data.tools) if data.tools and data.tool_choice != "none" else None
    forced = _forced_tool(data.tool_choice, tools)
    size = sum(len(str(m.get("content") or "")) for m in messages) + (len(str(tools)) if tools else 0)
    prompt = await prompts.render_off_loop(size, prompts.chat_prompt, lm, messages, tools=tools)
    fmt = tool_format(lm.tokenizer.chat_template, lm.config.family) if tools else None
    lead = tail = ""
    if forced is not None:  # the turn starts inside a call; the model completes its JSON, constrained
        head, start, tail = forced_call(fmt, forced or None)
        prompt = prompt + prompts.encode(lm, head + start, add_special_tokens=False)
        lead = head + start
    single_call = data.parallel_tool_calls is False
    logprobs = (data.top_logprobs or 0) if data.logprobs else None
    max_tokens = data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens
    params = served.sampling(sampling_overrides(data, max_tokens, logprobs))
    if data.response_format and data.response_format.type == "json_object":
        params.grammar = grammar.json_schema(None)
    elif data.response_format and data.response_format.type == "json_schema":
        params.grammar = grammar.json_schema(response_schema(data.response_format.json_schema))
    if forced is not None:  # the call's arguments follow the tool's parameter schema
        params.grammar, params.grammar_prefix = grammar.tool_call(tools, forced or None, args_key(fmt)), start
    stream = AsyncStream().add(served.generator(), prompt, params, n=data.n, lm=lm)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    tok = lm.tokenizer
    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        return Stream(_released(request, served, stream, coalesce(_chat_events(stream, data, rid, created, tok, len(prompt),
                                                                        include_usage, fmt, single_call, lead, tail), stream)),
                      media_type="text/event-stream", headers=SSE_HEADERS)
    results = await collect(request, stream, data.n)
    release(request, served)
    choices, completion = [], 0
    for index, outs in enumerate(results):
        completion += outs[-1].completion_tokens
        infos = [i for o in outs for i in o.logprobs]
        text, finish = "".join(o.text for o in outs), outs[-1].finish_reason
        if lead:
            text = lead + text + tail
        message: dict = {"role": "assistant", "content": text}
        if fmt:
            content, calls = parse_all(text, fmt)
            if calls:
                calls = calls[:1] if single_call else calls
                message = {"role": "assistant", "content": content.strip() or None, "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
                    for c in calls]}
                finish = "tool_calls"
        choices.append({
            "index": index, "message": message,
            "logprobs": chat_logprobs(tok, infos) if logprobs is not None else None,
            "finish_reason": finish,
        })
    return Response({
        "id": rid, "object": "chat.completion", "created": created, "model": data.model,
        "system_fingerprint": FINGERPRINT, "choices": choices,
        "usage": usage(len(prompt), completion, cached_tokens({i: o[-1].cached_tokens for i, o in enumerate(results)}, data.n)),
    })


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


async def _chat_events(stream: AsyncStream, data: ChatCompletionRequest, rid: str, created: int, tok,
                       n_prompt: int, include_usage: bool, fmt: str | None = None,
                       single_call: bool = False, lead: str = "", tail: str = "") -> AsyncIterator[bytes]:
    """SSE chunks of a chat completion; ``lead`` and ``tail`` wrap each choice's text for the tool-call parser
    (a forced call: see ``forced_call``)."""
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": data.model,
            "system_fingerprint": FINGERPRINT}
    extra = {"usage": None} if include_usage else {}
    completion = [0] * data.n
    cached: dict[int, int] = {}
    want_lp = data.logprobs

    def chunk(index: int, delta: dict, finish: str | None = None, lp: dict | None = None) -> bytes:
        return _sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}], **extra})

    for index in range(data.n):
        yield chunk(index, {"role": "assistant", "content": ""})
    parsers = [ToolCallParser(fmt) for _ in range(data.n)] if fmt else None
    calls_sent = [0] * data.n

    def tool_deltas(index: int, events: list) -> list[bytes]:
        """Text as content deltas; each call as a first delta (id, type, name) then its arguments."""
        sent = []
        for kind, value in events:
            if kind == "text":
                if value:
                    sent.append(chunk(index, {"content": value}))
            elif not (single_call and calls_sent[index]):
                k = calls_sent[index]
                calls_sent[index] += 1
                sent.append(chunk(index, {"tool_calls": [{"index": k, "id": value.id, "type": "function",
                                                          "function": {"name": value.name, "arguments": ""}}]}))
                sent.append(chunk(index, {"tool_calls": [{"index": k, "function": {"arguments": value.arguments_json}}]}))
        return sent

    for index, parser in enumerate(parsers if lead else []):  # a forced call: its opening was in the prompt
        for event in tool_deltas(index, parser.feed(lead)):
            yield event
    async for out in stream:
        if out.finish_reason == "error":
            yield _error_event(out)
            return
        completion[out.index] = out.completion_tokens
        cached[out.index] = out.cached_tokens
        lp = chat_logprobs(tok, out.logprobs) if want_lp and out.logprobs else None
        if parsers is not None:
            parser = parsers[out.index]
            text = out.text
            if out.finish_reason:
                text += tail
            events = parser.feed(text) if text else []
            if out.finish_reason:
                events += parser.finish()
            for event in tool_deltas(out.index, events):
                yield event
            if out.finish_reason:
                finish = "tool_calls" if calls_sent[out.index] else out.finish_reason
                yield chunk(out.index, {}, finish, lp)
            continue
        if out.finish_reason:
            yield chunk(out.index, {"content": out.text} if out.text else {}, out.finish_reason, lp)
        elif out.text or lp:
            yield chunk(out.index, {"content": out.text}, None, lp)
    if include_usage:
        yield _sse({**base, "choices": [], "usage": usage(n_prompt, sum(completion), cached_tokens(cached, data.n))})
    yield DONE


@post("/v1/completions", status_code=200, summary="Text completion and fill-in-the-middle (OpenAI)")
async def completions(request: Request, data: CompletionRequest) -> Response:
    return await _guarded(request, data, _completions)


async def _completions(request: Request, data: CompletionRequest, served: Served) -> Response:
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
    encoded = [await prompts.render_off_loop((len(p) if isinstance(p, str) else 0) + len(data.suffix or ""), prompts.completion_prompt, lm, p, data.suffix)
               for p in prompt_list]
    for ids in encoded:
        served.generator().check_prompt(len(ids), lm)
    params = served.sampling(sampling_overrides(data, data.max_tokens if data.max_tokens is not None else 16, data.logprobs))
    if data.suffix is not None and lm.fim:
        params.stop = list(params.stop) + [s for s in lm.fim.stop if s not in params.stop]
    stream = AsyncStream()
    for p_index, ids in enumerate(encoded):
        stream.add(served.generator(), ids, params, n=data.n, offset=p_index * data.n, lm=lm,
                   prompt_logprobs=data.echo and data.logprobs is not None)
    # the prompts as text, which only an echo shows
    texts = [p if isinstance(p, str) or not data.echo else lm.tokenizer.decode(p) for p in prompt_list]
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    n_prompt = sum(len(ids) for ids in encoded)
    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        return Stream(_released(request, served, stream, coalesce(_completion_events(stream, data, rid, created, lm.tokenizer,
                                                                             texts, encoded, n_prompt, include_usage),
                                                          stream)),
                      media_type="text/event-stream", headers=SSE_HEADERS)
    results = await collect(request, stream, len(prompt_list) * data.n)
    release(request, served)
    choices, completion = [], 0
    for index, outs in enumerate(results):
        p_index = index // data.n
        completion += outs[-1].completion_tokens
        text = "".join(o.text for o in outs)
        prefix = texts[p_index] if data.echo else ""
        lp = None
        if data.logprobs is not None:
            plp = outs[0].prompt_logprobs if data.echo else None
            prompt_part = list(zip(encoded[p_index], plp or [])) if plp else []
            lp = completion_logprobs(lm.tokenizer, [i for o in outs for i in o.logprobs], prompt_part)
        choices.append({"index": index, "text": prefix + text, "logprobs": lp, "finish_reason": outs[-1].finish_reason})
    return Response({
        "id": rid, "object": "text_completion", "created": created, "model": data.model,
        "system_fingerprint": FINGERPRINT, "choices": choices,
        "usage": usage(n_prompt, completion, cached_tokens({i: o[-1].cached_tokens for i, o in enumerate(results)}, data.n)),
    })


async def _completion_events(stream, data: CompletionRequest, rid, created, tok, texts, encoded, n_prompt, include_usage):
    base = {"id": rid, "object": "text_completion", "created": created, "model": data.model,
            "system_fingerprint": FINGERPRINT}
    extra = {"usage": None} if include_usage else {}
    completion: dict[int, int] = {}
    cached: dict[int, int] = {}
    # where each choice's next token starts in its text (the echoed prompt comes first)
    offset = {i: len(texts[i // data.n]) if data.echo else 0 for i in range(len(texts) * data.n)}

    def chunk(index: int, text: str, finish: str | None, lp: dict | None = None) -> bytes:
        return _sse({**base, "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}], **extra})

    if data.echo:
        for index in range(len(texts) * data.n):
            yield chunk(index, texts[index // data.n], None)
    async for out in stream:
        if out.finish_reason == "error":
            yield _error_event(out)
            return
        completion[out.index] = out.completion_tokens
        cached[out.index] = out.cached_tokens
        lp = None
        if data.logprobs is not None and out.logprobs:
            lp = completion_logprobs(tok, out.logprobs, start=offset[out.index])
            offset[out.index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
        if out.finish_reason or out.text or lp:
            yield chunk(out.index, out.text, out.finish_reason, lp)
    if include_usage:
        yield _sse({**base, "choices": [], "usage": usage(n_prompt, sum(completion.values()), cached_tokens(cached, data.n))})
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
async def embeddings(request: Request, data: EmbeddingRequest) -> dict:
    import struct

    from codellm.engine.embeddings import embed_served, shorten

    served = await served_model(request, data.model)
    try:
        texts = [data.input] if isinstance(data.input, str) else list(data.input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidRequest("input must be a string or a list of strings", param="input")
        vectors, n = await asyncio.to_thread(embed_served, served, texts, truncate=False)
    finally:
        release(request, served)
    vectors = shorten(vectors, data.dimensions)
    if data.encoding_format == "base64":  # float32 little-endian, what openai-node asks for by default
        items = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
    else:
        items = vectors
    return {"object": "list", "model": data.model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
            "usage": {"prompt_tokens": n, "total_tokens": n}}


ROUTES = [chat_completions, completions, list_models, get_model, embeddings]
