"""The engine in a process of its own, behind the same client interface as ``core.Engine``.

An engine thread and an HTTP event loop in one process share one GIL: at hundreds of streams the step
loop's host work (building each step, reading tokens, detokenizing, stop strings) and the server's
work per chunk (SSE encoding, socket writes) take turns, and the GPU waits for both (NOTES.md run 19).
Here the engine runs in a child process (vLLM's EngineCore split): the model, the scheduler and the
detokenizer live there; this process keeps the tokenizer and templates to build prompts, and
receives each step's outputs as one message, which the server's event loop (``serve_on``; elsewhere a
receiver thread) hands to the per-request sinks.

Messages are typed msgspec Structs, encoded as MessagePack, over a ``multiprocessing`` pipe: token ids,
sampling parameters, output text and counters, never weights, never pickles.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import os
import select
import threading
import time
from typing import Any

import msgspec

from codellm import errors
from codellm.engine import telemetry
from codellm.engine.client import Admission, Handle
from codellm.engine.loader import LoadedModel
from codellm.engine.outputs import Output, Sink, Stats
from codellm.engine.sampling import SamplingParams
from codellm.engine.sequence import constraint
from codellm.errors import CodellmError

log = logging.getLogger("codellm.engine")


# -- messages ---------------------------------------------------------------------------------
class Add(msgspec.Struct, tag="add", array_like=True):
    rid: int
    prompt: list[int]
    params: SamplingParams
    n: int
    prompt_logprobs: bool
    model: str  # the model view (a base or one of its adapters)


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    rid: int


class Attach(msgspec.Struct, tag="attach", array_like=True):
    call: int
    model: str


class Detach(msgspec.Struct, tag="detach", array_like=True):
    call: int
    adapter: str  # as ``attach_adapter`` named it


class Embed(msgspec.Struct, tag="embed", array_like=True):
    call: int
    model: str
    texts: list[str | list[int]]
    truncate: bool


class Stop(msgspec.Struct, tag="stop", array_like=True):
    pass


class Failure(msgspec.Struct, array_like=True):
    """A typed error (``codellm.errors``) on its way across: raised again on the other side as the same class."""

    kind: str
    message: str
    param: str | None = None
    code: str | None = None

    @classmethod
    def of(cls, exc: BaseException) -> "Failure":
        if isinstance(exc, CodellmError):
            return cls(type(exc).__name__, exc.message, exc.param, exc.code)
        return cls("CodellmError", f"{type(exc).__name__}: {exc}")

    def error(self) -> CodellmError:
        kind = getattr(errors, self.kind, CodellmError)
        if not (isinstance(kind, type) and issubclass(kind, CodellmError)):
            kind = CodellmError
        return kind(self.message, param=self.param, code=self.code)


class Ready(msgspec.Struct, tag="ready", array_like=True):
    device: str
    dtype: str
    max_len: int
    slots: int
    kv_bytes: int


class Failed(msgspec.Struct, tag="failed", array_like=True):
    failure: Failure


class Delivery(msgspec.Struct, array_like=True):
    rid: int
    out: Output


class Outputs(msgspec.Struct, tag="out", array_like=True):
    items: list[Delivery]
    stats: Stats
    active: int


class Reply(msgspec.Struct, tag="reply", array_like=True):
    call: int
    value: Any = None
    failure: Failure | None = None


ToChild = Add | Cancel | Attach | Detach | Embed | Stop
ToParent = Ready | Failed | Outputs | Reply


class Channel:
    """One end of the pipe, speaking messages: ``send`` is safe from several threads."""

    def __init__(self, conn, incoming):
        self.conn = conn
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(incoming)
        self._lock = threading.Lock()

    def send(self, message: msgspec.Struct) -> None:
        data = self._encoder.encode(message)
        with self._lock:
            self.conn.send_bytes(data)

    def recv(self):
        return self._decoder.decode(self.conn.recv_bytes())

    def poll(self, timeout: float = 0.0) -> bool:
        return self.conn.poll(timeout)

    def fileno(self) -> int:
        return self.conn.fileno()


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
        import torch

        from codellm.engine import loader

        ctx = multiprocessing.get_context("spawn")  # CUDA cannot cross a fork
        conn, child = ctx.Pipe()
        self._channel = Channel(conn, ToParent)
        self.process = ctx.Process(target=_child_main, name=f"codellm-engine:{entry.name.short}", daemon=True,
                                   args=(child, str(registry.home), registry.read_only, str(entry.name), load, engine,
                                         view, logging.getLogger("codellm").getEffectiveLevel()))
        self.process.start()
        child.close()
        ready = self._wait_ready()
        self.lm: LoadedModel = loader.view(registry, entry, weights, None, torch.device(ready.device),
                                           getattr(torch, ready.dtype), **view)
        self.lm.max_len = ready.max_len
        self.slots: int = ready.slots
        self.kv_bytes: int = ready.kv_bytes
        self.stats = Stats()
        self._active = 0
        self._init_admission(max_queue)
        self._sinks: dict[int, list] = {}  # request id -> [sink, sequences not finished]
        self._replies: dict[int, Reply] = {}
        self._replied = threading.Condition()
        self._ids = itertools.count(1)
        self._dead: str | None = None
        self._reader: Any = None  # what reads the child's messages: an event loop (serve_on) or a thread, from first use
        self._reader_lock = threading.Lock()
        self._poller: Any = None  # the loop reader's readiness check, made on first use
        self._name = entry.name.short

    def _wait_ready(self) -> Ready:
        while not self._channel.poll(0.5):
            if not self.process.is_alive():
                raise CodellmError(f"the engine process exited while loading (exit code {self.process.exitcode})")
        message = self._channel.recv()
        if isinstance(message, Failed):
            self.process.join(10)
            raise message.failure.error()
        return message

    def serve_on(self, loop) -> None:
        """Read the child's messages on ``loop`` (the server's asyncio loop) rather than in a thread of their own.
        A receiver thread has to win the GIL from the busy event loop for every message (up to the 5 ms switch
        interval each time), and so does every output it hands over; on the loop, outputs go straight into the
        request streams. Only before first use: a reader, once chosen, stays."""
        with self._reader_lock:
            if self._reader is not None:
                return
            self._reader = loop
        read_on(loop, self._channel.conn, self._pump)

    def _ensure_reader(self) -> None:
        if self._reader is None:
            with self._reader_lock:
                if self._reader is None:
                    self._reader = threading.Thread(target=self._receive, name=f"engine-io:{self._name}", daemon=True)
                    self._reader.start()

    # -- the client interface --------------------------------------------------------------
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
        constraint(params, lm.tokenizer, lm.eos_ids)  # a grammar or its prefix that
        # cannot be used is the caller's error, raised here rather than in the child
        self._ensure_reader()
        self._reserve(prompt, n, lm, params)
        rid = next(self._ids)
        self._sinks[rid] = [telemetry.timed(sink, lm.name), n]
        try:
            self._send(Add(rid, list(prompt), params, n, prompt_logprobs, lm.name))
        except BaseException:
            self._sinks.pop(rid, None)
            self._released(n)
            raise
        return Handle(self, [rid])

    def cancel(self, handle: Handle) -> None:
        for rid in handle.seqs:
            if rid in self._sinks:
                self._send(Cancel(rid))

    def attach_adapter(self, registry, entry) -> tuple[None, str]:
        return None, self._call(lambda call: Attach(call, str(entry.name)))

    def detach_adapter(self, adapter: str) -> None:
        left = self._call(lambda call: Detach(call, adapter))
        self.stats = msgspec.structs.replace(self.stats, adapters=left)

    def embed(self, lm: LoadedModel, texts: list[str], *, truncate: bool = True) -> tuple[list[list[float]], int]:
        vectors, tokens = self._call(lambda call: Embed(call, lm.name, texts, truncate))
        return vectors, tokens

    def shutdown(self) -> None:
        try:
            self._send(Stop())
        except (OSError, CodellmError):
            pass
        self.process.join(15)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    # -- plumbing --------------------------------------------------------------------------
    def _send(self, message: msgspec.Struct) -> None:
        try:
            self._channel.send(message)
        except (OSError, ValueError) as exc:
            raise CodellmError(self._dead or f"the engine process is gone: {exc}") from None

    def _call(self, message, timeout: float = 600.0):
        """A request the child answers (attaching an adapter, embedding): wait for its reply."""
        self._ensure_reader()
        call = next(self._ids)
        sent = message(call)
        self._send(sent)
        deadline = time.monotonic() + timeout
        with self._replied:
            while call not in self._replies:
                if self._dead or not self._replied.wait(max(0.0, deadline - time.monotonic())):
                    raise CodellmError(self._dead or f"the engine process did not answer {type(sent).__name__.lower()}")
            reply = self._replies.pop(call)
        if reply.failure is not None:
            raise reply.failure.error()
        return reply.value

    def _receive(self) -> None:
        try:
            while True:
                self._handle(self._channel.recv())
        except (EOFError, OSError):
            pass
        self._gone()

    def _pump(self) -> None:
        """The loop's reader callback: every message already here, then back to the loop. ``Connection.poll``
        builds a selector per call; one ``select.poll`` object made once answers the same question for less."""
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._channel.fileno(), select.POLLIN)
        try:
            while self._poller.poll(0):
                self._handle(self._channel.recv())
        except (EOFError, OSError):
            self._reader.remove_reader(self._channel.fileno())
            self._gone()

    def _handle(self, message) -> None:
        if isinstance(message, Outputs):
            self.stats, self._active = message.stats, message.active
            for item in message.items:
                self._deliver(item.rid, item.out)
        elif isinstance(message, Reply):
            with self._replied:
                self._replies[message.call] = message
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
    last message was being sent goes in the next one (about one message per step). Handing one over is an
    append to a deque (atomic) and, for the first of a batch, a wake-up: a lock and a notify for every output cost
    the engine thread several microseconds each at hundreds of streams."""

    def __init__(self, channel: Channel, engine):
        self.channel, self.engine = channel, engine
        self.items: collections.deque[Delivery] = collections.deque()
        self.ready = threading.Event()
        threading.Thread(target=self._run, name="engine-outbox", daemon=True).start()

    def sink(self, rid: int) -> Sink:
        items, ready = self.items, self.ready

        def put(out: Output) -> None:
            items.append(Delivery(rid, out))
            if not ready.is_set():
                ready.set()
        return put

    def _run(self) -> None:
        while True:
            self.ready.wait()
            self.ready.clear()  # before taking the items: one appended after this sets it again
            items = [self.items.popleft() for _ in range(len(self.items))]
            if not items:
                continue
            try:
                stats = msgspec.structs.replace(self.engine.stats, batch_sizes={})  # (a histogram the parent does not show)
                self.channel.send(Outputs(items, stats, self.engine.active()))
            except (OSError, ValueError):
                return


def _reply(channel: Channel, call: int, fn, *args, **kwargs) -> None:
    """Run ``fn`` and send its result, or its error, as the reply to ``call``."""
    try:
        channel.send(Reply(call, fn(*args, **kwargs)))
    except Exception as exc:
        channel.send(Reply(call, failure=Failure.of(exc)))


def _loopback_url() -> str:
    """Where the ranks meet: a free port on the loopback interface."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _child_main(conn, home: str, read_only: bool, name: str, load: dict, engine_opts: dict, view_opts: dict, level: int) -> None:
    from codellm import logs

    logs.configure(level)
    import torch

    from codellm.engine import loader, memory
    from codellm.engine.core import Engine
    from codellm.registry import Registry

    torch.set_grad_enabled(False)
    channel = Channel(conn, ToChild)
    handles: dict[int, Handle] = {}
    stopped = threading.Event()

    def handle(message) -> None:
        nonlocal handles
        if isinstance(message, Add):
            sink = outbox.sink(message.rid)
            try:
                handles[message.rid] = engine.submit(message.prompt, message.params, sink, n=message.n,
                                                     prompt_logprobs=message.prompt_logprobs,
                                                     lm=views.get(message.model, base))
            except Exception as exc:  # checked in the parent already; should it still fail, say so
                for index in range(message.n):
                    sink(Output(index=index, finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
        elif isinstance(message, Cancel):
            found = handles.pop(message.rid, None)
            if found is not None:
                found.cancel()
        elif isinstance(message, Attach):
            def attach(model=message.model):
                entry = registry.get(model)
                weights_model, adapter = engine.attach_adapter(registry, entry)
                for v in views.values():
                    v.model = weights_model
                views[model] = loader.view(registry, entry, weights, weights_model, dev, dtype, adapter=adapter,
                                           max_len_cap=base.max_len, **view_opts)
                return adapter

            _reply(channel, message.call, attach)
        elif isinstance(message, Detach):
            def detach(adapter=message.adapter):
                weights_model = engine.detach_adapter(adapter)
                for name in [k for k, v in views.items() if v.adapter == adapter]:
                    del views[name]
                for v in views.values():
                    v.model = weights_model
                return engine.stats.adapters

            _reply(channel, message.call, detach)
        elif isinstance(message, Embed):  # beside the step loop, as in one process
            threading.Thread(target=_reply, args=(channel, message.call, engine.embed, views.get(message.model, base),
                                                  message.texts), kwargs={"truncate": message.truncate}, daemon=True).start()
        elif isinstance(message, Stop):
            stopped.set()
        if len(handles) > 4 * engine.max_queue:  # forget finished requests' handles now and then
            handles = {rid: h for rid, h in handles.items() if not all(s.finished for s in h.seqs)}

    def source(timeout: float) -> None:
        """The engine thread takes in what the parent sent, between its steps: a reader thread of its own would
        wait for the GIL (up to the 5 ms switch interval) for every message while the step loop runs."""
        if stopped.is_set():
            return
        try:
            while channel.poll(timeout):
                handle(channel.recv())
                timeout = 0.0
        except (EOFError, OSError):  # the parent is gone
            stopped.set()

    try:
        registry = Registry(home, read_only=read_only)
        entry, weights = loader.resolve(registry, name)
        world = engine_opts.pop("tensor_parallel", 1) or 1
        ranks = None
        if world > 1:  # this process is rank 0 and starts the others; each rank reads its own share of the weights
            from codellm.engine import sharding

            sharding.plan(memory.text_config(registry, weights) or {}, world)  # (fails before any rank starts)
            cuda = loader.pick_device(load.get("device"), load.get("dtype"))[0].type == "cuda"
            if cuda:
                load = {**load, "device": "cuda:0"}  # rank r runs on GPU r
            ranks = sharding.Ranks.spawn(world, (home, read_only, name, load), _loopback_url(),
                                         "nccl" if cuda else "gloo")
            try:
                model, dev, dtype = loader.load_weights(registry, entry, weights, **load, shard=(0, world))
                ranks.join()
            except BaseException:
                ranks.kill()
                raise
        else:
            model, dev, dtype = loader.load_weights(registry, entry, weights, **load)
        base = loader.view(registry, entry, weights, model, dev, dtype, **view_opts)
        draft = loader.load_draft(registry, engine_opts.get("speculative"), base, **load)
        engine = Engine(base, **engine_opts, draft=draft, source=source, ranks=ranks)  # nothing arrives before "ready"
        engine.timed = False  # the parent times each choice
        from codellm.engine import grammar

        grammar.warm(base.tokenizer, base.eos_ids, wait=True)  # before "ready": not beside the first requests' steps
        if dev.type == "cuda":  # host tensors here are a few thousand elements: threads only wait on each other
            torch.set_num_threads(1)
        memory.freeze_heap()
    except BaseException as exc:
        channel.send(Failed(Failure.of(exc)))
        return
    views: dict[str, LoadedModel] = {str(entry.name): base}
    outbox = _Outbox(channel, engine)
    channel.send(Ready(str(dev), str(dtype).removeprefix("torch."), base.max_len, engine.slots, engine.kv_bytes))
    try:
        stopped.wait()
    finally:
        engine.shutdown()
