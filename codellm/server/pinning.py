"""Models held busy for a request: keep-alive never unloads a model while a request that uses it runs.

Every route that uses a model takes a ``Pins`` from the ``pins`` dependency, a yield dependency: when the handler is
done, however it ends (an answer, a refusal, an exception), the request lets go of every model it still holds. A
streamed answer outlives its handler, so its body takes the pin over (``hand_over``) and lets go when the body ends.
"""

from __future__ import annotations

import asyncio
from typing import AsyncGenerator, AsyncIterator, Callable

from litestar import Request
from litestar.di import Provide

from codellm.engine.manager import ModelManager, Served
from codellm.engine.streams import AsyncStream, closing
from codellm.errors import InvalidName, NotFound


class Pins:
    def __init__(self, manager: ModelManager):
        self.manager = manager
        self._held: list[tuple[Served, object]] = []  # (model, keep_alive once let go)

    def hold(self, served: Served, keep_alive: object = "default") -> Served:
        served.active += 1
        self._held.append((served, keep_alive))
        return served

    async def get(self, name: str, keep_alive: object = "default") -> Served:
        """The loaded model ``name`` (loaded now if it is not), held until this request lets go of it."""
        manager = self.manager
        try:
            served = manager.ready(name)  # loaded already: no disk, no thread hop
        except InvalidName:
            served = None  # perhaps ``base:adapter``
        try:
            if served is None:
                name = manager.resolve(name)
                manager.registry.get(name)
                served = await asyncio.to_thread(manager.get, name)
        except (InvalidName, NotFound):
            raise NotFound(f"The model `{name}` does not exist.", param="model") from None
        return self.hold(served, keep_alive)

    def hand_over(self, served: Served) -> Callable[[], None]:
        """Move the hold on ``served`` to whoever calls the returned function once (a stream body, when it ends)."""
        for i, (s, keep) in enumerate(self._held):
            if s is served:
                del self._held[i]
                return lambda: self._let_go(s, keep)
        raise ValueError("this request does not hold that model")

    def streamed(self, served: Served, stream: AsyncStream, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """A response body that holds ``served`` until it ends, and cancels what is still generating then, however
        it ends (see ``closing``)."""
        let_go = self.hand_over(served)

        def cleanup() -> None:
            stream.cancel()
            let_go()

        return closing(events, cleanup)

    def release(self) -> None:
        held, self._held = self._held, []
        for served, keep in held:
            self._let_go(served, keep)

    def _let_go(self, served: Served, keep) -> None:
        served.active -= 1
        self.manager.touch(served, keep)


async def _pins(request: Request) -> AsyncGenerator[Pins, None]:
    pins = Pins(request.app.state.manager)
    try:
        yield pins
    finally:
        pins.release()


DEPENDENCIES = {"pins": Provide(_pins)}
