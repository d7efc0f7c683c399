"""Bridges from the engine thread to consumers: an asyncio stream and a blocking iterator.

Leaving either early (client disconnect, Ctrl-C) cancels the request, which frees its cache slot.
"""

from __future__ import annotations

import asyncio
import time
import collections
import queue
import threading
import weakref
from typing import AsyncIterator, Callable

from codellm.engine.client import EngineClient, Handle
from codellm.engine.outputs import Output
from codellm.engine.sampling import SamplingParams

CHUNKS_PER_S = 8000  # what one event loop writes to its clients and still takes in new requests (NOTES run 21)
MAX_INTERVAL = 0.05  # never hold a stream's text longer than this


def auto_interval(streams: int) -> float:
    """Least seconds between two chunks of one stream when ``streams`` are open on the loop: each chunk costs the
    loop a socket write and a pass through the ASGI stack whether it carries one token or five, so with hundreds of
    streams the loop spends itself writing single tokens while new requests wait to be read (vLLM and SGLang offer
    the same trade as ``--stream-interval``, in tokens). Up to a few dozen streams this is below a decode step and
    changes nothing."""
    return min(MAX_INTERVAL, max(0, streams) / CHUNKS_PER_S)


class _Dispatcher:
    """Hands outputs from the engine thread to one event loop with one wake-up per batch of outputs,
    not one per token per stream (at 256 streams that is 256 self-pipe writes a step). It also knows how many
    choices stream on its loop, which sets how often each of them may send (``interval``)."""

    _by_loop: dict[int, "_Dispatcher"] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.thread = threading.get_ident()  # made on the loop's own thread (by a stream opened there)
        self.pending: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.scheduled = False
        self.streams = 0  # choices open on this loop
        self.fixed: float | None = None  # seconds between a stream's chunks; None: ``auto_interval``

    def interval(self) -> float:
        return auto_interval(self.streams) if self.fixed is None else self.fixed

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


def pace_streams(loop: asyncio.AbstractEventLoop, seconds: float | None) -> None:
    """Streams on ``loop`` send at most one chunk per ``seconds`` (0: every output as it comes; None: automatic,
    see ``auto_interval``). A stream's first chunk goes at once."""
    _Dispatcher.of(loop).fixed = seconds


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
    out.finish_reason, out.error, out.stop = later.finish_reason, later.error, later.stop
    return out


class AsyncStream:
    """Outputs of one or more submissions (several prompts, n choices each) merged in arrival order.

    Choice indexes are offset so that prompt ``p`` with ``n`` choices owns ``p*n .. p*n+n-1``. A choice's outputs
    that piled up are handed over as one: each chunk then carries several tokens (vLLM merges deltas the same
    way). They pile up when the reader falls behind the engine, and on purpose: once the reader has caught up,
    the next output waits out the loop's interval (``pace_streams``), unless it ends a choice.
    """

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self._dispatcher = _Dispatcher.of(self._loop)
        self._queue = _Mailbox()
        self._open = 0
        self._counted = 0  # choices counted open in the dispatcher
        self._due = 0.0  # loop time before which the next output is held back
        self.handles: list[Handle] = []
        self.first_at: float | None = None  # perf_counter() when the first output was read (prompt timing)

    def add(self, engine: EngineClient, prompt: list[int], params: SamplingParams, *, n: int = 1, offset: int = 0,
            prompt_logprobs: bool = False, lm=None) -> "AsyncStream":
        dispatcher = self._dispatcher

        def sink(out: Output) -> None:
            out.index += offset
            dispatcher.post(self._queue, out)

        try:
            self.handles.append(engine.submit(prompt, params, sink, n=n, prompt_logprobs=prompt_logprobs, lm=lm))
        except BaseException:
            self.cancel()
            raise
        self._open += n
        self._counted += n
        dispatcher.streams += n
        return self

    def __aiter__(self):
        return self

    async def __anext__(self) -> Output:
        if self._open == 0:
            raise StopAsyncIteration
        out = await self._queue.get()
        if self.first_at is None:
            self.first_at = time.perf_counter()
        held = self._due - self._loop.time()
        if held > 0 and out.finish_reason is None:
            await asyncio.sleep(held)  # let this choice's next tokens join it
        if out.finish_reason is None and self._queue.items:  # this choice's outputs already here, in order;
            others: collections.deque[Output] = collections.deque()  # other choices' keep theirs
            for later in self._queue.items:
                if later.index == out.index and out.finish_reason is None:
                    out = _absorb(out, later)
                else:
                    others.append(later)
            self._queue.items = others
        if out.finish_reason is not None:
            self._open -= 1
            self._uncount(1)
        if not self._queue.items:  # caught up: the next chunk waits out the interval (until then none does)
            self._due = self._loop.time() + self._dispatcher.interval()
        return out

    def _uncount(self, n: int) -> None:
        n = min(n, self._counted)
        self._counted -= n
        self._dispatcher.streams -= n

    def has_pending(self) -> bool:
        """Outputs already here: a writer can send them together with what it holds."""
        return bool(self._queue.items)

    def cancel(self) -> None:
        self._uncount(self._counted)  # its reader is gone or done: it no longer streams
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


def iterate(engine: EngineClient, prompt: list[int], params: SamplingParams, lm=None):
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
