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
from codellm.errors import InvalidRequest
from codellm.server.openai import DONE, FINGERPRINT, SSE_HEADERS, _sse, manager_of, usage
from codellm.server.pinning import Pins
from codellm.server.pipeline import Delta, TextTurn, choices, collect, generate
from codellm.server.schemas import Seed


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
async def infill(request: Request, data: InfillRequest, pins: Pins) -> Response:
    served = await pins.get(default_model(request, data.model))
    engine = served.generator()
    lm = served.lm
    t0 = time.perf_counter()
    ids = prompts.encode(lm, infill_text(served, data.input_prefix + data.prompt, data.input_suffix, data.input_extra))
    engine.check_prompt(len(ids), lm)
    settings = {"n_predict": data.n_predict, "temperature": data.temperature, "top_k": data.top_k, "top_p": data.top_p}
    if data.n_predict == 0:  # llama.vim's warm-up request: nothing to generate
        return Response(_infill_body(lm.name, "", 0, len(ids), t0, t0, "limit", settings))
    gen = await generate(served, TextTurn([ids], {
        "temperature": data.temperature, "top_k": data.top_k, "top_p": data.top_p, "min_p": data.min_p,
        "seed": data.seed, "max_tokens": data.n_predict if data.n_predict > 0 else None, "stop": data.stop or None,
    }, fim=True))

    def stop_type(d: Delta) -> str:
        return "eos" if d.finish == "stop" else "limit"

    if data.stream:
        async def events() -> AsyncIterator[bytes]:
            async for d in gen.deltas():
                if d.kind == "finish":
                    yield _sse(_infill_body(lm.name, "", d.completion_tokens, len(ids), t0,
                                            gen.stream.first_at or time.perf_counter(), stop_type(d), settings))
                elif d.text:
                    yield _sse({"index": 0, "content": d.text, "stop": False})

        return Stream(pins.streamed(served, gen.stream, events()), media_type="text/event-stream", headers=SSE_HEADERS)
    c = choices(gen, await collect(request, gen))[0]
    first = gen.stream.first_at or time.perf_counter()
    return Response(_infill_body(lm.name, c.text, c.final.completion_tokens, len(ids), t0, first, stop_type(c.final),
                                 settings))


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
async def fim_completions(request: Request, data: FimRequest, pins: Pins) -> Response:
    served = await pins.get(data.model)
    served.generator()
    lm = served.lm
    ids = prompts.encode(lm, prompts.fim_text(lm, data.prompt, data.suffix or ""))
    gen = await generate(served, TextTurn([ids], {
        "temperature": data.temperature, "top_p": data.top_p, "max_tokens": data.max_tokens,
        "seed": data.random_seed if data.random_seed is not None else data.seed,
        "stop": [data.stop] if isinstance(data.stop, str) else data.stop}, fim=True))
    rid, created = f"fim-{uuid.uuid4().hex[:24]}", int(time.time())
    base = {"id": rid, "created": created, "model": data.model, "system_fingerprint": FINGERPRINT}
    if data.stream:
        async def events() -> AsyncIterator[bytes]:
            count = 0
            async for d in gen.deltas():
                count = d.completion_tokens or count
                if d.kind != "finish" and not d.text:
                    continue
                yield _sse({**base, "object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": d.text}, "finish_reason": d.finish}]})
            yield _sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage(len(ids), count)})
            yield DONE

        return Stream(pins.streamed(served, gen.stream, events()), media_type="text/event-stream", headers=SSE_HEADERS)
    c = choices(gen, await collect(request, gen))[0]
    return Response({**base, "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.final.finish}],
        "usage": usage(len(ids), c.final.completion_tokens)})


class RerankRequest(Struct, kw_only=True):
    model: str
    query: str
    documents: list[str | dict[str, Any]]
    top_n: Annotated[int, Meta(ge=1)] | None = None
    return_documents: bool = True


async def _rerank(data: RerankRequest, pins: Pins) -> dict:
    served = await pins.get(data.model)
    texts = [d if isinstance(d, str) else str(d.get("text", "")) for d in data.documents]
    if not texts:
        raise InvalidRequest("documents must not be empty", param="documents")
    if served.encoder is not None:
        scores, n = await asyncio.to_thread(served.encoder.rerank, data.query, texts)
    else:  # a generative model: cosine of its mean-pooled embeddings, computed where its weights are
        from codellm.engine.embeddings import embed_served

        vecs, n = await asyncio.to_thread(embed_served, served, [data.query] + texts)
        scores = [sum(a * b for a, b in zip(vecs[0], v)) for v in vecs[1:]]
    order = sorted(range(len(texts)), key=lambda i: -scores[i])[: data.top_n or len(texts)]
    results = [{"index": i, "relevance_score": float(scores[i]),
                **({"document": {"text": texts[i]}} if data.return_documents else {})} for i in order]
    return {"id": f"rerank-{uuid.uuid4().hex[:24]}", "object": "list", "model": data.model, "results": results,
            "data": results, "usage": {"prompt_tokens": n, "total_tokens": n}}


@post("/v1/rerank", status_code=200, summary="Rerank documents for a query")
async def rerank_v1(data: RerankRequest, pins: Pins) -> dict:
    return await _rerank(data, pins)


@post("/rerank", status_code=200, summary="Rerank documents for a query (Jina/vLLM path)")
async def rerank(data: RerankRequest, pins: Pins) -> dict:
    return await _rerank(data, pins)


ROUTES = [infill, fim_completions, rerank_v1, rerank]
