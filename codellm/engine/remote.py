"""The engine in a process of its own, behind the same API as ``Engine``.

An engine thread and an HTTP event loop in one process share one GIL: at hundreds of streams the step
loop's host work (building each step, reading tokens, detokenizing, stop strings) and the server's
work per chunk (SSE encoding, socket writes) take turns, and the GPU waits for both (NOTES.md run 19).
Here the engine runs in a child process (vLLM's EngineCore split): the model, the scheduler and the
detokenizer live there; this process keeps the tokenizer and templates to build prompts, and
receives each step's outputs as one message, which the server's event loop (``serve_on``; elsewhere a
receiver thread) hands to the per-request sinks.

Messages are plain tuples over a ``multiprocessing`` pipe between two processes of ours (token ids,
sampling parameters, output text), never weights.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import select
import threading
import time
from typing import Any

from codellm.engine.loader import LoadedModel
from codellm.engine.sampling import SamplingParams, TokenLogprob
from codellm.engine.scheduler import Admission, Handle, Output, Sink, Stats, _json_state
from codellm.errors import CodellmError

log = logging.getLogger("codellm.engine")

_STATS = ("steps", "decode_tokens", "prefill_tokens", "max_batch", "finished", "cancelled", "preempted", "prefix_queries",
          "prefix_hits", "kv_blocks", "kv_used")


def _pack(rid: int, out: Output) -> tuple:
    lps = [(i.token_id, i.logprob, i.top) for i in out.logprobs] if out.logprobs else None
    return (rid, out.index, out.text, out.token_ids, out.finish_reason, out.prompt_tokens, out.completion_tokens,
            lps, out.prompt_logprobs, out.error, out.stop, out.cached_tokens)


def _unpack(item: tuple) -> tuple[int, Output]:
    rid, index, text, ids, reason, n_prompt, n_done, lps, prompt_lps, error, stop, cached = item
    out = Output(index=index, text=text, token_ids=ids, finish_reason=reason, prompt_tokens=n_prompt,
                 completion_tokens=n_done, prompt_logprobs=prompt_lps, error=error, stop=stop, cached_tokens=cached)
    if lps:
        out.logprobs = [TokenLogprob(t, lp, top) for t, lp, top in lps]
    return rid, out


def read_on(loop, conn, callback) -> None:
    """Have ``loop`` call ``callback()`` whenever ``conn`` (a multiprocessing pipe end) has data. uvloop (libuv)
    makes a watched descriptor non-blocking, and ``Connection.recv`` then fails mid-message with
    BlockingIOError on a message larger than the socket buffer: the descriptor is made blocking again."""
    def register() -> None:
        loop.add_reader(conn.fileno(), callback)
        os.set_blocking(conn.fileno(), True)

    loop.call_soon_threadsafe(register)


class EngineProcess(Admission):
    """Starts the child, waits until its model is loaded (and its decode graphs captured), then relays."""

    def __init__(self, registry, entry, weights, *, load: dict[str, Any], engine: dict[str, Any], view: dict[str, Any],
                 max_queue: int = 256):
        from codellm.engine import loader

        ctx = multiprocessing.get_context("spawn")  # CUDA cannot cross a fork
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_child_main, name=f"codellm-engine:{entry.name.short}", daemon=True,
                                   args=(child, str(registry.home), str(entry.name), load, engine, view,
                                         logging.getLogger("codellm").getEffectiveLevel()))
        self.process.start()
        child.close()
        ready = self._wait_ready()
        self.lm: LoadedModel = loader.view(registry, entry, weights, None, ready["device"], ready["dtype"], **view)
        self.lm.max_len = ready["max_len"]
        self.slots: int = ready["slots"]
        self.kv_bytes: int = ready["kv_bytes"]
        self.stats = Stats()
        self._active = 0
        self._init_admission(max_queue)
        self._sinks: dict[int, list] = {}  # request id -> [sink, sequences not finished]
        self._replies: dict[int, Any] = {}
        self._replied = threading.Condition()
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._dead: str | None = None
        self._reader: Any = None  # what reads the child's messages: an event loop (serve_on) or a thread, from first use
        self._reader_lock = threading.Lock()
        self._poller: Any = None  # the loop reader's readiness check, made on first use
        self._name = entry.name.short

    def _wait_ready(self) -> dict:
        while not self._conn.poll(0.5):
            if not self.process.is_alive():
                raise CodellmError(f"the engine process exited while loading (exit code {self.process.exitcode})")
        kind, payload = self._conn.recv()
        if kind == "error":
            self.process.join(10)
            raise payload
        return payload

    def serve_on(self, loop) -> None:
        """Read the child's messages on ``loop`` (the server's asyncio loop) rather than in a thread of their own.
        A receiver thread has to win the GIL from the busy event loop for every message (up to the 5 ms switch
        interval each time), and so does every output it hands over; on the loop, outputs go straight into the
        request streams. Only before first use: a reader, once chosen, stays."""
        with self._reader_lock:
            if self._reader is not None:
                return
            self._reader = loop
        read_on(loop, self._conn, self._pump)

    def _ensure_reader(self) -> None:
        if self._reader is None:
            with self._reader_lock:
                if self._reader is None:
                    self._reader = threading.Thread(target=self._receive, name=f"engine-io:{self._name}", daemon=True)
                    self._reader.start()

    # -- the Engine API ------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._dead is None and self.process.is_alive()

    def active(self) -> int:
        return self._active

    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink, *, n: int = 1,
               prompt_logprobs: bool = False, lm: LoadedModel | None = None) -> Handle:
        lm = lm or self.lm
        if self._dead:
            raise CodellmError(self._dead)
        _json_state(params)  # a bad JSON prefix is the caller's error, raised here rather than in the child
        self._ensure_reader()
        self._reserve(prompt, n, lm, params)
        rid = next(self._ids)
        self._sinks[rid] = [self._timed(sink), n]
        try:
            self._send(("add", rid, list(prompt), params, n, prompt_logprobs, lm.name))
        except BaseException:
            self._sinks.pop(rid, None)
            self._released(n)
            raise
        return Handle(self, [rid])

    def cancel(self, handle: Handle) -> None:
        for rid in handle.seqs:
            if rid in self._sinks:
                self._send(("cancel", rid))

    def attach_adapter(self, registry, entry) -> tuple[None, str]:
        return None, self._call("attach", str(entry.name))

    def embed(self, lm: LoadedModel, texts: list[str], *, truncate: bool = True) -> tuple[list[list[float]], int]:
        return self._call("embed", lm.name, texts, truncate)

    def shutdown(self) -> None:
        try:
            self._send(("stop",))
        except (OSError, CodellmError):
            pass
        self.process.join(15)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    # -- plumbing --------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError) as exc:
                raise CodellmError(self._dead or f"the engine process is gone: {exc}") from None

    def _call(self, kind: str, *args, timeout: float = 600.0):
        """A request the child answers (attaching an adapter): wait for its reply."""
        self._ensure_reader()
        call = next(self._ids)
        self._send((kind, call, *args))
        deadline = time.monotonic() + timeout
        with self._replied:
            while call not in self._replies:
                if self._dead or not self._replied.wait(max(0.0, deadline - time.monotonic())):
                    raise CodellmError(self._dead or f"the engine process did not answer {kind!r}")
            ok, value = self._replies.pop(call)
        if not ok:
            raise value
        return value

    def _receive(self) -> None:
        try:
            while True:
                self._handle(self._conn.recv())
        except (EOFError, OSError):
            pass
        self._gone()

    def _pump(self) -> None:
        """The loop's reader callback: every message already here, then back to the loop. ``Connection.poll``
        builds a selector per call; one ``select.poll`` object made once answers the same question for less."""
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._conn.fileno(), select.POLLIN)
        try:
            while self._poller.poll(0):
                self._handle(self._conn.recv())
        except (EOFError, OSError):
            self._reader.remove_reader(self._conn.fileno())
            self._gone()

    def _handle(self, message: tuple) -> None:
        kind, *payload = message
        if kind == "out":
            items, stats, self._active = payload
            for name, value in zip(_STATS, stats):
                setattr(self.stats, name, value)
            for item in items:
                self._deliver(*_unpack(item))
        elif kind == "reply":
            with self._replied:
                self._replies[payload[0]] = (payload[1], payload[2])
                self._replied.notify_all()

    def _gone(self) -> None:
        self._dead = f"the engine process exited (exit code {self.process.exitcode})"
        with self._replied:
            self._replied.notify_all()
        for rid in list(self._sinks):  # whoever still waits hears why
            sink, left = self._sinks.pop(rid)
            self._released(left)
            for index in range(left):
                sink(Output(index=index, finish_reason="error", error=self._dead))

    def _deliver(self, rid: int, out: Output) -> None:
        entry = self._sinks.get(rid)
        if entry is None:
            return
        if out.finish_reason is not None:
            self._released()
            entry[1] -= 1
            if entry[1] == 0:
                del self._sinks[rid]
        try:
            entry[0](out)
        except Exception:  # a sink must never stop the receiver
            log.exception("sink failed")


# -- the child -------------------------------------------------------------------------------
class _Outbox:
    """Outputs from the engine thread, sent by a thread of their own: everything that piled up while the
    last message was being sent goes in the next one (about one message per step)."""

    def __init__(self, conn, engine):
        self.conn, self.engine = conn, engine
        self.items: list[tuple] = []
        self.cond = threading.Condition()
        self.send_lock = threading.Lock()
        threading.Thread(target=self._run, name="engine-outbox", daemon=True).start()

    def sink(self, rid: int) -> Sink:
        def put(out: Output) -> None:
            with self.cond:
                self.items.append(_pack(rid, out))
                self.cond.notify()
        return put

    def send(self, message: tuple) -> None:
        with self.send_lock:
            self.conn.send(message)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.items:
                    self.cond.wait()
                items, self.items = self.items, []
            s = self.engine.stats
            try:
                self.send(("out", items, tuple(getattr(s, name) for name in _STATS), self.engine.active()))
            except (OSError, ValueError):
                return


def _reply(outbox: _Outbox, call: int, fn, *args, **kwargs) -> None:
    """Run ``fn`` and send its result, or its error, as the reply to ``call``."""
    try:
        outbox.send(("reply", call, True, fn(*args, **kwargs)))
    except Exception as exc:
        outbox.send(("reply", call, False, exc if isinstance(exc, CodellmError) else
                     CodellmError(f"{type(exc).__name__}: {exc}")))


def _child_main(conn, home: str, name: str, load: dict, engine_opts: dict, view_opts: dict, level: int) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from codellm.engine import loader, memory
    from codellm.engine.scheduler import Engine
    from codellm.registry import Registry

    torch.set_grad_enabled(False)
    handles: dict[int, Handle] = {}
    stopped = threading.Event()

    def handle(kind: str, *args) -> None:
        nonlocal handles
        if kind == "add":
            rid, prompt, params, n, prompt_logprobs, model = args
            sink = outbox.sink(rid)
            try:
                handles[rid] = engine.submit(prompt, params, sink, n=n, prompt_logprobs=prompt_logprobs,
                                             lm=views.get(model, base))
            except Exception as exc:  # checked in the parent already; should it still fail, say so
                for index in range(n):
                    sink(Output(index=index, finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
        elif kind == "cancel":
            handle = handles.pop(args[0], None)
            if handle is not None:
                handle.cancel()
        elif kind == "attach":
            call, model = args

            def attach(model=model):
                entry = registry.get(model)
                weights_model, adapter = engine.attach_adapter(registry, entry)
                for v in views.values():
                    v.model = weights_model
                views[model] = loader.view(registry, entry, weights, weights_model, dev, dtype, adapter=adapter,
                                           max_len_cap=base.max_len, **view_opts)
                return adapter

            _reply(outbox, call, attach)
        elif kind == "embed":  # beside the step loop, as in one process
            threading.Thread(target=_reply, args=(outbox, args[0], engine.embed, views.get(args[1], base), args[2]),
                             kwargs={"truncate": args[3]}, daemon=True).start()
        elif kind == "stop":
            stopped.set()
        if len(handles) > 4 * engine.max_queue:  # forget finished requests' handles now and then
            handles = {rid: h for rid, h in handles.items() if not all(s.finished for s in h.seqs)}

    def source(timeout: float) -> None:
        """The engine thread takes in what the parent sent, between its steps: a reader thread of its own would
        wait for the GIL (up to the 5 ms switch interval) for every message while the step loop runs."""
        if stopped.is_set():
            return
        try:
            while conn.poll(timeout):
                handle(*conn.recv())
                timeout = 0.0
        except (EOFError, OSError):  # the parent is gone
            stopped.set()

    try:
        registry = Registry(home)
        entry, weights = loader.resolve(registry, name)
        model, dev, dtype = loader.load_weights(registry, entry, weights, **load)
        base = loader.view(registry, entry, weights, model, dev, dtype, **view_opts)
        engine = Engine(base, **engine_opts, source=source)  # nothing arrives before "ready" below
        if dev.type == "cuda":  # host tensors here are a few thousand elements: threads only wait on each other
            torch.set_num_threads(1)
        memory.freeze_heap()
    except BaseException as exc:
        conn.send(("error", exc if isinstance(exc, CodellmError) else CodellmError(f"{type(exc).__name__}: {exc}")))
        return
    views: dict[str, LoadedModel] = {str(entry.name): base}
    outbox = _Outbox(conn, engine)
    outbox.send(("ready", {"device": dev, "dtype": dtype, "max_len": base.max_len, "slots": engine.slots,
                         "kv_bytes": engine.kv_bytes}))
    try:
        stopped.wait()
    finally:
        engine.shutdown()
