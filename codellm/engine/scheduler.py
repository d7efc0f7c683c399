"""Who runs each step, and what each computes: queues, batch rows, KV blocks, the prefill budget, preemption.

No tensors here: the scheduler decides on token ids and block numbers, and hands the engine a plain plan
per phase of a step.

- ``schedule_prefill`` admits waiting sequences, oldest first, while a row and the blocks for their tokens
  are free (a prompt that starts like an earlier one shares that one's cached blocks and prefills only the
  rest), then spends up to ``prefill_chunk`` tokens on prompts: long ones are chunked across steps, so
  running streams keep decoding.
- ``schedule_decode`` gives every decoding sequence whose next token starts a block that block. When the
  pool has none left, the newest sequences are preempted: their blocks go back, and they wait first in
  line to be computed again, mostly from what is still cached.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from codellm.engine.blocks import BlockPool
from codellm.engine.sequence import Chunk, Sequence

log = logging.getLogger("codellm.engine")

@dataclass
class PrefillPlan:
    rows: list[Sequence] = field(default_factory=list)  # admitted this step: their block-table rows to write
    chunks: list[Chunk] = field(default_factory=list)  # packed into one forward
    alone: list[Chunk] = field(default_factory=list)  # want every position's logits: a forward each


@dataclass
class DecodePlan:
    batch: list[Sequence] = field(default_factory=list)  # one token each
    rows: list[Sequence] = field(default_factory=list)  # whose block lists grew: their rows to write again
    preempted: list[Sequence] = field(default_factory=list)  # sent back to wait (their tokens in flight still count)


class Scheduler:
    def __init__(self, pool: BlockPool, slots: int, prefill_chunk: int):
        self.pool = pool
        self.prefill_chunk = prefill_chunk
        self.free_slots = list(range(slots))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preempted = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, found

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seqs: list[Sequence]) -> None:
        self.waiting.extend(seqs)

    def uses(self, adapter: str) -> bool:
        return any(s.adapter == adapter for s in list(self.waiting) + self.running)

    def cancelled(self) -> list[Sequence]:
        """The sequences marked cancelled, waiting or running: the engine finishes them."""
        return [s for s in list(self.waiting) + self.running if s.cancelled]

    # -- prefill ---------------------------------------------------------------------------
    def schedule_prefill(self, admit: bool = True) -> PrefillPlan:
        plan = PrefillPlan(rows=self._admit() if admit else [])
        budget = self.prefill_chunk
        for seq in self.running:
            if budget <= 0:
                break
            if not seq.prefilling:
                continue
            end = min(seq.target, seq.cached + budget)
            (plan.alone if seq.want_prompt_logprobs else plan.chunks).append((seq, seq.cached, end))
            budget -= end - seq.cached
        return plan

    def _admit(self) -> list[Sequence]:
        """A sequence back from a preemption has its generated tokens computed again too (from the cache, where
        they still are), all but the last: that one is its next decode step's input."""
        admitted = []
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
                if seq.queue_time is None:
                    seq.queue_time = time.perf_counter() - seq.arrived
                seq.hit = seq.cached
                self.prefix_queries += len(known)
                self.prefix_hits += seq.cached
            seq.slot = self.free_slots.pop(0)
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def prefilled(self, chunks: list[Chunk]) -> None:
        """These chunks' keys and values are being written: their full blocks may be shared from now on (a later
        step that reads them runs after this one on the device)."""
        for seq, _, end in chunks:
            seq.cached = end
            self.pool.commit(seq.chain, seq.known(), end)

    # -- decode ----------------------------------------------------------------------------
    def schedule_decode(self) -> DecodePlan:
        plan = DecodePlan()
        size = self.pool.size
        for seq in list(self.running):
            if not seq.decodable or seq.chain is None or seq in plan.preempted:
                continue
            if len(seq.prompt) + len(seq.generated) + seq.inflight <= len(seq.chain.blocks) * size:
                continue  # its last block has room for the next token (most steps)
            while True:
                need = len(seq.prompt) + len(seq.generated) + seq.inflight
                had = len(seq.chain.blocks)
                if self.pool.extend(seq.chain, need):
                    if len(seq.chain.blocks) != had:
                        plan.rows.append(seq)
                    break
                victim = next(s for s in reversed(self.running) if not s.finished)  # the newest: ``seq`` at worst
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    break
        plan.batch = [s for s in self.running if s.decodable]
        plan.rows = [s for s in plan.rows if s.chain is not None]
        return plan

    def _preempt(self, seq: Sequence) -> None:
        log.info("preempting sequence %d (%d tokens): the KV cache is full", seq.id, len(seq.prompt) + len(seq.generated))
        self.running.remove(seq)
        self._give_back(seq)
        seq.cached = seq.draft_cached = 0  # (what is still cached of it is found again, by the draft too)
        self.waiting.appendleft(seq)
        self.preempted += 1

    def appended(self, seq: Sequence) -> None:
        """``seq`` has a new token: once a generated block is full, it may be shared too."""
        written = len(seq.prompt) + len(seq.generated) - 1  # the newest token's keys come with the next step
        if seq.chain is not None and (seq.chain.keyed + 1) * self.pool.size <= written:
            self.pool.commit(seq.chain, seq.known(), written)

    # -- the end ---------------------------------------------------------------------------
    def finish(self, seq: Sequence) -> None:
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._give_back(seq)

    def _give_back(self, seq: Sequence) -> None:
        if seq.chain is not None:
            self.pool.release(seq.chain)
            seq.chain = None
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            self.free_slots.sort()
            seq.slot = None
