"""The paged KV cache and prefix caching on a real tiny model: the same tokens with the cache on or off,
eviction, preemption and recompute, and every block back in the pool after a storm of cancelled streams."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from codellm.engine.blocks import BlockPool
from codellm.engine.sampling import SamplingParams


class Sink:
    def __init__(self):
        self.tokens: dict[int, list[int]] = {}
        self.cached = 0
        self.reasons: dict[int, str] = {}
        self.done = threading.Event()
        self.first = threading.Event()  # a token came
        self.n = 1

    def __call__(self, out) -> None:
        self.tokens.setdefault(out.index, []).extend(out.token_ids)
        if out.token_ids:
            self.first.set()
        self.cached = out.cached_tokens
        if out.finish_reason:
            self.reasons[out.index] = out.finish_reason
            if len(self.reasons) == self.n:
                self.done.set()


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def lm(served_home):
    from codellm.engine.loader import load
    from codellm.registry import Registry

    return load(Registry(served_home), "tiny-coder", dtype="fp32")


def run(engine, requests, *, timeout=120, wait=True):
    """Submit (prompt, params, n, lm) requests together; their sinks once all have finished (``wait``), or at once."""
    sinks = []
    for prompt, params, n, view in requests:
        sink = Sink()
        sink.n = n
        engine.submit(prompt, params, sink, n=n, lm=view)
        sinks.append(sink)
    assert not wait or all(s.done.wait(timeout) for s in sinks)
    return sinks


def test_block_pool_shares_evicts_and_counts_references():
    pool = BlockPool(6, 4)
    first = list(range(10))  # two full blocks and two tokens
    chain, cached = pool.acquire(first, None)
    assert cached == 0 and len(chain.blocks) == 3 and pool.used == 3
    pool.commit(chain, first, 10)
    assert chain.keyed == 2  # the partial third block is not shared
    other, cached = pool.acquire(first[:8] + [99, 98, 97], None)
    assert cached == 8 and other.blocks[:2] == chain.blocks[:2] and pool.refs[chain.blocks[0]] == 2
    assert pool.match(first[:8], None) == chain.blocks[:1]  # the last token is always computed
    assert pool.match(first, "an-adapter") == []  # another adapter's keys and values differ
    assert pool.acquire(list(range(100, 124)), None) is None and pool.used == 4  # too big now: nothing taken
    pool.release(other)
    pool.release(chain)
    assert pool.used == 0 and not any(pool.refs)
    again, cached = pool.acquire(first, None)  # still cached after release
    assert cached == 8
    pool.release(again)
    fresh, cached = pool.acquire(list(range(200, 224)), None)  # six blocks: every cached block evicted
    assert cached == 0 and pool.by_key == {}
    pool.release(fresh)
    assert pool.acquire(first, None)[1] == 0


def test_prefix_cache_on_and_off_give_the_same_tokens(served_home, lm):
    """Greedy decoding with prefix caching equals decoding without it, token for token: prompts that share
    whole and partial blocks, a prompt seen before, n>1, an adapter (its blocks keyed apart), and a next turn
    that re-sends an earlier answer, which is reused too."""
    from codellm.engine.manager import LoadOptions, ModelManager
    from codellm.registry import Registry

    tok = lm.tokenizer
    shared = tok("import csv\nimport json\n\ndef read_rows(path):\n    \"\"\"Read a CSV file.\"\"\"\n",
                 add_special_tokens=False)["input_ids"]
    tails = [tok(t, add_special_tokens=False)["input_ids"] for t in ("    with open(path)", "    rows = []", "    return")]
    results = {}
    for caching in (True, False):
        manager = ModelManager(Registry(served_home), LoadOptions(dtype="fp32", keep_alive=None, engine_process=False,
                                                                   prefix_caching=caching))
        try:
            base, lora = manager.get("tiny-coder"), manager.get("tiny-lora")
            engine = base.engine
            first = run(engine, [(shared + tails[0], GREEDY, 1, base.lm), (shared + tails[0], GREEDY, 1, lora.lm)])
            answer = first[0].tokens[0]
            second = run(engine, [
                (shared + tails[1], GREEDY, 2, base.lm),  # shares the prefix's full blocks, not its partial one
                (shared + tails[0], GREEDY, 1, base.lm),  # seen before: all but its last block
                (shared + tails[2], GREEDY, 1, lora.lm),  # shares only the adapter's own blocks
                (shared + tails[0] + answer + tails[2], GREEDY, 1, base.lm),  # the next turn: the answer is cached too
            ])
            results[caching] = ([s.tokens for s in first + second], [s.cached for s in second])
            assert not any(engine.pool.refs) and engine.active() == 0
            graphs = engine.runner.graphs
            if graphs is not None and caching:  # on a GPU, prompts continuing a cached prefix ran in captured graphs
                assert graphs.prefill_replays["cached"] > 0
        finally:
            manager.close()
    on, off = results[True], results[False]
    assert on[0] == off[0]
    assert off[1] == [0, 0, 0, 0]
    bs = 16
    hits = on[1]
    assert hits[0] == len(shared) // bs * bs and hits[1] == (len(shared + tails[0]) - 1) // bs * bs
    assert hits[2] == len(shared) // bs * bs  # the adapter's own first turn
    assert hits[3] >= (len(shared + tails[0]) + len(on[0][0][0])) // bs * bs - bs  # the prompt and most of the answer


@pytest.fixture()
def small(lm):
    """The tiny model with a 64-token context, so that the smallest KV pool (one context and a block) is tiny."""
    return dataclasses.replace(lm, max_len=64)


@pytest.mark.parametrize("mixed", [False, True], ids=["apart", "riding"])
def test_preemption_recomputes_and_gives_the_same_tokens(small, mixed):
    """Four sequences that together need three times the pool: the newest are preempted and computed again
    later (partly from what is still cached), and every token is what a pool big enough gives. Riding: the last
    two arrive while the first two decode, so decoding rows ride in their prefills and take blocks first (a
    sequence preempted for them drops its chunk)."""
    from codellm.engine.core import Engine

    tok = small.tokenizer
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in
               ("def fibonacci(n):\n", "class Stack:\n    def", "for i in range(10):", "import os\nimport sys\n")]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outputs = {}
    for memory in (None, 1):
        # 1 byte: the least pool there is; prompts prefilled 4 tokens a step, so that many steps carry riders
        engine = Engine(small, slots=4, block_size=4, kv_cache_memory=memory, mixed=mixed, prefill_chunk=4)
        try:
            assert engine.pool.num_blocks == (18 if memory else 4 * 65 // 4)
            if mixed:
                sinks = run(engine, [(p, params, 1, None) for p in prompts[:2]], wait=False)
                assert all(s.first.wait(60) for s in sinks)
                sinks += run(engine, [(p, params, 1, None) for p in prompts[2:]])
                assert all(s.done.wait(60) for s in sinks)
            else:
                sinks = run(engine, [(p, params, 1, None) for p in prompts])
            outputs[memory] = [s.tokens[0] for s in sinks]
            if memory:
                assert engine.stats.preempted > 0
                assert (engine.stats.rides > 0) == mixed
            assert not any(engine.pool.refs) and engine.pool.used == 0 and engine.active() == 0
        finally:
            engine.shutdown()
    assert outputs[1] == outputs[None]
    assert all(len(t) == 40 for t in outputs[1])


def test_mixed_steps_from_the_load_options(served_home, lm):
    """``--mixed-steps`` reaches the engine through the model manager, and its streams give the tokens of one
    without: a second prompt arriving while the first decodes, its prefill carrying the first."""
    from codellm.engine.manager import LoadOptions, ModelManager
    from codellm.registry import Registry

    tok = lm.tokenizer
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("def fibonacci(n):\n", "class Stack:\n    def")]
    tokens = {}
    for mixed in (False, True):
        manager = ModelManager(Registry(served_home), LoadOptions(mixed_steps=mixed))
        try:
            engine = manager.get("tiny-coder").engine
            assert engine.mixed == mixed
            sinks = run(engine, [(prompts[0], GREEDY, 1, None)], wait=False)
            assert sinks[0].first.wait(60)
            sinks += run(engine, [(prompts[1], GREEDY, 1, None)])
            assert sinks[0].done.wait(60)
            tokens[mixed] = [s.tokens[0] for s in sinks]
            assert (engine.stats.rides > 0) == mixed
        finally:
            manager.close()
    assert tokens[True] == tokens[False]


def test_a_prompt_preempted_for_its_riders_blocks_waits_and_gives_the_same_tokens(small):
    """A prompt admitted into the last free blocks, in the step where the sequence riding in its prefill needs a
    new block: the prompt is preempted before it runs (its chunk dropped), waits for the rider to finish, and both
    give what a pool big enough gives."""
    from codellm.engine.core import Engine

    tok = small.tokenizer
    first = tok("def fibonacci(n):\n", add_special_tokens=False)["input_ids"]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs, second = {}, None
    for memory in (1, None):  # the least pool there is, then one big enough
        engine = Engine(small, slots=2, block_size=4, kv_cache_memory=memory, mixed=True)
        b = Sink()

        class Trigger(Sink):
            """On the engine thread, between steps: once the next step's token starts a block of its own (and
            four blocks are taken), a prompt of every block left arrives, to be admitted in that step."""

            def __call__(self, out) -> None:
                nonlocal second
                super().__call__(out)
                length = len(first) + len(self.tokens[0])
                if not b.submitted and length >= 20 and length % 4 == 1 and not out.finish_reason:
                    if second is None:
                        second = [(7 + i) % 50 + 3 for i in range(4 * (engine.pool.num_blocks - engine.pool.used))]
                    b.submitted = True
                    engine.submit(second, short, b)

        b.submitted = False
        a = Trigger()
        try:
            engine.submit(first, params, a)
            assert a.done.wait(60) and b.done.wait(60)
            if memory:  # (preempted in the step it was admitted: no forward carried the rider with its chunk)
                assert engine.stats.preempted == 1 and engine.stats.rides == 0
            outputs[memory] = (a.tokens[0], b.tokens[0])
            assert not any(engine.pool.refs) and engine.active() == 0
        finally:
            engine.shutdown()
    assert outputs[1] == outputs[None] and len(outputs[1][0]) == 40 and len(outputs[1][1]) == 6


@pytest.mark.parametrize("mixed", [False, True], ids=["apart", "riding"])
def test_cancelled_streams_give_every_block_back(small, mixed):
    """A storm of streams, cancelled at all stages (queued, prefilling, decoding, preempted), on a pool too
    small for all of them: afterwards no block is held and the engine still answers."""
    from codellm.engine.core import Engine

    tok = small.tokenizer
    prompt = tok("def quicksort(items):\n    if len(items) <= 1:\n", add_special_tokens=False)["input_ids"]
    engine = Engine(small, slots=4, block_size=4, kv_cache_memory=1, max_queue=64, mixed=mixed)
    try:
        handles, sinks = [], []
        for i in range(40):
            sink = Sink()
            params = SamplingParams(temperature=0 if mixed else 0.8, seed=i, max_tokens=30, ignore_eos=True)
            handles.append(engine.submit(prompt[: 5 + i % 10], params, sink))
            sinks.append(sink)
            if i % 3 == 0:
                time.sleep(0.01)
            if i % 2:
                handles[i // 2].cancel()
        for h in handles[20:]:
            h.cancel()
        assert all(s.done.wait(120) for s in sinks)
        deadline = time.monotonic() + 60
        while (engine.pending() or engine.active()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.pending() == 0 and engine.active() == 0
        assert not any(engine.pool.refs) and engine.pool.used == 0
        assert engine.stats.cancelled > 0
        (after,) = run(engine, [(prompt, GREEDY, 1, None)])
        assert len(after.tokens[0]) == GREEDY.max_tokens
    finally:
        engine.shutdown()


def test_a_long_stream_and_many_short_ones_share_the_pool(small):
    """Memory follows real lengths: in the KV memory of about one whole context (where a slot cache holds one
    sequence), eight short streams run at once."""
    from codellm.engine.core import Engine

    tok = small.tokenizer
    prompt = tok("x = 1\n", add_special_tokens=False)["input_ids"]
    engine = Engine(small, slots=8, block_size=4, kv_cache_memory=1)
    try:
        with engine.step_lock:  # all of them admitted in one step
            sinks = [Sink() for _ in range(8)]
            for sink in sinks:
                engine.submit(prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), sink)
        assert all(s.done.wait(60) for s in sinks)
        assert engine.stats.max_batch == 8 and engine.stats.preempted == 0
        assert len(prompt) + 3 <= 8 and engine.pool.num_blocks * 4 < 2 * (small.max_len + 1)
    finally:
        engine.shutdown()
