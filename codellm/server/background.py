"""The server in a thread of this process, on a free loopback port: for commands that drive models through the
HTTP API (``codellm eval``) without a ``codellm serve`` running."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator

from codellm.engine.manager import LoadOptions, ModelManager
from codellm.errors import CodellmError
from codellm.registry import Registry


@contextlib.contextmanager
def serving(registry: Registry, options: LoadOptions, *, api_key: str | None = None) -> Iterator[str]:
    """Yields the server's base URL; the server and the models it loaded are stopped on exit."""
    import uvicorn

    from codellm.server.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(ModelManager(registry, options), api_key=api_key, stream_interval=0)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="codellm-server", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise CodellmError(f"the evaluation server could not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
