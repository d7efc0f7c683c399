"""Bridges from the engine thread to consumers: an asyncio stream and a blocking iterator.

Leaving either early (client disconnect, Ctrl-C) cancels the request, which frees its cache slot.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import weakref
from typing import AsyncIterator, Callable

from codellm.engine.scheduler import Engine, Handle, Output
from codellm.engine.sampling import SamplingParams


class _Dispatcher:
    """Hands outputs from the engine thread to one event loop with one wake-up per batch of outputs,
    not one per token per stream (at 256 streams that is 256 self-pipe writes a step)."""

    _by_loop: dict[int, "_Dispatcher"] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.thread = threading.get_ident()  # made on the loop's own thread (by a stream opened there)
        self.pending: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "_Dispatcher":
        found = cls._by_loop.get(id(loop))
        if found is None or found.loop is not loop:
            found = cls._by_loop[id(loop)] = cls(loop)
        return found

    def post(self, target: asyncio.Queue, item) -> None:
        if threading.get_ident() == self.thread and not self.scheduled:  # posted on the loop itself: no wake-up
            target.put_nowait(item)
            return
        with self.lock:
            self.pending.append((target, item))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _drain(self) -> None:
        with self.lock:
            items, self.pending = self.pending, collections.deque()
            self.scheduled = False
        for target, item in items:
            target.put_nowait(item)


class _Mailbox:
    """What the dispatcher fills for one stream: a deque the reader can look into, so outputs that piled up
    can be merged (``asyncio.Queue`` keeps its items private)."""

    def __init__(self):
        self.items: collections.deque[Output] = collections.deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item: Output) -> None:
        self.items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Output:
        while not self.items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self.items.popleft()


def _absorb(out: Output, later: Output) -> Output:
    """``later`` (the same choice's next output) folded into ``out``: one delta carrying both."""
    out.text += later.text
    out.token_ids += later.token_ids
    out.logprobs += later.logprobs
    out.prompt_logprobs = out.prompt_logprobs or later.prompt_logprobs
    out.prompt_tokens, out.completion_tokens = later.prompt_tokens, later.completion_tokens
    out.finish_reason, out.error = later.finish_reason, later.error
    return out


class AsyncStream:
    """Outputs of one or more submissions (several prompts, n choices each) merged in arrival order.

    Choice indexes are offset so that prompt ``p`` with ``n`` choices owns ``p*n .. p*n+n-1``. When the reader
    falls behind the engine (hundreds of streams on one event loop), a choice's outputs that piled up are
    handed over as one: each chunk then carries several tokens, and the server's work per token shrinks
    exactly when it is the bottleneck (vLLM merges deltas the same way).
    """

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self._queue = _Mailbox()
        self._open = 0
        self.handles: list[Handle] = []

    def add(self, engine: Engine, prompt: list[int], params: SamplingParams, *, n: int = 1, offset: int = 0,
            prompt_logprobs: bool = False, lm=None) -> "AsyncStream":
        dispatcher = _Dispatcher.of(self._loop)

        def sink(out: Output) -> None:
            out.index += offset
            dispatcher.post(self._queue, out)

        try:
            self.handles.append(engine.submit(prompt, params, sink, n=n, prompt_logprobs=prompt_logprobs, lm=lm))
        except BaseException:
            self.cancel()
            raise
        self._open += n
        return self

    def __aiter__(self):
        return self

    async def __anext__(self) -> Output:
        if self._open == 0:
            raise StopAsyncIteration
        out = await self._queue.get()
        waiting = self._queue.items
        while out.finish_reason is None and waiting and waiting[0].index == out.index:
            out = _absorb(out, waiting.popleft())
        if out.finish_reason is not None:
            self._open -= 1
        return out

    def has_pending(self) -> bool:
        """Outputs already here: a writer can send them together with what it holds."""
        return bool(self._queue.items)

    def cancel(self) -> None:
        if self._open:
            for handle in self.handles:
                handle.cancel()


def closing(events: AsyncIterator[bytes], cleanup: Callable[[], None]) -> AsyncIterator[bytes]:
    """``events`` as a response body whose ``cleanup`` (cancel the generation, mark the model idle) runs exactly
    once: when the body ends, when the client goes away mid-stream, and also when the server drops the body
    without ever starting it (the client was gone before the first byte), which no ``finally`` inside a
    generator sees. A ``weakref.finalize`` runs its callback at most once, whichever of the two calls it first."""
    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield event
        finally:
            once()

    gen = body()
    once = weakref.finalize(gen, cleanup)
    return gen


def iterate(engine: Engine, prompt: list[int], params: SamplingParams, lm=None):
    """Blocking iterator of outputs for one sequence; cancels on early exit."""
    q: queue.SimpleQueue[Output] = queue.SimpleQueue()
    handle = engine.submit(prompt, params, q.put, lm=lm)
    finished = False
    try:
        while True:
            out = q.get()
            yield out
            if out.finish_reason is not None:
                finished = True
                return
    finally:
        if not finished:
            handle.cancel()
