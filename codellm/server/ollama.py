"""Ollama's native API on the same server, so Ollama clients (the `ollama` Python client, Continue's
Ollama provider, Open WebUI) work unmodified.

Streams are NDJSON (one whole JSON object per line, no blank lines) and `stream` defaults to true;
errors are ``{"error": "..."}``; durations are nanoseconds; options use Ollama's names and defaults.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

import msgspec
from litestar import Request, Response, Router, delete, get, head, post
from litestar.response import Stream

from codellm.engine import grammar, prompts
from codellm.engine.manager import PARAM_MAP, ModelManager, Served, options_to_overrides, parse_keep_alive
from codellm.server.errors import OLLAMA_HANDLERS
from codellm.server.pinning import Pins
from codellm.server.pipeline import ChatTurn, Generation, TextTurn, generate, watch_disconnect
from codellm.errors import CodellmError, InvalidName, NotFound, QueueFull, disk_full
from codellm.registry import manifest as mt
from codellm.registry.info import describe_model, parameter_size
from codellm.registry.store import Entry
from codellm.server.ollama_schemas import (
    ChatRequest, CopyRequest, CreateRequest, DeleteRequest, EmbeddingsRequest, EmbedRequest, GenerateRequest, Named,
    PullRequest, ShowRequest,
)

OLLAMA_VERSION = "0.12.6"  # the API level we speak; clients refuse servers older than 0.6.4
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 64}
NDJSON = "application/x-ndjson"
OPTION_NAMES = {field: option for option, field in PARAM_MAP.items()}  # sampling field -> Ollama option, for errors


class OllamaError(Exception):
    """Raised inside /api routes: answered as {"error": message} with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def ollama_error(request: Request, exc: OllamaError) -> Response:
    return Response({"error": exc.message}, status_code=exc.status)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _manager(request: Request) -> ModelManager:
    return request.app.state.manager


def _name_of(data: Named) -> str:
    name = data.model or data.name
    if not name:
        raise OllamaError(400, "model is required")
    return name


def _entry(request: Request, name: str) -> Entry:
    try:
        return _manager(request).registry.get(name)
    except (InvalidName, NotFound):
        raise OllamaError(404, f'model "{name}" not found, try pulling it first') from None


def _line(obj: Any) -> bytes:
    return msgspec.json.encode(obj) + b"\n"


def _details(entry: Entry) -> dict:
    c = entry.manifest.config
    family = c.model_type or c.family or ""
    return {"parent_model": c.base or "", "format": c.format or "safetensors", "family": family,
            "families": [family] if family else None, "parameter_size": parameter_size(c.parameters),
            "quantization_level": (c.quantization or _dtype_label(c.dtype)).upper()}


def _dtype_label(dtype: str | None) -> str:
    return {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(dtype or "", dtype or "unknown")


def _tag_entry(entry: Entry) -> dict:
    name = str(entry.name)
    return {"name": name, "model": name, "modified_at": _iso(entry.modified), "size": entry.manifest.size,
            "digest": entry.digest.split(":", 1)[1], "details": _details(entry)}


@get("/", media_type="text/plain", opt={"public": True}, include_in_schema=False)
async def root() -> str:
    return "Ollama is running"


@head("/", opt={"public": True}, include_in_schema=False)
async def root_head() -> None:
    return None


@get("/api/version", opt={"public": True}, summary="Ollama API version")
async def version() -> dict:
    return {"version": OLLAMA_VERSION}


@get("/api/tags", summary="List local models (Ollama)")
async def tags(request: Request) -> dict:
    return {"models": [_tag_entry(e) for e in _manager(request).registry.list()]}


@post("/api/show", status_code=200, summary="Show a model (Ollama)")
async def show(request: Request, data: ShowRequest) -> dict:
    from codellm.registry.create import show_modelfile

    name = _name_of(data)
    entry = _entry(request, name)
    reg = _manager(request).registry
    info = describe_model(reg, name)
    c = entry.manifest.config
    arch = c.model_type or "unknown"
    model_info: dict[str, Any] = {"general.architecture": arch, "general.parameter_count": c.parameters or 0,
                                  "general.basename": entry.name.model, f"{arch}.context_length": c.context_length or 0}
    cfg_layer = entry.manifest.layer(mt.CONFIG)
    if cfg_layer:
        cfg = json.loads(reg.read_layer(cfg_layer))
        for ours, theirs in (("embedding_length", "hidden_size"), ("block_count", "num_hidden_layers"),
                             ("attention.head_count", "num_attention_heads"),
                             ("attention.head_count_kv", "num_key_value_heads"), ("vocab_size", "vocab_size")):
            if isinstance(cfg.get(theirs), int):
                model_info[f"{arch}.{ours}"] = cfg[theirs]
    out = {"modelfile": show_modelfile(reg, name), "parameters": info.parameters_text, "template": info.template or "",
           "details": _details(entry), "model_info": model_info, "capabilities": info.capabilities,
           "modified_at": _iso(entry.modified)}
    if info.system:
        out["system"] = info.system
    if info.license:
        out["license"] = info.license
    return out


async def _serve(request: Request, name: str, keep_alive, pins: Pins) -> tuple[Served, float | None]:
    """The model ``name``, loaded and held for the request; once let go it stays loaded for ``keep_alive``."""
    manager = _manager(request)
    try:
        served = manager.ready(name)  # loaded already: no manifest read, no thread hop (as Pins.get)
    except InvalidName:
        served = None
    if served is None:
        name = manager.resolve(name)  # ``base:adapter`` too
        _entry(request, name)  # unknown or invalid names: Ollama's 404
    try:  # no keep_alive in the request: the server's default, and a model pinned at start stays pinned
        keep = "default" if keep_alive is None else parse_keep_alive(keep_alive, manager.options.keep_alive)
    except CodellmError as exc:
        raise OllamaError(400, exc.message) from None
    if served is None:
        started = time.perf_counter()
        served = await asyncio.to_thread(manager.get, name)
        served.load_ns = int((time.perf_counter() - started) * 1e9)
    else:
        served.load_ns = 0
    pins.hold(served, keep)
    return served, keep


async def _generator(request: Request, data: GenerateRequest | ChatRequest, action: str, pins: Pins) -> tuple[Served, Any]:
    """The model a generate/chat request names, loaded and held for the request, with its keep_alive; encoders
    answer 400."""
    name = _name_of(data)
    served, keep = await _serve(request, name, data.keep_alive, pins)
    if served.engine is None:
        raise OllamaError(400, f'"{name}" does not support {action}')
    if data.think not in (None, False, ""):
        raise OllamaError(400, f'"{name}" does not support thinking')
    return served, keep


NUM_KEEP = 4  # Ollama's default: the prompt's first tokens kept when its middle is cut


def _fit(ids: list[int], served: Served, options: dict | None) -> list[int]:
    """A prompt too long for the context keeps its first ``NUM_KEEP`` tokens and its end, as Ollama does (Open WebUI
    relies on it), leaving room for ``num_predict`` tokens (or an eighth of the context)."""
    limit = min(served.lm.max_len, served.generator().lm.max_len)
    if len(ids) < limit:
        return ids
    predict = (options or {}).get("num_predict")
    room = predict if isinstance(predict, int) and 0 < predict < limit // 2 else max(1, limit // 8)
    return ids[:NUM_KEEP] + ids[len(ids) - (limit - room - NUM_KEEP):]


def _load_or_unload(served: Served, keep: float | None, extra: dict) -> dict:
    """A request with no prompt/messages just loads the model (or unloads it with keep_alive 0, once let go)."""
    reason = "unload" if keep == 0 and not isinstance(keep, str) else "load"
    return {"model": served.lm.name, "created_at": _now(), **extra, "done": True, "done_reason": reason}


def _sampling(served: Served, data: GenerateRequest | ChatRequest) -> Any:
    try:
        overrides = options_to_overrides(data.options or {})
        if (data.options or {}).get("speculative") is not None:  # not Ollama's: False turns speculative decoding off
            overrides["speculative"] = data.options["speculative"]
        params = served.sampling(overrides, base=OLLAMA_DEFAULTS, names=OPTION_NAMES)
    except CodellmError as exc:
        raise OllamaError(400, exc.message) from None
    fmt = data.format
    if fmt not in (None, "", "json") and not isinstance(fmt, dict):
        raise OllamaError(400, f"invalid format {fmt!r}: use \"json\" or a JSON schema")
    if fmt:
        try:
            params.grammar = grammar.json_schema(fmt if isinstance(fmt, dict) else None, param="format")
        except CodellmError as exc:
            raise OllamaError(400, exc.message) from None
    return params


async def _start(served: Served, turn) -> Generation:
    try:
        return await generate(served, turn)
    except QueueFull as exc:
        raise OllamaError(503, f"server busy, please try again. maximum pending requests exceeded ({exc.message})") from None


async def _run(request: Request, served: Served, pins: Pins, gen: Generation, shape, final_extra, want_stream: bool,
               t0: float):
    """Answer one generation as NDJSON lines (or one object)."""
    def final(reason: str, count: int, eval_ns: int, prompt_ns: int, extra: dict) -> dict:
        return {"done": True, "done_reason": reason, **extra, "total_duration": int((time.perf_counter() - t0) * 1e9),
                "load_duration": getattr(served, "load_ns", 0), "prompt_eval_count": gen.prompt_tokens,
                "prompt_eval_duration": prompt_ns, "eval_count": count, "eval_duration": eval_ns}

    def calls_shape(calls: list) -> dict:  # Ollama: tool-call arguments are objects
        body = shape("")
        body["message"]["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        return body

    async def lines() -> AsyncIterator[bytes]:
        text, calls = [], []
        async for d in gen.deltas():
            if d.finish == "error":
                yield _line({"error": f"generation failed: {d.error}"})
                return
            if d.kind == "call":
                calls.append(d.call)
                if want_stream:
                    yield _line({"model": served.lm.name, "created_at": _now(), **calls_shape([d.call]), "done": False})
            elif d.kind == "text":
                if d.text:
                    text.append(d.text)
                    if want_stream:
                        yield _line({"model": served.lm.name, "created_at": _now(), **shape(d.text), "done": False})
            else:
                now = time.perf_counter()
                first_at = gen.stream.first_at or now
                reason = "length" if d.finish == "length" else "stop"
                body = shape("" if want_stream else "".join(text))
                if calls and not want_stream:
                    body = calls_shape(calls)
                    body["message"]["content"] = "".join(text)
                yield _line({"model": served.lm.name, "created_at": _now(), **body,
                             **final(reason, d.completion_tokens, int((now - first_at) * 1e9),
                                     int((first_at - t0) * 1e9), final_extra(d.token_ids))})

    if want_stream:
        return Stream(pins.streamed(served, gen.stream, lines()), media_type=NDJSON)
    watcher = asyncio.create_task(watch_disconnect(request, gen.stream))
    try:
        chunks = [chunk async for chunk in lines()]
    finally:
        watcher.cancel()
        gen.stream.cancel()
    obj = json.loads(chunks[-1]) if chunks else {"error": "no output"}
    if "error" in obj:
        raise OllamaError(500, obj["error"])
    return Response(obj)


@post("/api/generate", status_code=200, summary="Generate a completion (Ollama)")
async def generate_route(request: Request, data: GenerateRequest, pins: Pins) -> Response:
    served, keep = await _generator(request, data, "generate", pins)
    prompt, suffix = data.prompt, data.suffix
    if not prompt and not suffix:
        return Response(_load_or_unload(served, keep, {"response": ""}))
    lm = served.lm
    t0 = time.perf_counter()
    if suffix is not None and suffix != "":
        ids = prompts.encode(lm, prompts.fim_text(lm, prompt, suffix))
    elif data.raw:
        ids = prompts.encode(lm, prompt)
    elif data.template:
        ids = prompts.encode(lm, prompts.go_template(data.template, system=data.system or lm.system or "", prompt=prompt))
    else:
        msgs = ([{"role": "system", "content": data.system}] if data.system else []) + [{"role": "user", "content": prompt}]
        ids = await prompts.render_off_loop(len(prompt) + len(data.system or ""), prompts.chat_prompt, lm, msgs) \
            if getattr(lm.tokenizer, "chat_template", None) else prompts.encode(lm, prompt)
    ids = _fit(list(data.context or []) + ids, served, data.options)
    gen = await _start(served, TextTurn([ids], _sampling(served, data), fim=bool(suffix)))
    return await _run(request, served, pins, gen, lambda text: {"response": text},
                      lambda out_ids: {"context": ids + out_ids}, data.stream, t0)


def _message(m) -> dict:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"function": {"name": c.function.name, "arguments": c.function.arguments}}
                             for c in m.tool_calls]
    if m.name or m.tool_name:
        out["name"] = m.name or m.tool_name
    return out


@post("/api/chat", status_code=200, summary="Chat (Ollama)")
async def chat(request: Request, data: ChatRequest, pins: Pins) -> Response:
    served, keep = await _generator(request, data, "chat", pins)
    if not data.messages:
        return Response(_load_or_unload(served, keep, {"message": {"role": "assistant", "content": ""}}))
    t0 = time.perf_counter()
    turn = ChatTurn([_message(m) for m in data.messages], data.tools, sampling=_sampling(served, data),
                    fit=lambda ids: _fit(ids, served, data.options))
    gen = await _start(served, turn)
    return await _run(request, served, pins, gen, lambda text: {"message": {"role": "assistant", "content": text}},
                      lambda out_ids: {}, data.stream, t0)


class _Progress:
    """Registry job progress as Ollama's NDJSON status objects, handed from the worker thread to the response."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue = loop, queue
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}

    def _put(self, obj: dict) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, obj)

    def status(self, message: str) -> None:
        self._put({"status": message})

    def start(self, files) -> None:
        pass

    def _file(self, file, completed: int) -> None:
        # as Ollama: "pulling" and the digest's first 12 hex digits; a small file the hub keeps in git has no sha256
        # until it is here, so its whole name stands in (never cut: two names may share their first characters)
        shown = file.digest.removeprefix("sha256:")[:12] if file.digest else file.path
        self._put({"status": f"pulling {shown}", "digest": file.digest or file.path, "total": file.size,
                   "completed": min(completed, file.size)})

    def advance(self, file, nbytes: int) -> None:
        key = file.digest or file.path
        self.counts[key] = max(0, self.counts.get(key, 0) + nbytes)
        now = time.monotonic()
        if now - self.last.get(key, 0) > 0.1:
            self.last[key] = now
            self._file(file, self.counts[key])

    def done(self, file) -> None:
        self._file(file, file.size)


async def _progress_job(request: Request, job, want_stream: bool) -> Response:
    """Run a blocking registry job in a thread, reporting its status lines as Ollama does."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    future = loop.run_in_executor(None, job, _Progress(loop, queue))
    future.add_done_callback(lambda f: queue.put_nowait(None))

    async def lines() -> AsyncIterator[bytes]:
        while (item := await queue.get()) is not None:
            if item.get("status") != "success":
                yield _line(item)
        exc = future.exception()
        if exc is not None:
            yield _line({"error": exc.message if isinstance(exc, CodellmError) else disk_full(exc) or f"{type(exc).__name__}: {exc}"})
        else:
            yield _line({"status": "success"})

    if want_stream:
        return Stream(lines(), media_type=NDJSON)
    try:
        await future
    except CodellmError as exc:
        raise OllamaError(exc.status if exc.status < 500 else 500, exc.message) from None
    except OSError as exc:
        if disk_full(exc) is None:
            raise
        raise OllamaError(507, disk_full(exc)) from None
    return Response({"status": "success"})


@post("/api/pull", status_code=200, summary="Pull a model from the Hugging Face hub (Ollama)")
async def pull(request: Request, data: PullRequest) -> Response:
    from codellm.registry.hub import pull as hub_pull

    name = _name_of(data)
    reg = _manager(request).registry
    return await _progress_job(request, lambda progress: hub_pull(reg, name, progress=progress), data.stream)


@post("/api/create", status_code=200, summary="Create a model from a Modelfile or fields (Ollama)")
async def create(request: Request, data: CreateRequest) -> Response:
    from codellm.registry import modelfile as mfmod
    from codellm.registry.create import create as do_create

    name = _name_of(data)
    reg = _manager(request).registry
    try:
        if data.modelfile:
            mf = mfmod.parse(data.modelfile)
        else:
            if not data.from_ and not data.files:
                raise OllamaError(400, "neither 'from', 'files' nor 'modelfile' was given")
            params = {}
            for key, value in (data.parameters or {}).items():
                params[key] = [mfmod.coerce_parameter(key, v) for v in value] if isinstance(value, list) else mfmod.coerce_parameter(key, value)
            mf = mfmod.Modelfile(from_=data.from_ or "", parameters=params, template=data.template, system=data.system,
                                 messages=[mfmod.Message(m.role, m.content) for m in data.messages or []],
                                 licenses=[data.license] if isinstance(data.license, str) else list(data.license or []))
    except CodellmError as exc:
        raise OllamaError(400, exc.message) from None

    def job(progress):
        # a remote client may not make the server read local paths: names, or files it uploaded (/api/blobs)
        return do_create(reg, name, mf, allow_paths=False, status=progress.status, files=data.files,
                         adapter_files=data.adapters)

    return await _progress_job(request, job, data.stream)


BLOB_FLUSH = 4 << 20  # bytes an upload gathers before a worker thread writes them


def _blob_digest(digest: str) -> str:
    from codellm.registry.blobs import check_digest

    try:
        return check_digest(digest)
    except CodellmError:
        raise OllamaError(400, f"invalid digest {digest!r}: sha256:<64 hex digits> expected") from None


@head("/api/blobs/{digest:str}", summary="Is this blob on the server? (Ollama)")
async def blob_exists(request: Request, digest: str) -> None:
    if not _manager(request).registry.blobs.has(_blob_digest(digest)):
        raise OllamaError(404, f"blob {digest} not found")


@post("/api/blobs/{digest:str}", summary="Upload a blob, for /api/create's files (Ollama)", request_max_body_size=None)
async def upload_blob(request: Request, digest: str) -> Response:
    """The body is hashed as it arrives and written by a worker thread, a few MiB at a time; it enters the blob
    store only whole and matching its digest, so an upload cut short or lying about its content leaves nothing."""
    store = _manager(request).registry.blobs
    if store.has(_blob_digest(digest)):
        return Response(None, status_code=200)
    writer = await asyncio.to_thread(store.writer, digest)
    committed = False
    try:
        pending: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            pending.append(chunk)
            size += len(chunk)
            if size >= BLOB_FLUSH:
                await asyncio.to_thread(writer.write, b"".join(pending))
                pending, size = [], 0
        await asyncio.to_thread(writer.write, b"".join(pending))
        try:
            await asyncio.to_thread(writer.commit)
        except CodellmError as exc:
            raise OllamaError(400, exc.message) from None
        committed = True
    except OSError as exc:
        if disk_full(exc) is None:
            raise
        raise OllamaError(507, disk_full(exc)) from None
    finally:
        if not committed:
            writer.abort()
    return Response(None, status_code=201)


@post("/api/copy", status_code=200, summary="Copy a model (Ollama)")
async def copy(request: Request, data: CopyRequest) -> Response:
    source, destination = data.source, data.destination
    if not source or not destination:
        raise OllamaError(400, "source and destination are required")
    _entry(request, source)
    try:
        _manager(request).registry.copy(source, destination)
    except InvalidName as exc:
        raise OllamaError(400, exc.message) from None
    return Response(None, status_code=200)


@delete("/api/delete", status_code=200, summary="Delete a model (Ollama)")
async def remove(request: Request, data: DeleteRequest) -> Response:
    name = _name_of(data)
    _entry(request, name)
    manager = _manager(request)
    manager.unload(name) if manager.canonical(name) in manager.loaded() else None
    manager.registry.remove(name)
    return Response(None, status_code=200)


@get("/api/ps", summary="Loaded models (Ollama)")
async def ps(request: Request) -> dict:
    manager = _manager(request)
    models = []
    for key, served in manager.loaded().items():
        try:
            entry = manager.registry.get(key)
        except NotFound:  # removed while loaded: it is unloaded once idle, and no longer listed
            continue
        expires = served.expires_at if served.expires_at is not None else time.time() + 10 * 365 * 86400
        vram = ((served.engine.kv_bytes if served.engine else 0) + entry.manifest.size) if served.lm.device.type == "cuda" else 0
        models.append({**_tag_entry(entry), "expires_at": _iso(expires), "size_vram": vram,
                       "context_length": served.lm.max_len})
    return {"models": models}


def _inputs(value, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise OllamaError(400, f"{key} must be a string or a list of strings")


@post("/api/embed", status_code=200, summary="Embeddings (Ollama)")
async def embed(request: Request, data: EmbedRequest, pins: Pins) -> dict:
    from codellm.engine.embeddings import embed_served, shorten

    served, _ = await _serve(request, _name_of(data), data.keep_alive, pins)
    t0 = time.perf_counter()
    vectors, n = await asyncio.to_thread(embed_served, served, _inputs(data.input, "input"), truncate=data.truncate)
    return {"model": served.lm.name, "embeddings": shorten(vectors, data.dimensions), "total_duration": int((time.perf_counter() - t0) * 1e9),
            "load_duration": getattr(served, "load_ns", 0), "prompt_eval_count": n}


@post("/api/embeddings", status_code=200, summary="Embedding of one prompt (Ollama, legacy)")
async def embeddings(request: Request, data: EmbeddingsRequest, pins: Pins) -> dict:
    from codellm.engine.embeddings import embed_served

    served, _ = await _serve(request, _name_of(data), data.keep_alive, pins)
    vectors, _ = await asyncio.to_thread(embed_served, served, _inputs(data.prompt, "prompt")[:1])
    return {"embedding": vectors[0]}


ROUTER = Router(path="/", route_handlers=[root, root_head, version, tags, show, generate_route, chat, pull, create, blob_exists,
                                          upload_blob, copy, remove, ps, embed, embeddings],
                exception_handlers={**OLLAMA_HANDLERS, OllamaError: ollama_error})
