"""What every HTTP request meets first: a request id (``x-request-id`` taken in when sane, else made, and sent
back), one access-log line, the count of requests in flight, and, while the server drains for shutdown, a 503
in the request's API shape (a load balancer retries it elsewhere) for all but ``/health`` and ``/metrics``."""

from __future__ import annotations

import logging
import re
import time
import uuid

from litestar.types import ASGIApp, Receive, Scope, Send

from codellm.logs import REQUEST_ID

KEY_NAME = "codellm.key"  # the scope entry where the API-key guard leaves the name of the key used
_SANE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
UNCOUNTED = ("/health", "/metrics")  # probes and scrapes: answered while draining, not waited for

access_log = logging.getLogger("codellm.access")


class Drain:
    """Requests in flight, and whether new ones are refused. Touched on the event loop only."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    def start(self) -> None:
        self.draining = True


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    for key, value in headers:
        if key.lower() == b"x-request-id":
            given = value.decode("latin-1").strip()
            if _SANE_ID.match(given):
                return given
            break
    return uuid.uuid4().hex


class Edge:
    """ASGI middleware, outside every other one: refusals get an id and a log line too."""

    def __init__(self, app: ASGIApp, drain: Drain, refuse) -> None:
        self.app, self.drain, self.refuse = app, drain, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope["headers"])
        token = REQUEST_ID.set(rid)
        start, status = time.perf_counter(), [0]

        async def tagged(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        path = scope.get("path", "")
        counted = path not in UNCOUNTED
        try:
            if counted and self.drain.draining:
                await self.refuse(scope, tagged, 503, "the server is shutting down; retry the request", retry_after=1)
            else:
                self.drain.in_flight += counted
                try:
                    await self.app(scope, receive, tagged)
                finally:
                    self.drain.in_flight -= counted
        finally:
            client = scope.get("client") or ("", 0)
            access_log.info('%s "%s %s" %s %.1f ms', client[0], scope["method"], path, status[0] or "-",
                            (time.perf_counter() - start) * 1000, extra={
                                "method": scope["method"], "path": path, "status": status[0] or None,
                                "duration_ms": round((time.perf_counter() - start) * 1000, 1),
                                "key": scope.get(KEY_NAME), "client": client[0]})
            REQUEST_ID.reset(token)
