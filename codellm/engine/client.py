"""The one interface the server and the CLI use to generate: ``EngineClient``.

Two engines implement it: ``core.Engine`` (a thread in this process) and ``remote.EngineProcess`` (the
same engine in a child process). Both run ``Admission`` first, in the caller's process, so a bad or
unwelcome request is refused the same way, synchronously, before it costs the engine anything, and each choice
is timed there (``telemetry``).
"""

from __future__ import annotations

import threading
from typing import Any, Protocol, runtime_checkable

import msgspec

from codellm.engine.loader import LoadedModel
from codellm.engine.outputs import Sink, Stats
from codellm.engine.sampling import SamplingParams, checked
from codellm.errors import ContextLengthExceeded, InvalidRequest, QueueFull


class Handle:
    """What ``submit`` returns: cancel it when the client goes away."""

    def __init__(self, engine: "EngineClient", seqs: list):
        self.engine, self.seqs = engine, seqs

    def cancel(self) -> None:
        self.engine.cancel(self)


@runtime_checkable
class EngineClient(Protocol):
    lm: LoadedModel  # the model it was loaded for (tokenizer, template, context length)
    stats: Stats
    max_queue: int
    slots: int  # sequences decoded together at most
    kv_bytes: int

    @property
    def alive(self) -> bool: ...

    def active(self) -> int:
        """Sequences holding a batch row now."""

    def pending(self) -> int:
        """Sequences submitted and not finished."""

    def check_prompt(self, n_prompt: int, lm: LoadedModel | None = None) -> None: ...

    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink, *, n: int = 1,
               prompt_logprobs: bool = False, lm: LoadedModel | None = None) -> Handle:
        """Queue ``n`` choices for ``prompt``; their outputs go to ``sink`` (from another thread), each choice
        ending with one output whose ``finish_reason`` is set."""

    def cancel(self, handle: Handle) -> None: ...

    def embed(self, lm: LoadedModel, texts: list[str], *, truncate: bool = True) -> tuple[list[list[float]], int]: ...

    def attach_adapter(self, registry, entry) -> tuple[Any, str]: ...

    def detach_adapter(self, adapter: str) -> Any:
        """Take the adapter named ``adapter`` (as ``attach_adapter`` named it) off the weights; its memory and its
        rows in the captured graphs go with it. Refused while a sequence uses it. Returns the model in this process
        now (None when the weights live in another)."""

    def shutdown(self) -> None: ...


class Admission:
    """What every engine front does before a prompt goes in, the same in this process or another: the prompt
    fits the context, the queue has room; ``_queued`` counts sequences submitted and not yet finished."""

    lm: LoadedModel
    max_queue: int
    timed = True  # each choice timed for /metrics (not again in an engine process: its parent does it)

    def _init_admission(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._queued = 0
        self._lock = threading.Lock()

    def pending(self) -> int:
        with self._lock:
            return self._queued

    def check_prompt(self, n_prompt: int, lm: LoadedModel | None = None) -> None:
        max_len = min((lm or self.lm).max_len, self.lm.max_len)
        if n_prompt >= max_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{n_prompt} tokens in the prompt, which leaves no room for the completion. "
                "Please reduce the length of the prompt.", param="messages",
            )

    def _reserve(self, prompt: list[int], n: int, lm: LoadedModel, params: SamplingParams) -> None:
        """Everything a request could get wrong is refused here, before it joins a batch: in a batch, one bad
        sequence would take the step, and every other sequence in it, down with it."""
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        self.check_prompt(len(prompt), lm)
        vocab = len(lm.tokenizer)
        try:
            in_vocab = 0 <= min(prompt) and max(prompt) < vocab
        except TypeError:
            in_vocab = False
        if not in_vocab:
            raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        checked(msgspec.structs.asdict(params))
        with self._lock:
            if self._queued + n > self.max_queue:
                raise QueueFull(f"the server is busy: {self._queued} requests are queued for {self.lm.name}")
            self._queued += n

    def _released(self, n: int = 1) -> None:
        with self._lock:
            self._queued -= n
