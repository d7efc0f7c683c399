"""Endpoints that editor plugins use beyond the OpenAI core: llama.cpp's ``/infill`` (llama.vim),
Mistral's ``/v1/fim/completions``, and rerank (``/v1/rerank``, ``/rerank``; Continue reads ``data``,
vLLM-style clients read ``results``: both are sent)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Any, AsyncIterator

from litestar import Request, Response, post
from litestar.response import Stream
from msgspec import Meta, Struct

from codellm.engine import prompts
from codellm.engine.manager import Served
from codellm.engine.streams import AsyncStream
from codellm.errors import InvalidRequest
from codellm.server.schemas import Seed
from codellm.server.openai import (
    DONE, FINGERPRINT, SSE_HEADERS, _released, _sse, collect, manager_of, release, served_model, usage,
)


class ExtraChunk(Struct):
    text: str
    filename: str = ""


class InfillRequest(Struct, kw_only=True):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = []
    prompt: str = ""
    n_predict: int = -1
    temperature: Annotated[float, Meta(ge=0)] | None = None
    top_k: Annotated[int, Meta(ge=-1)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    seed: Seed | None = None
    stop: list[str] | None = None
    stream: bool = False
    model: str | None = None


def default_model(request: Request, name: str | None) -> str:
    """Clients that send no model get the one the server was started with (or the only one loaded)."""
    if name:
        return name
    manager = manager_of(request)
    pinned = [k for k, s in manager.loaded().items() if s.expires_at is None and s.engine is not None]
    loaded = [k for k, s in manager.loaded().items() if s.engine is not None]
    if pinned or loaded:
        return (pinned or loaded)[0]
    raise InvalidRequest("no model given and none loaded: start the server with --model NAME", param="model")


def infill_text(served: Served, prefix: str, suffix: str, extra: list[ExtraChunk]) -> str:
    """llama.cpp's infill prompt: repository context as files (where the family has file separators),
    then prefix/suffix/middle in the family's FIM spelling."""
    lm = served.lm
    context = ""
    specials = set(getattr(lm.tokenizer, "added_tokens_encoder", {}) or {})
    if extra:
        if "<|file_sep|>" in specials:
            context = ("<|repo_name|>myproject\n" if "<|repo_name|>" in specials else "") + "".join(
                f"<|file_sep|>{c.filename}\n{c.text}" for c in extra) + "<|file_sep|>\n"
        elif "<file_sep>" in specials:
            context = "".join(f"<file_sep>{c.filename}\n{c.text}" for c in extra) + "<file_sep>\n"
    return context + prompts.fim_text(lm, prefix, suffix)


@post("/infill", status_code=200, summary="Fill in the middle (llama.cpp server API, as llama.vim sends it)")
async def infill(request: Request, data: InfillRequest) -> Response:
    served = await served_model(request, default_model(request, data.model))
    try:
        engine = served.generator()
        lm = served.lm
        t0 = time.perf_counter()
        ids = prompts.encode(lm, infill_text(served, data.input_prefix + data.prompt, data.input_suffix, data.input_extra))
        engine.check_prompt(len(ids), lm)
        settings = {"n_predict": data.n_predict, "temperature": data.temperature, "top_k": data.top_k, "top_p": data.top_p}
        if data.n_predict == 0:  # llama.vim's warm-up request: nothing to generate
            release(request, served)
            return Response(_infill_body(lm.name, "", 0, len(ids), t0, t0, "limit", settings))
        params = served.sampling({
            "temperature": data.temperature, "top_k": data.top_k, "top_p": data.top_p, "min_p": data.min_p,
            "seed": data.seed, "max_tokens": data.n_predict if data.n_predict > 0 else None,
            "stop": list(data.stop or []) + [s for s in (lm.fim.stop if lm.fim else ()) if s not in (data.stop or [])],
        })
        stream = AsyncStream().add(engine, ids, params, lm=lm)
    except BaseException:
        release(request, served)
        raise
    if data.stream:
        async def events() -> AsyncIterator[bytes]:
            first = None
            async for out in stream:
                first = first or time.perf_counter()
                if out.finish_reason:
                    yield _sse(_infill_body(lm.name, out.text, out.completion_tokens, len(ids), t0, first,
                                            "eos" if out.finish_reason == "stop" else "limit", settings))
                elif out.text:
                    yield _sse({"index": 0, "content": out.text, "stop": False})

        return Stream(_released(request, served, stream, events()), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        results = await collect(request, stream, 1)
    finally:
        release(request, served)
    outs = results[0]
    first = stream.first_at or time.perf_counter()
    return Response(_infill_body(lm.name, "".join(o.text for o in outs), outs[-1].completion_tokens, len(ids), t0, first,
                                 "eos" if outs[-1].finish_reason == "stop" else "limit", settings))


def _infill_body(model: str, content: str, predicted: int, evaluated: int, t0: float, first: float, stop_type: str,
                 settings: dict) -> dict:
    now = time.perf_counter()
    prompt_ms, predicted_ms = (first - t0) * 1000, (now - first) * 1000
    return {
        "index": 0, "content": content, "id_slot": 0, "stop": True, "model": model, "tokens_predicted": predicted,
        "tokens_evaluated": evaluated, "generation_settings": settings, "has_new_line": "\n" in content,
        "truncated": False, "stop_type": stop_type, "stopping_word": "", "tokens_cached": 0,
        "timings": {"prompt_n": evaluated, "prompt_ms": round(prompt_ms, 3),
                    "prompt_per_token_ms": round(prompt_ms / max(1, evaluated), 3),
                    "prompt_per_second": round(evaluated / max(1e-9, prompt_ms / 1000), 2),
                    "predicted_n": predicted, "predicted_ms": round(predicted_ms, 3),
                    "predicted_per_token_ms": round(predicted_ms / max(1, predicted), 3),
                    "predicted_per_second": round(predicted / max(1e-9, predicted_ms / 1000), 2)},
    }


class FimRequest(Struct, kw_only=True):
    model: str
    prompt: str
    suffix: str | None = ""
    max_tokens: Annotated[int, Meta(ge=0)] | None = None
    min_tokens: int | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    stop: str | list[str] | None = None
    random_seed: Seed | None = None
    seed: Seed | None = None
    stream: bool = False


@post("/v1/fim/completions", status_code=200, summary="Fill in the middle (Mistral/Codestral API)")
async def fim_completions(request: Request, data: FimRequest) -> Response:
    served = await served_model(request, data.model)
    try:
        engine = served.generator()
        lm = served.lm
        ids = prompts.encode(lm, prompts.fim_text(lm, data.prompt, data.suffix or ""))
        engine.check_prompt(len(ids), lm)
        stop = [data.stop] if isinstance(data.stop, str) else list(data.stop or [])
        params = served.sampling({"temperature": data.temperature, "top_p": data.top_p, "max_tokens": data.max_tokens,
                                  "seed": data.random_seed if data.random_seed is not None else data.seed,
                                  "stop": stop + [s for s in (lm.fim.stop if lm.fim else ()) if s not in stop]})
        stream = AsyncStream().add(engine, ids, params, lm=lm)
    except BaseException:
        release(request, served)
        raise
    rid, created = f"fim-{uuid.uuid4().hex[:24]}", int(time.time())
    base = {"id": rid, "created": created, "model": data.model, "system_fingerprint": FINGERPRINT}
    if data.stream:
        async def events() -> AsyncIterator[bytes]:
            count = 0
            async for out in stream:
                count = out.completion_tokens
                delta = {"role": "assistant", "content": out.text} if out.text or out.finish_reason else None
                if delta is not None:
                    yield _sse({**base, "object": "chat.completion.chunk", "choices": [
                        {"index": 0, "delta": delta, "finish_reason": out.finish_reason}]})
            yield _sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage(len(ids), count)})
            yield DONE

        return Stream(_released(request, served, stream, events()), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        outs = (await collect(request, stream, 1))[0]
    finally:
        release(request, served)
    return Response({**base, "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "".join(o.text for o in outs)},
         "finish_reason": outs[-1].finish_reason}], "usage": usage(len(ids), outs[-1].completion_tokens)})


class RerankRequest(Struct, kw_only=True):
    model: str
    query: str
    documents: list[str | dict[str, Any]]
    top_n: Annotated[int, Meta(ge=1)] | None = None
    return_documents: bool = True


async def _rerank(request: Request, data: RerankRequest) -> dict:
    served = await served_model(request, data.model)
    try:
        texts = [d if isinstance(d, str) else str(d.get("text", "")) for d in data.documents]
        if not texts:
            raise InvalidRequest("documents must not be empty", param="documents")
        if served.encoder is not None:
            scores, n = await asyncio.to_thread(served.encoder.rerank, data.query, texts)
        else:  # a generative model: cosine of its mean-pooled embeddings, computed where its weights are
            from codellm.engine.embeddings import embed_served

            vecs, n = await asyncio.to_thread(embed_served, served, [data.query] + texts)
            scores = [sum(a * b for a, b in zip(vecs[0], v)) for v in vecs[1:]]
    finally:
        release(request, served)
    order = sorted(range(len(texts)), key=lambda i: -scores[i])[: data.top_n or len(texts)]
    results = [{"index": i, "relevance_score": float(scores[i]),
                **({"document": {"text": texts[i]}} if data.return_documents else {})} for i in order]
    return {"id": f"rerank-{uuid.uuid4().hex[:24]}", "object": "list", "model": data.model, "results": results,
            "data": results, "usage": {"prompt_tokens": n, "total_tokens": n}}


@post("/v1/rerank", status_code=200, summary="Rerank documents for a query")
async def rerank_v1(request: Request, data: RerankRequest) -> dict:
    return await _rerank(request, data)


@post("/rerank", status_code=200, summary="Rerank documents for a query (Jina/vLLM path)")
async def rerank(request: Request, data: RerankRequest) -> dict:
    return await _rerank(request, data)


ROUTES = [infill, fim_completions, rerank_v1, rerank]
