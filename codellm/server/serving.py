"""Running the app under uvicorn with a graceful drain.

The first SIGTERM (or Ctrl-C) starts a drain: ``/health`` answers 503 so that a load balancer stops sending,
new requests get a 503 in their API's shape, and streams in flight run to their end. The server exits when
none is left or ``drain`` seconds have passed, whichever comes first; what still runs then is cut (its engine
sequences cancelled, their KV blocks freed). A second signal exits at once.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import uvicorn
from litestar import Litestar

log = logging.getLogger("codellm.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Litestar, drain: float,
                 listening: Callable[[str, int], None] | None = None):
        super().__init__(config)
        self.drain, self.grace = app.state.drain, drain
        self.deadline: float | None = None
        self.listening = listening

    async def startup(self, sockets=None) -> None:
        """Once the port is bound (a port already taken exits in ``super().startup``), say where: (host, port)."""
        await super().startup(sockets)
        if self.started and self.listening is not None and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.listening(host, port)

    def handle_exit(self, sig, frame) -> None:
        if self.deadline is None and self.grace > 0:
            self._captured_signals.append(sig)
            self.deadline = time.monotonic() + self.grace
            self.drain.start()
            log.info("draining: %d requests in flight, %.0f s at most (signal again to stop now)",
                     self.drain.in_flight, self.grace)
            return
        self.force_exit = self.should_exit
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.deadline is not None and not self.should_exit:
            if self.drain.in_flight == 0:
                log.info("drained: no request in flight")
                self.should_exit = True
            elif time.monotonic() >= self.deadline:
                log.warning("drain deadline passed: cutting %d requests in flight", self.drain.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


def run(app: Litestar, host: str, port: int, *, log_level: str = "info", drain: float = 30.0,
        listening: Callable[[str, int], None] | None = None) -> None:
    """Serve until stopped; ``listening(host, port)`` is called once the socket is bound (port 0: the one picked)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=None, access_log=False,
                            timeout_graceful_shutdown=1)
    DrainingServer(config, app, drain, listening).run()
