"""One engine client interface, two engines: the in-thread engine and the child-process engine answer the same
calls the same way (tokens, cached counts, refusals, cancellation, embeddings), and what crosses the pipe is
typed messages."""

from __future__ import annotations

import threading

import msgspec
import pytest

from codellm.engine.sampling import SamplingParams
from codellm.errors import ContextLengthExceeded, InvalidRequest


class Collect:
    def __init__(self, n: int = 1):
        self.n, self.tokens, self.outs, self.done = n, {}, [], threading.Event()

    def __call__(self, out) -> None:
        self.outs.append(out)
        self.tokens.setdefault(out.index, []).extend(out.token_ids)
        if sum(o.finish_reason is not None for o in self.outs) == self.n:
            self.done.set()


def drive(served) -> dict:
    """What a client of either engine sees for the same calls."""
    from codellm.engine.client import EngineClient

    engine = served.engine
    assert isinstance(engine, EngineClient)
    tok = served.lm.tokenizer
    prompt = tok("def fibonacci(n):\n    " * 6, add_special_tokens=False)["input_ids"]
    seen = {}
    runs = []
    for params, n in [(SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), 2),
                      (SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), 1),
                      (SamplingParams(temperature=0.8, seed=7, max_tokens=8, ignore_eos=True, logprobs=2), 1)]:
        sink = Collect(n)
        engine.submit(prompt, params, sink, n=n)
        assert sink.done.wait(120)
        last = [o for o in sink.outs if o.finish_reason][-1]
        runs.append((sink.tokens, last.finish_reason, last.prompt_tokens, last.completion_tokens))
        seen.setdefault("cached", []).append(last.cached_tokens)
        seen.setdefault("logprobs", []).append([(lp.token_id, round(lp.logprob, 4)) for o in sink.outs for lp in o.logprobs])
    seen["runs"] = runs
    with pytest.raises(InvalidRequest):
        engine.submit([len(tok) + 5], SamplingParams(), Collect())
    with pytest.raises(ContextLengthExceeded):
        engine.submit([1] * (served.lm.max_len + 1), SamplingParams(), Collect())
    sink = Collect()
    handle = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True), sink)
    handle.cancel()
    assert sink.done.wait(60)
    seen["cancelled"] = sink.outs[-1].finish_reason
    vectors, count = engine.embed(served.lm, ["def f(): pass"])
    seen["embed"] = (len(vectors), len(vectors[0]), count, round(vectors[0][0], 4))
    assert engine.pending() == 0
    return seen


def test_both_engines_answer_the_same(served_home):
    from codellm.engine.manager import LoadOptions, ModelManager
    from codellm.registry import Registry

    results = {}
    for in_process in (True, False):
        manager = ModelManager(Registry(served_home), LoadOptions(dtype="fp32", keep_alive=None, engine_process=not in_process,
                                                                  slots=4))
        try:
            results[in_process] = drive(manager.get("tiny-coder"))
        finally:
            manager.close()
    thread, process = results[True], results[False]
    assert thread == process
    assert thread["cancelled"] == "cancelled"
    assert thread["cached"][1] > 0  # the repeated prompt came from the prefix cache, on both
    tokens, reason, n_prompt, n_done = thread["runs"][0]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 12 and reason == "length" and n_done == 12


def test_messages_are_typed_and_errors_keep_their_class():
    from codellm.engine import remote
    from codellm.engine.outputs import Output, Stats
    from codellm.engine.sampling import TokenLogprob

    params = SamplingParams(temperature=0.5, stop=["\n\n"], max_tokens=3)
    add = remote.Add(1, [5, 6], params, 2, False, "tiny:latest")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(add), type=remote.ToChild) == add
    out = Output(index=1, text="x", token_ids=[3], logprobs=[TokenLogprob(3, -0.5, [(3, -0.5), (4, -1.0)])],
                 finish_reason="stop", cached_tokens=16)
    message = remote.Outputs([remote.Delivery(7, out)], Stats(steps=3), 1)
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(message), type=remote.ToParent)
    assert back == message and back.items[0].out.logprobs[0].top[1] == (4, -1.0)
    error = remote.Failure.of(ContextLengthExceeded("too long", param="messages")).error()
    assert type(error) is ContextLengthExceeded and error.param == "messages" and error.code == "context_length_exceeded"
    assert type(remote.Failure("os.system", "no").error()).__name__ == "CodellmError"  # only our error classes
    with pytest.raises(msgspec.ValidationError):  # a malformed message is refused, not half-read
        msgspec.msgpack.decode(msgspec.msgpack.encode(["add", "not an id"]), type=remote.ToChild)
