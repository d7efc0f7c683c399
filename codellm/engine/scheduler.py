"""Continuous batching: one engine thread per loaded model runs the step loop.

Each iteration admits waiting sequences (a batch row each, and KV blocks from the pool: a prompt that
starts like an earlier one shares that one's cached blocks and prefills only the rest), spends a
bounded token budget on prefill (long prompts are chunked, so running streams keep decoding), then
decodes every running sequence in one batched forward pass. When the pool runs out of blocks, the
newest sequences are preempted: their blocks go back and they are computed again later, from what is
still cached. Sequences join and leave at token boundaries; a cancelled one (client gone) gives its
row and blocks back before the next step. Results go to a per-request ``sink``
callable from the engine thread; the server turns those into SSE/NDJSON on its event loop.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from bisect import bisect_left
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import msgspec
import torch

from codellm.errors import ContextLengthExceeded, InvalidRequest, QueueFull
from codellm.engine import blocks, fusion, kvcache, memory, multilora
from codellm.engine.detok import IncrementalDetokenizer, StopMatcher
from codellm.engine.jsonmode import JsonPrefix
from codellm.engine.loader import LoadedModel
from codellm.engine.sampling import SamplingParams, TokenLogprob, checked, generator, sample

log = logging.getLogger("codellm.engine")
_ids = itertools.count(1)


@dataclass
class Output:
    """One step's news for one sequence (choice ``index`` of its request)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: list[float | None] | None = None
    error: str | None = None
    stop: str | None = None  # the stop string that ended the choice (finish_reason "stop")
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


Sink = Callable[[Output], None]


@dataclass(eq=False)
class Sequence:
    index: int
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    max_new: int
    stop_ids: set[int]
    detok: IncrementalDetokenizer
    stops: StopMatcher
    generator: torch.Generator | None
    want_prompt_logprobs: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    slot: int | None = None  # its batch row (and block-table row) while running
    chain: blocks.Chain | None = None  # its KV blocks while running
    cached: int = 0  # tokens whose keys and values are in the cache
    target: int = 0  # tokens to have in the cache before decoding: the prompt (after a preemption, all but the last)
    hit: int = 0  # prompt tokens found in the prefix cache when first admitted
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    prompt_logprobs: list[float | None] | None = None
    json: JsonPrefix | None = None
    adapter: str | None = None
    inflight: int = 0  # tokens decoded on the device whose ids the host has not read yet

    @property
    def pipelined(self) -> bool:
        """Its next token is the plain argmax, picked on the device: the host may read it a step later."""
        return self.params.plain_greedy and self.json is None

    @property
    def prefilling(self) -> bool:
        return self.cached < self.target

    def known(self) -> list[int]:
        """Every token whose keys and values belong in the cache: the prompt and what was generated."""
        return self.prompt + self.generated if self.generated else self.prompt


def _json_state(params: SamplingParams) -> JsonPrefix | None:
    if not params.json_object:
        return None
    state = JsonPrefix()
    if params.json_prefix and not state.feed(params.json_prefix):
        raise InvalidRequest("json_prefix is not the start of a JSON object")
    return state


class Handle:
    """What ``submit`` returns: cancel it when the client goes away."""

    def __init__(self, engine: "Engine", seqs: list[Sequence]):
        self.engine, self.seqs = engine, seqs

    def cancel(self) -> None:
        self.engine.cancel(self)


@dataclass
class Stats:
    steps: int = 0
    decode_tokens: int = 0
    prefill_tokens: int = 0
    max_batch: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    finished: int = 0
    cancelled: int = 0
    preempted: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, found
    kv_blocks: int = 0
    kv_used: int = 0


class Histogram:
    """A Prometheus histogram: counts per upper bound (seconds), their sum and count."""

    BOUNDS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, float("inf"))

    def __init__(self):
        self.counts = [0] * len(self.BOUNDS)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.BOUNDS, seconds)] += 1
        self.sum += seconds
        self.count += 1


class Admission:
    """What every engine front does before a prompt goes in, the same in this process or another: the prompt
    fits the context, the queue has room; ``_queued`` counts sequences submitted and not yet finished. It also
    times each sequence from submission to its first output (``ttft``, engine side: the client's time to first
    token minus this is the HTTP server's share)."""

    lm: LoadedModel
    max_queue: int

    def _init_admission(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._queued = 0
        self._lock = threading.Lock()
        self.ttft = Histogram()

    def _timed(self, sink: Sink) -> Sink:
        start, seen = time.perf_counter(), set()

        def timed(out: Output) -> None:
            if out.index not in seen:
                seen.add(out.index)
                self.ttft.observe(time.perf_counter() - start)
            sink(out)
        return timed

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


def default_slots(cuda: bool) -> int:
    """Sequences decoded together when not set: KV memory is paged, so many short ones fit where few long ones do."""
    return 256 if cuda else 8


class Engine(Admission):
    def __init__(self, lm: LoadedModel, *, slots: int | None = None, max_queue: int = 256, prefill_chunk: int | None = None,
                 cuda_graphs: bool = True, compile: bool = False, overlap: bool = True, fuse: bool = True,
                 kv_cache_memory: int | None = None, block_size: int = 16, prefix_caching: bool = True,
                 source: Callable[[float], None] | None = None):
        self.lm = lm
        # where new work comes from besides ``submit`` from other threads: called on the engine thread with how long
        # it may wait (an engine process reads its pipe there, so no reader thread has to win the GIL from this loop)
        self._source = source
        if fuse:  # q/k/v and gate/up as one GEMM each in engine steps (no extra memory)
            fusion.fuse(lm.model)
        cfg = lm.model.config.get_text_config() if hasattr(lm.model.config, "get_text_config") else lm.model.config
        cuda = lm.device.type == "cuda"
        contexts, slots = slots, slots or default_slots(cuda)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        per_token = memory.kv_bytes_per_token(cfg.num_hidden_layers, kv_heads, head_dim, lm.dtype.itemsize)
        tokens = memory.kv_tokens(cuda, lm.max_len, kv_cache_memory, per_token, block_size, slots=contexts)
        self.pool = blocks.BlockPool(tokens // block_size, block_size, caching=prefix_caching)
        self.cache = kvcache.PagedCache(
            layers=cfg.num_hidden_layers, blocks=self.pool.num_blocks, block_size=block_size, rows=slots, kv_heads=kv_heads,
            head_dim=head_dim, max_len=lm.max_len, dtype=lm.dtype, device=lm.device,
        )
        # each slot's last argmax stays on the device, where the next decode step reads its input
        self.last_tokens = torch.zeros(slots, dtype=torch.long, device=lm.device)
        self._host_tokens = [torch.zeros(slots, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._flip = 0
        # the launched step whose tokens the host has not read: ((sequence, slot) rows, pinned host copy, its event)
        self._inflight: tuple[list[tuple[Sequence, int]], torch.Tensor, torch.cuda.Event | None] | None = None
        self.graphs = None
        if cuda_graphs and cuda:
            from codellm.engine.cudagraph import GraphRunner

            self.graphs = GraphRunner(lm.model, self.cache, lm.device, self.last_tokens, compile=compile)
        self.overlap = overlap  # read greedy tokens a step late, while the device runs the next step (see _decode)
        self._init_admission(max_queue)
        # prompt tokens per step: a burst of 64 128-token prompts prefills in one forward on a GPU (time to first
        # token), at the cost of one longer step for streams already decoding
        self.prefill_chunk = prefill_chunk or (8192 if lm.device.type == "cuda" else 512)
        self.free_slots = list(range(slots))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = Stats(kv_blocks=self.pool.num_blocks)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self.step_lock = threading.Lock()  # held while a step runs: hold it to change the model safely
        self._ready = threading.Event()  # set once decode graphs are captured (compiled): loading ends there
        self._thread = threading.Thread(target=self._loop, name=f"engine:{lm.name}", daemon=True)
        self._thread.start()
        self._ready.wait()

    # -- API (any thread) ---------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.cache.slots

    @property
    def _graphs_usable(self) -> bool:
        """Captured graphs run the steps, attached adapters included once they are stacked into the graphs
        (``multilora``); only a kind of LoRA the stacks do not cover leaves the model to PEFT's eager path."""
        return self.graphs is not None and (self.graphs.lora is not None or not self._peft)

    @property
    def _peft(self) -> bool:
        return bool(getattr(self.lm.model, "peft_config", None))

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def active(self) -> int:
        return self.slots - len(self.free_slots)

    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink, *, n: int = 1,
               prompt_logprobs: bool = False, lm: LoadedModel | None = None) -> Handle:
        """Queue ``n`` sequences for ``prompt``. ``lm`` is the model view asked for (its tokenizer, EOS ids and
        adapter) when several models share this engine's weights; default: the engine's own."""
        lm = lm or self.lm
        self._reserve(prompt, n, lm, params)
        room = min(lm.max_len, self.lm.max_len) - len(prompt)
        max_new = min(params.max_tokens, room) if params.max_tokens is not None else room
        try:
            seqs = self._sequences(prompt, params, self._timed(sink), n, prompt_logprobs, lm, max_new)
        except BaseException:
            self._released(n)
            raise
        handle = Handle(self, seqs)
        self._inbox.put(("add", seqs))
        return handle

    def _sequences(self, prompt, params, sink, n, prompt_logprobs, lm, max_new) -> list[Sequence]:
        tok = lm.tokenizer
        stop_ids = set() if params.ignore_eos else set(lm.eos_ids)
        stop_ids |= set(params.stop_token_ids)
        strings = []
        special = set(tok.all_special_tokens) | set(getattr(tok, "added_tokens_encoder", {}) or {})
        for s in params.stop:
            if s in special:
                stop_ids.add(tok.convert_tokens_to_ids(s))
            else:
                strings.append(s)
        return [
            Sequence(
                index=i, prompt=list(prompt), params=params, sink=sink, max_new=max(0, max_new), stop_ids=stop_ids,
                detok=IncrementalDetokenizer(tok, prompt), stops=StopMatcher(strings),
                generator=generator(params.seed, i, self.lm.device),
                want_prompt_logprobs=prompt_logprobs and i == 0,
                json=_json_state(params), adapter=lm.adapter,
            )
            for i in range(n)
        ]

    def cancel(self, handle: Handle) -> None:
        self._inbox.put(("cancel", handle.seqs))

    def embed(self, lm: LoadedModel, texts: list[str], *, truncate: bool = True) -> tuple[list[list[float]], int]:
        """Mean-pooled embeddings from these weights (``embeddings.embed``), beside the step loop."""
        from codellm.engine.embeddings import embed

        return embed(lm, texts, truncate=truncate)

    def attach_adapter(self, registry, entry) -> tuple[object, str]:
        """Put ``entry``'s LoRA adapter on the weights between two steps; (the model now, the adapter's name)."""
        from codellm.engine import loader

        with self.step_lock:
            model, adapter = loader.attach_adapter(registry, self.lm.model, entry)
            self.lm.model = model
            if self.graphs is not None and not self.graphs.disabled:
                self._complete()  # recapturing overwrites each slot's last token on the device: read it first
                rows = multilora.install(model, list(model.peft_config), self.lm.dtype)
                if rows is None:
                    log.warning("adapter %s: this kind of LoRA decodes eagerly (no CUDA graphs)", adapter)
                    self.graphs.lora = None
                else:
                    self.graphs.use_adapters(rows)
                    log.info("adapters %s decode in CUDA graphs (captured again)", ", ".join(rows.index))
        return model, adapter

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=10)

    # -- the loop (engine thread) ------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        try:
            if self._graphs_usable:
                with self.step_lock:
                    self.graphs.warmup()
        finally:
            self._ready.set()
        while not self._stop.is_set():
            idle = not self.waiting and not self.running
            try:
                self._drain(block=idle)
                if self._stop.is_set():
                    break
                with self.step_lock:
                    self._admit()
                    self._prefill()
                    self._grow()
                    self._decode()
                self.stats.kv_used = self.pool.used
            except Exception:  # never let one bad sequence kill the engine, or the others in its batch
                log.exception("engine step failed; stepping its sequences one at a time to find the one at fault")
                self._isolate()
        for seq in list(self.running) + list(self.waiting):
            self._finish(seq, "cancelled")

    def _isolate(self) -> None:
        """After a failed step: every running sequence takes one step alone, and only those that fail alone are
        finished with an error; the others go on as before. The failed step's tokens still on the device are
        dropped, and each of those sequences computes that position again (writing the same cache entries); a prompt
        whose first token was lost prefills its last position again."""
        self._inflight = None
        for seq in self.running:
            seq.inflight = 0
            if not seq.generated and not seq.prefilling:
                seq.cached = seq.target - 1
        for seq in list(self.running):
            if seq.finished:
                continue
            everyone, self.running, failure = self.running, [seq], None
            try:
                with self.step_lock:
                    self._prefill()
                    self._grow()
                    self._decode()
                    self._complete()
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
                self._inflight = None
                seq.inflight = 0
            finally:
                self.running = [s for s in everyone if not s.finished]
            if failure is not None:
                log.error("sequence %d failed on its own and is aborted: %s", seq.id, failure)
                self._finish(seq, "error", error=failure)

    def _drain(self, block: bool) -> None:
        if self._source is not None:
            self._source(0.5 if block and self._inbox.empty() else 0.0)
            block = False
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, seqs = item
            if kind == "add":
                self.waiting.extend(seqs)
            elif kind == "cancel":
                for seq in seqs:
                    seq.cancelled = True
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, "cancelled")
        for seq in [s for s in self.running if s.cancelled]:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        """Waiting sequences, oldest first, while a row and the blocks for their tokens are free. A sequence back
        from a preemption has its generated tokens computed again too (from the cache, where they are still there),
        all but the last: that one is its next decode step's input."""
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            known = seq.known()
            got = self.pool.acquire(known, seq.adapter, reuse=not seq.want_prompt_logprobs)
            if got is None:  # blocks come back as running sequences finish (or are preempted)
                break
            self.waiting.popleft()
            seq.chain, seq.cached = got
            seq.target = len(known) - 1 if seq.generated else len(known)
            if not seq.generated:
                seq.hit = seq.cached
                self.stats.prefix_queries += len(known)
                self.stats.prefix_hits += seq.cached
            seq.slot = self.free_slots.pop(0)
            self.cache.set_row(seq.slot, seq.chain.blocks)
            self.running.append(seq)

    def _grow(self) -> None:
        """A block for every decoding sequence whose next token starts one. When the pool has none left, the
        newest sequences give theirs back (``_preempt``) until it has: the oldest keep going."""
        for seq in list(self.running):
            if seq.finished or seq.prefilling or seq.chain is None:
                continue
            while True:
                need = len(seq.prompt) + len(seq.generated) + seq.inflight
                had = len(seq.chain.blocks)
                if self.pool.extend(seq.chain, need):
                    if len(seq.chain.blocks) != had:
                        self.cache.set_row(seq.slot, seq.chain.blocks)
                    break
                victim = next((s for s in reversed(self.running) if not s.finished), None)
                self._preempt(victim)
                if victim is seq or seq.finished:
                    break

    def _preempt(self, seq: Sequence) -> None:
        """Give back ``seq``'s row and blocks and queue it first, to be computed again when blocks are free."""
        self._complete()  # its token in flight is part of what it will resume from
        if seq.finished:
            return
        log.info("preempting sequence %d (%d tokens): the KV cache is full", seq.id, len(seq.prompt) + len(seq.generated))
        self.running.remove(seq)
        self._give_back(seq)
        seq.cached = 0
        self.waiting.appendleft(seq)
        self.stats.preempted += 1

    def _give_back(self, seq: Sequence) -> None:
        if seq.chain is not None:
            self.pool.release(seq.chain)
            seq.chain = None
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            self.free_slots.sort()
            seq.slot = None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, tables: list[list[int]], adapters: list[str | None],
                 all_logits: bool = False) -> torch.Tensor:
        """One eager forward: row i is the sequence with blocks ``tables[i]``, with adapter ``adapters[i]`` (None: base)."""
        extra = {}
        if self._peft:  # rows pick their adapter (PEFT mixed-batch LoRA)
            extra["adapter_names"] = [a or "__base__" for a in adapters]
        return self._logits(kvcache.step_context(self.cache, tables, positions), ids, positions.clamp(min=0),
                         0 if all_logits else 1, **extra)

    def _logits(self, ctx: kvcache.StepContext, ids: torch.Tensor, positions: torch.Tensor, logits_to_keep, **extra) -> torch.Tensor:
        """The model's logits for ``ids`` at ``positions`` (CPU tensors) inside step ``ctx``, launched eagerly."""
        dev = self.lm.device
        if isinstance(logits_to_keep, torch.Tensor):
            logits_to_keep = logits_to_keep.to(dev)
        with kvcache.use(ctx), kvcache.attention_backends(dev), torch.inference_mode():
            return self.lm.model(input_ids=ids.to(dev), position_ids=positions.to(dev), use_cache=False,
                                 logits_to_keep=logits_to_keep, **extra).logits

    def _prefill(self) -> None:
        """Spend up to ``prefill_chunk`` tokens on prompts: packed end to end in one row (each chunk attending to
        its cached prefix and itself), long prompts chunked across steps."""
        self.cache.sync()
        budget = self.prefill_chunk
        plan: list[tuple[Sequence, int, int]] = []
        for seq in [s for s in self.running if s.prefilling]:
            if budget <= 0:
                break
            start = seq.cached
            end = min(seq.target, start + budget)
            if seq.want_prompt_logprobs:  # needs every position's logits: a forward of its own
                self._prefill_one(seq, start, end)
            else:
                plan.append((seq, start, end))
            budget -= end - start
        if not plan:
            return
        if self._peft and not self._graphs_usable:  # PEFT picks adapters per row: left-padded rows, not one packed row
            self._prefill_rows(plan)
            return
        if all(start == 0 for _, start, _ in plan) and self._graphs_usable:
            # fresh prompts: captured graphs; every group launched before the first tokens are read (one wait)
            groups = self.graphs.prefill_groups([end for _, _, end in plan])
            packed = [self._prefill_packed([plan[i] for i in group], keep=len(groups) > 1) for group in groups]
        else:
            packed = [self._prefill_packed(plan)]
        seqs = [seq for group_seqs, _ in packed for seq in group_seqs]
        if seqs:
            self._after_prefill(seqs, torch.cat([logits for group_seqs, logits in packed if group_seqs]))

    def _chunks(self, plan: list[tuple[Sequence, int, int]]) -> list[tuple[list[int], int, list[int]]]:
        return [(seq.known()[start:end], start, seq.chain.blocks) for seq, start, end in plan]

    def _prefilled(self, plan: list[tuple[Sequence, int, int]], tokens: int) -> None:
        """These chunks' keys and values are being written: their full blocks may be shared from now on (a later
        step that reads them runs after this one on the device)."""
        self.stats.prefill_tokens += tokens
        for seq, _, end in plan:
            seq.cached = end
            self.pool.commit(seq.chain, seq.known(), end)

    def _prefill_rows(self, plan: list[tuple[Sequence, int, int]]) -> None:
        width = max(end - start for _, start, end in plan)
        ids = torch.zeros((len(plan), width), dtype=torch.long)
        positions = torch.full((len(plan), width), -1, dtype=torch.long)
        for row, (seq, start, end) in enumerate(plan):  # left-padded: every row's last token is last
            ids[row, width - (end - start):] = torch.tensor(seq.known()[start:end])
            positions[row, width - (end - start):] = torch.arange(start, end)
        seqs = [seq for seq, _, _ in plan]
        logits = self._forward(ids, positions, [s.chain.blocks for s in seqs], [s.adapter for s in seqs])
        self._prefilled(plan, sum(end - start for _, start, end in plan))
        done = [row for row, (seq, _, _) in enumerate(plan) if not seq.prefilling]
        self._after_prefill([plan[r][0] for r in done], logits[done, -1] if done else None)

    def _prefill_packed(self, plan: list[tuple[Sequence, int, int]], keep: bool = False) -> tuple[list[Sequence], torch.Tensor | None]:
        """Prefill prompt chunks packed end to end: a captured graph when all are fresh and one fits, else one
        eager forward. Returns the sequences whose prompts are now complete and their next-token logits, still on
        the device, copied out of the graph's buffer when ``keep`` (another replay follows)."""
        chunks = self._chunks(plan)
        lora = self.graphs.lora if self._graphs_usable else None
        adapters = [lora.of(seq.adapter) for seq, _, _ in plan] if lora else None
        fresh = all(start == 0 for _, start, _ in chunks)
        logits = self.graphs.prefill(chunks, adapters) if self._graphs_usable and fresh else None
        if logits is None:
            dev = self.lm.device
            bs = self.cache.block_size
            ids, positions, write, cu, last = kvcache.pack_prompts(chunks, bs, self.cache.scratch)
            keys = {}
            if not fresh:  # chunks that continue cached prefixes attend to their whole sequences
                index, cu_k, max_k = kvcache.pack_keys(chunks, bs)
                keys = dict(kv_index=index.to(dev), cu_k=cu_k.to(dev, torch.int32), max_k=max_k)
            ctx = kvcache.packed_context(self.cache, write.to(dev), positions.to(dev), cu.to(dev, torch.int32),
                                         max(len(t) for t, _, _ in chunks), **keys)
            tokens = [t for t, _, _ in chunks]
            with lora.active(multilora.token_adapters(tokens, adapters, len(ids)).to(dev).view(1, -1)) if lora \
                    else contextlib.nullcontext():
                logits = self._logits(ctx, ids.view(1, -1), positions.view(1, -1), last)[0]
        self._prefilled(plan, sum(len(t) for t, _, _ in chunks))
        done = [row for row, (seq, _, _) in enumerate(plan) if not seq.prefilling]
        if not done:
            return [], None
        if len(done) == len(plan):  # (a row list indexes through a host-to-device copy: skip it when it can)
            logits = logits[:len(done)].clone() if keep else logits[:len(done)]
        else:
            logits = logits[done]
        return [plan[r][0] for r in done], logits

    def _prefill_one(self, seq: Sequence, start: int, end: int) -> None:
        ids = torch.tensor([seq.known()[start:end]])
        positions = torch.arange(start, end).unsqueeze(0)
        logits = self._forward(ids, positions, [seq.chain.blocks], [seq.adapter], all_logits=seq.want_prompt_logprobs)
        if seq.want_prompt_logprobs:
            with torch.inference_mode():
                lp = torch.log_softmax(logits[0].float(), dim=-1).cpu()
            if seq.prompt_logprobs is None:
                seq.prompt_logprobs = [None]
            nxt = seq.prompt[start + 1:end + 1]
            seq.prompt_logprobs += [float(lp[j, t]) for j, t in enumerate(nxt)]
        self._prefilled([(seq, start, end)], end - start)
        if not seq.prefilling:
            self._after_prefill([seq], logits[:, -1])

    def _after_prefill(self, seqs: list[Sequence], logits: torch.Tensor | None) -> None:
        """Prompts fully in the cache: sample their first tokens (or finish those asked for none). A sequence
        computed again after a preemption already has its next token."""
        keep = [i for i, seq in enumerate(seqs) if seq.max_new > 0 and not seq.generated]
        for seq in seqs:
            if seq.max_new == 0:
                self._finish(seq, "length")
        if keep:
            self._sample([seqs[i] for i in keep], logits if len(keep) == len(seqs) else logits[keep])

    def _decode(self) -> None:
        """One decode step for every running sequence. When all of them want the plain argmax, the step's tokens
        stay on the device (the next step reads its inputs there) and the host reads them one step later, while
        the device runs the next step: detokenization, stop checks and HTTP work overlap the forward pass. A
        sequence that stopped is then decoded one step too many, and that token is dropped."""
        batch = [s for s in self.running if not s.prefilling and not s.finished and len(s.generated) + s.inflight < s.max_new]
        if not batch or not self.overlap or not all(s.pipelined for s in batch):
            self._complete()  # the host needs every token so far
            batch = [s for s in self.running if not s.prefilling and not s.finished]
            if not batch:
                return
            logits, _ = self._decode_step(batch)
            rows = [s.slot for s in batch]
            if rows != list(range(logits.shape[0])):
                logits = logits[torch.tensor(rows, device=logits.device)]
            self._sample(batch, logits)
            return
        _, tokens = self._decode_step(batch)
        host = self._host_tokens[self._flip]
        self._flip ^= 1
        host[:tokens.shape[0]].copy_(tokens, non_blocking=True)
        event = None
        if tokens.is_cuda:
            event = torch.cuda.Event()
            event.record()
        for s in batch:
            s.inflight += 1
        self._complete()  # the previous step's tokens, read while the device runs this one
        self._inflight = ([(s, s.slot) for s in batch], host, event)

    def _complete(self) -> None:
        if self._inflight is None:
            return
        launched, host, event = self._inflight
        self._inflight = None
        if event is not None:
            event.synchronize()
        tokens = host.tolist()
        live = []
        for seq, slot in launched:
            seq.inflight -= 1
            if not seq.finished:  # a sequence that stopped a step ago: drop the extra token
                live.append((seq, tokens[slot]))
        self.stats.decode_tokens -= len(launched) - len(live)  # rows decoded past a stop are not output
        if live:
            self._emit([s for s, _ in live], [t for _, t in live], [None] * len(live))

    def _decode_step(self, batch: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Launch one decode step; (logits, argmax) by row 0..hi-1, still on the device."""
        # one batch row per block-table row 0..hi-1 (rows are handed out lowest first): attention reads each row's
        # blocks through the table; rows of free or still-prefilling sequences write to scratch and are dropped
        self.cache.sync()
        hi = max(s.slot for s in batch) + 1
        ids, positions, take, adapters = [0] * hi, [-1] * hi, [0] * hi, [None] * hi
        write, tables = [self.cache.scratch] * hi, [[] for _ in range(hi)]
        bs = self.cache.block_size
        for s in batch:
            p = positions[s.slot] = len(s.prompt) + len(s.generated) + s.inflight - 1
            write[s.slot] = kvcache.cache_row(s.chain.blocks, p, bs)
            tables[s.slot] = s.chain.blocks
            if s.inflight:
                take[s.slot] = 1
            else:
                ids[s.slot] = s.generated[-1]
            adapters[s.slot] = s.adapter
        out = None
        if self._graphs_usable:
            lora = self.graphs.lora
            with torch.inference_mode():  # the fast path: one captured graph replay per step
                out = self.graphs.run(ids, positions, take, write, [lora.of(a) for a in adapters] if lora else None)
        if out is None:
            dev = self.lm.device
            with torch.inference_mode():
                inputs = torch.where(torch.tensor(take, dtype=torch.bool).to(dev), self.last_tokens[:hi],
                                     torch.tensor(ids).to(dev))
                logits = self._forward(inputs.unsqueeze(1), torch.tensor(positions).unsqueeze(1), tables, adapters)[:, -1]
                argmax = logits.argmax(dim=-1)
                self.last_tokens[:hi] = argmax
            out = (logits, argmax)
        self.stats.steps += 1
        self.stats.decode_tokens += len(batch)
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        self.stats.batch_sizes[len(batch)] += 1
        return out

    def _sample(self, batch: list[Sequence], logits: torch.Tensor) -> None:
        with torch.inference_mode():
            tokens, infos = sample(logits, [s.params for s in batch], [s.generated for s in batch], [s.generator for s in batch])
        for row, seq in enumerate(batch):
            if seq.json is not None:
                tokens[row] = self._json_token(seq, tokens[row], logits[row])
                if infos[row] is not None and infos[row].token_id != tokens[row]:
                    lp = torch.log_softmax(logits[row].float(), dim=-1)
                    infos[row] = TokenLogprob(tokens[row], float(lp[tokens[row]]), infos[row].top)
        self._emit(batch, tokens, infos)

    def _emit(self, batch: list[Sequence], tokens: list[int], infos: list[TokenLogprob | None]) -> None:
        """Append each sequence's new token and tell its sink: text, stop strings, finish reasons."""
        pieces = self._detokenize(batch, tokens)
        bs = self.cache.block_size
        for seq, token, info, piece in zip(batch, tokens, infos, pieces):
            seq.generated.append(token)
            written = len(seq.prompt) + len(seq.generated) - 1  # the newest token's keys come with the next step
            if seq.chain is not None and (seq.chain.keyed + 1) * bs <= written:  # a generated block filled: shareable
                self.pool.commit(seq.chain, seq.known(), written)
            out = Output(index=seq.index, prompt_tokens=len(seq.prompt), completion_tokens=len(seq.generated),
                         cached_tokens=seq.hit)
            if seq.prompt_logprobs is not None and len(seq.generated) == 1:
                out.prompt_logprobs = seq.prompt_logprobs
            if token in seq.stop_ids:
                out.finish_reason = "stop"
                out.text = seq.stops.feed(seq.detok.flush()) + ("" if seq.stops.stopped else seq.stops.flush())
                self._finish(seq, "stop", out)
                continue
            out.text = seq.stops.feed(piece)
            out.token_ids = [token]
            if info is not None:
                out.logprobs = [info]
            if seq.stops.stopped or (seq.json is not None and seq.json.done):
                out.text += seq.stops.feed(seq.detok.flush())
                if not seq.stops.stopped:
                    out.text += seq.stops.flush()
                self._finish(seq, "stop", out)
            elif len(seq.generated) >= seq.max_new:
                out.text += seq.stops.feed(seq.detok.flush())
                if not seq.stops.stopped:
                    out.text += seq.stops.flush()
                self._finish(seq, "stop" if seq.stops.stopped else "length", out)
            else:
                seq.sink(out)

    def _detokenize(self, batch: list[Sequence], tokens: list[int]) -> list[str]:
        """Each sequence's new text, from one batched decode per tokenizer instead of two calls per sequence."""
        pieces: list[str] = [""] * len(batch)
        groups: dict[int, list[int]] = {}
        windows: dict[int, tuple[list[int], list[int]]] = {}
        for row, (seq, token) in enumerate(zip(batch, tokens)):
            if token in seq.stop_ids:
                continue
            windows[row] = seq.detok.windows(token)
            groups.setdefault(id(seq.detok.tokenizer), []).append(row)
        for rows in groups.values():
            tok = batch[rows[0]].detok.tokenizer
            flat = [w for row in rows for w in windows[row]]
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is not None:  # a fast tokenizer: its Rust batch decode, without transformers' per-item Python
                texts = backend.decode_batch(flat, skip_special_tokens=True)  # (3x less host time at 256 rows)
            else:
                texts = tok.batch_decode(flat, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            for i, row in enumerate(rows):
                pieces[row] = batch[row].detok.commit(texts[2 * i], texts[2 * i + 1])
        return pieces

    def _json_token(self, seq: Sequence, token: int, logits: torch.Tensor) -> int:
        """The sampled token if it keeps the output a JSON object prefix, else the likeliest token that does."""
        tok = self.lm.tokenizer

        def fits(tid: int) -> bool:
            if tid in seq.stop_ids:
                return False
            text = tok.decode([tid], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            return bool(text) and seq.json.clone().feed(text)

        chosen = token if fits(token) else None
        if chosen is None:
            order = torch.topk(logits, min(64, logits.shape[-1])).indices.tolist()
            chosen = next((t for t in order if fits(t)), None)
        if chosen is None:
            chosen = next((t for t in torch.argsort(logits, descending=True).tolist() if fits(t)), token)
        seq.json.feed(tok.decode([chosen], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        return chosen

    def _finish(self, seq: Sequence, reason: str, out: Output | None = None, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
        self._give_back(seq)
        self._released()
        if reason == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1
        out = out or Output(index=seq.index, prompt_tokens=len(seq.prompt), completion_tokens=len(seq.generated),
                            cached_tokens=seq.hit)
        out.finish_reason = reason
        out.error = error
        out.stop = seq.stops.matched
        try:
            seq.sink(out)
        except Exception:  # a sink must never break the loop
            log.exception("sink failed")
