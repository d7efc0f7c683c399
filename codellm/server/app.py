"""The Litestar application: routes, API-key guard, CORS, health, metrics, OpenAPI."""

from __future__ import annotations

import os

from litestar import Litestar, Request, get
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.response import Response
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as PROMETHEUS_TEXT

from codellm import __version__
from codellm.engine import telemetry
from codellm.engine.manager import LoadOptions, ModelManager
from codellm.engine.streams import pace_streams
from codellm.errors import Unauthorized
from codellm.registry import Registry
from codellm.server import adapters, anthropic, editors, ollama, openai, openapi, pinning, responses
from codellm.server.edge import KEY_NAME, Drain, Edge
from codellm.server.errors import HANDLERS, refuse
from codellm.server.keys import KeyRing
from codellm.server.origins import OriginGuard, Policy
from codellm.server.request import Request as CodellmRequest


async def api_key_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """Async on purpose: Litestar runs a sync guard in a worker thread, a GIL hand-over per request that under
    load held each new request up to the 5 ms switch interval (NOTES run 21)."""
    keys: KeyRing = connection.app.state.api_keys
    if handler.opt.get("public") or connection.scope.get("method") == "OPTIONS" or not keys.required:
        return
    auth = connection.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer":  # Anthropic's clients send the key as x-api-key
        token = connection.headers.get("x-api-key", "")
    name = keys.match(token.strip()) if token else None
    if name is None:
        raise Unauthorized("Incorrect API key provided. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
                           if token or auth else "Missing API key. Send it as 'Authorization: Bearer <key>' or "
                           "'x-api-key: <key>'.")
    connection.scope[KEY_NAME] = name  # type: ignore[literal-required]  (the access log names it)


@get("/health", opt={"public": True}, summary="Liveness and loaded models; 503 while draining for shutdown")
async def health(request: Request) -> Response:
    manager: ModelManager = request.app.state.manager
    draining = request.app.state.drain.draining
    return Response(status_code=503 if draining else 200, content={"status": "draining" if draining else "ok", "version": __version__, "models": {
        name: {"slots": s.engine.slots, "active": s.engine.active(), "queued": s.engine.pending(),
               "max_batch": s.engine.stats.max_batch, "steps": s.engine.stats.steps,
               "decode_tokens": s.engine.stats.decode_tokens, "cancelled": s.engine.stats.cancelled,
               "kv_blocks": s.engine.stats.kv_blocks, "lora_adapters": s.engine.stats.adapters, "kv_blocks_used": s.engine.stats.kv_used,
               "prefix_cache_hit_rate": s.engine.stats.prefix_hits / max(1, s.engine.stats.prefix_queries),
               "max_len": s.lm.max_len, "device": str(s.lm.device), "dtype": str(s.lm.dtype).removeprefix("torch.")}
        for name, s in manager.loaded().items() if s.engine is not None
    }})


@get("/metrics", media_type=PROMETHEUS_TEXT, summary="Prometheus metrics (the API key too, where one is set)")
async def metrics(request: Request) -> Response:
    """vLLM's metric names and meanings (``engine.telemetry``), one series per loaded model."""
    return Response(telemetry.exposition(request.app.state.stats_collector), media_type=PROMETHEUS_TEXT)


async def _reaper(app: Litestar) -> None:
    """Unload models whose keep_alive ran out (Ollama semantics), once a second."""
    import asyncio

    while True:
        await asyncio.sleep(1)
        try:
            await asyncio.to_thread(app.state.manager.reap)
        except Exception:  # keep reaping whatever one unload did
            import logging

            logging.getLogger("codellm.server").exception("reaper")


async def _on_startup(app: Litestar) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(adapters.reclaim, app.state.manager.registry)  # what killed servers left behind
    app.state.manager.serve_on(loop)  # engine processes' outputs are read on this loop
    pace_streams(loop, app.state.stream_interval)
    app.state.reaper = asyncio.create_task(_reaper(app))


async def _stop_reaper(app: Litestar) -> None:
    task = getattr(app.state, "reaper", None)
    if task:
        task.cancel()


def create_app(
    manager: ModelManager | None = None,
    *,
    api_key: str | None = None,
    cors_origins: list[str] | None = None,
    stream_interval: float | None = None,
    bind: str = "127.0.0.1",
    allowed_hosts: list[str] | None = None,
    lora_updates: bool = False,
    api_key_file: str | None = None,
    api_keys: KeyRing | None = None,
    max_body_size: int = 16 * 2**20,
) -> Litestar:
    """``stream_interval``: least seconds between two chunks of a stream (0: every token as it comes; None:
    automatic, growing with the number of open streams: see ``streams.auto_interval``). ``bind``: the address
    the server listens on, which decides the Host names it answers (see ``origins``). ``lora_updates``: allow
    adding and removing LoRA adapters at run time (``adapters``). ``api_key`` and ``api_key_file`` (default:
    ``CODELLM_API_KEY``, ``CODELLM_API_KEY_FILE``): the keys asked for (``keys``), or ``api_keys``, read already. ``max_body_size``: the largest
    request body read, in bytes (a 413 beyond it; blob uploads, streamed to disk, have no limit)."""
    manager = manager or ModelManager(Registry(), LoadOptions())
    drain = Drain()
    policy = Policy(bind=bind, allowed_hosts=tuple(allowed_hosts or ()), cors_origins=tuple(cors_origins or ()))
    app = Litestar(
        middleware=[DefineMiddleware(Edge, drain=drain, refuse=refuse), DefineMiddleware(OriginGuard, policy=policy, refuse=refuse)],
        request_max_body_size=max_body_size,
        route_handlers=[health, metrics, *openai.ROUTES, *editors.ROUTES, ollama.ROUTER, *responses.ROUTES, *adapters.ROUTES, anthropic.ROUTER],
        exception_handlers=HANDLERS,
        dependencies=pinning.DEPENDENCIES,
        guards=[api_key_guard],
        cors_config=CORSConfig(allow_origins=cors_origins, allow_headers=["*"], allow_methods=["*"]) if cors_origins else None,
        openapi_config=OpenAPIConfig(title="codellm", version=__version__, path="/schema"),
        on_startup=[_on_startup],
        on_shutdown=[_stop_reaper, adapters.forget_all, lambda: manager.close()],
        request_class=CodellmRequest,
        logging_config=None,  # logs.configure (or the embedding program) owns the handlers
        debug=False,
    )
    openapi.install(app)
    app.state.manager = manager
    app.state.stats_collector = telemetry.StatsCollector(
        lambda: [(name, s.engine) for name, s in manager.loaded().items() if s.engine is not None])
    app.state.responses = responses.Store()  # what previous_response_id refers to
    app.state.stream_interval = stream_interval
    app.state.lora_updates = lora_updates
    app.state.runtime_adapters = set()  # adapters /v1/load_lora_adapter added (and unload may remove)
    app.state.drain = drain
    app.state.api_keys = api_keys if api_keys is not None else KeyRing(
        api_key if api_key is not None else os.environ.get("CODELLM_API_KEY") or None,
        api_key_file or os.environ.get("CODELLM_API_KEY_FILE") or None)
    return app
