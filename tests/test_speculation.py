"""Speculative decoding, by prompt lookup and by a draft model: greedy output token for token the same with it and
without, sampled output distributed the same, on a tiny model taught to copy its prompt (so that drafts are mostly
kept) and on the plain tiny model (so that they are mostly not)."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from conftest import Server, teach_tiny

SNIPPET = '''def read_csv(path):
    import csv
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


class Stack:
    def __init__(self):
        self.items = []
'''


@pytest.fixture(scope="module")
def copy_home(tmp_path_factory, tiny_dir):
    """A registry with `copier`: the tiny model taught to answer SNIPPET with SNIPPET again (an edit that re-emits
    its file), `tiny-coder` (the plain tiny model) and `copier-lora` (the copier under a random LoRA adapter)."""
    from conftest import make_adapter
    from transformers import AutoTokenizer

    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    tok = AutoTokenizer.from_pretrained(tiny_dir)  # as the server encodes
    ids = _ids(tok)
    out = teach_tiny(tiny_dir, ids, ids + [tok.convert_tokens_to_ids("<|im_end|>")],
                     tmp_path_factory.mktemp("copier") / "model", steps=300, loss_below=0.005)
    home = tmp_path_factory.mktemp("spec-home")
    reg = Registry(home)
    create(reg, "copier", Modelfile(from_=str(out)))
    create(reg, "tiny-coder", Modelfile(from_=str(tiny_dir)))
    adapter = make_adapter(tmp_path_factory.mktemp("copier-adapter") / "adapter", out, seed=3)
    create(reg, "copier-lora", Modelfile(from_="copier", adapters=[str(adapter)]))
    return home


def _ids(tok) -> list[int]:
    return tok(SNIPPET, add_special_tokens=False)["input_ids"]


def _engine(home, name: str, spec: bool | str, draft: str | None = None, config: dict | None = None, **kw):
    """An engine for ``name``: speculating by prompt lookup (``spec`` True or "ngram"), with the ``draft`` model
    ("draft"), or not at all (False)."""
    from codellm.engine.core import Engine
    from codellm.engine.loader import load, load_draft
    from codellm.engine.speculation import SpeculativeConfig
    from codellm.registry import Registry

    reg = Registry(home)
    lm = load(reg, name)
    method = "ngram" if spec is True else spec
    cfg = SpeculativeConfig(method=method, num_tokens=4, draft=draft, **(config or {})) if spec else None
    kw.setdefault("overlap", True)  # plain steps read their tokens a step late, as on a GPU
    return lm, Engine(lm, slots=4, speculative=cfg, draft=load_draft(reg, cfg, lm), **kw)


def _run(engine, prompt: list[int], params, n: int = 1, lm=None):
    """Every choice's (token ids, text, last output)."""
    done, outs = threading.Event(), {i: [] for i in range(n)}

    def sink(o):
        outs[o.index].append(o)
        if all(v and v[-1].finish_reason for v in outs.values()):
            done.set()
    engine.submit(prompt, params, sink, n=n, lm=lm)
    assert done.wait(120)
    return [([t for o in outs[i] for t in o.token_ids], "".join(o.text for o in outs[i]), outs[i][-1])
            for i in range(n)]


def test_prompt_lookup_proposes_what_followed_last_time():
    from codellm.engine.speculation import propose

    assert propose([1, 2, 3, 9, 9, 1, 2, 3], k=3) == [9, 9, 1]  # after the latest earlier [1, 2, 3]
    assert propose([5, 1, 2, 7, 1, 2, 8, 3, 1, 2], k=2) == [8, 3]  # the latest occurrence wins
    assert propose([1, 2, 3, 4, 2, 3], k=4, n_max=3) == [4, 2, 3]  # shorter suffixes where the longest is new
    assert propose([1, 2, 3, 4], k=4) == [] and propose([7, 7], k=2) == []
    assert propose([1, 2, 1, 2], k=0) == []
    # 4-byte tokens: a match across token boundaries is not one
    assert propose([0x01000000, 0x02000000, 0, 99, 1, 2], k=2, n_max=2, n_min=1) == []  # (bytes 01 00 00 00 02 ...
    assert propose([0x01000000, 0x02000000, 0, 1, 2, 77, 1, 2], k=1, n_max=2) == [77]  # ... sit across 3 tokens)


def test_a_sequences_packed_tokens_follow_what_it_generates():
    """The 4-byte copy the n-gram lookup searches is built once and then appended to: it stays ``known()``."""
    from codellm.engine.detok import StopMatcher
    from codellm.engine.sampling import SamplingParams
    from codellm.engine.sequence import Sequence
    from codellm.engine.speculation import propose

    seq = Sequence(0, [5, 1, 2, 7], SamplingParams(), lambda out: None, 16, set(), None, StopMatcher([]))
    assert list(seq.packed()) == [5, 1, 2, 7]
    for token in (1, 2, 8, 3, 1, 2):
        seq.generated.append(token)
        assert list(seq.packed()) == seq.known() and propose(seq.packed(), 2) == propose(seq.known(), 2)
    assert propose(seq.packed(), 2) == [8, 3] and seq.packed() is seq.packed()


def test_pace_takes_the_faster_way_per_batch_size_and_keeps_checking():
    """Windows of steps timed whole: at 4 sequences speculating yields twice the tokens a second, at 32 half. The
    32-sequence bucket is first seen after the 16 one lost, so it starts without speculating."""
    from codellm.engine.speculation import Pace

    pace = Pace(window=4, explore=4)

    def run(n: int, windows: int, spec_rate: float, plain_rate: float) -> Counter:
        ways = Counter()
        for _ in range(windows * (pace.window + 1)):
            way = pace.choose(n)
            ways[way] += 1
            pace.record(way, n, int(1000 * (spec_rate if way else plain_rate)), 1.0)
        return ways

    small = run(4, 40, spec_rate=2.0, plain_rate=1.0)
    assert small[True] > 0.8 * sum(small.values()) and small[False] > 0  # the faster way, the other still tried
    mid = run(16, 40, spec_rate=0.5, plain_rate=1.0)
    assert mid[False] > 0.9 * sum(mid.values())  # more than 25% behind: tried four times as rarely
    big = run(32, 8, spec_rate=0.5, plain_rate=1.0)
    assert big[True] <= pace.window + 1  # one window of exploring at most, not one of learning first
    flip = run(32, 80, spec_rate=3.0, plain_rate=1.0)  # the traffic changed: speculating pays now
    assert flip[True] > flip[False]

    # steps that are not timed (after idling) count all the same: a window of them ends, and the next tries the
    # other way; nothing is learnt from it
    busy = Pace(window=4, explore=4)
    first = busy.choose(8)
    for _ in range(busy.window + 1):
        assert busy.choose(8) is first
        busy.record(first, 8, 100, None)
    assert busy.choose(8) is (not first) and not busy.rate


def test_rejection_sampling_keeps_the_models_distribution():
    """Whatever the draft, the first token emitted is distributed as the model's p, and the second (after a kept
    draft) as its next distribution: 40,000 seeded trials against the exact probabilities."""
    from codellm.engine.speculation import accept

    p0 = torch.tensor([0.05, 0.45, 0.2, 0.2, 0.1, 0.0])
    p1 = torch.tensor([0.3, 0.0, 0.3, 0.1, 0.2, 0.1])
    g = torch.Generator().manual_seed(0)
    trials = 40_000
    for drafts in ([1, 2], [5, 0], [3, 3]):
        first, second, kept = Counter(), Counter(), 0
        for _ in range(trials):
            v = accept(drafts, False, torch.stack([p0, p1, p1]), g)
            first[v.tokens[0]] += 1
            if v.tokens[0] == drafts[0] and len(v.tokens) > 1:
                second[v.tokens[1]] += 1
                kept += 1
        for t in range(6):
            assert abs(first[t] / trials - float(p0[t])) < 0.012, (drafts, t, first)
        if kept > 2000:
            for t in range(6):
                assert abs(second[t] / kept - float(p1[t])) < 0.03, (drafts, t, second)
    greedy = accept([4, 2], True, torch.tensor([[0.0, 1, 0, 0, 9], [0, 0, 3, 0, 1], [7, 0, 0, 0, 0]]))
    assert greedy.tokens == [4, 2, 0] and greedy.accepted == 2
    assert accept([4, 1], True, torch.tensor([[0.0, 0, 0, 0, 9], [0, 0, 3, 0, 1], [7, 0, 0, 0, 0]])).tokens == [4, 2]


@pytest.mark.parametrize("name,method,draft", [("copier", "ngram", None), ("tiny-coder", "ngram", None),
                                               ("copier", "draft", "copier"), ("copier", "draft", "tiny-coder")])
def test_greedy_output_is_the_same_token_for_token(copy_home, name, method, draft):
    """Drafts mostly kept (copier by prompt lookup, or drafting for itself) or mostly not (tiny-coder, or drafting for
    the copier): the same tokens and text as without speculation, for a token limit that falls inside an accepted
    run, a stop string inside one, and two choices at once."""
    from codellm.engine.sampling import SamplingParams

    prompt = _ids(_engine_tokenizer(copy_home))
    lm, plain = _engine(copy_home, name, spec=False)
    try:
        text = _run(plain, prompt, SamplingParams(temperature=0, max_tokens=41, ignore_eos=True))[0][1]
        stop = text[20:24]  # a stop string that the answer reaches after a few steps
        cases = [(SamplingParams(temperature=0, max_tokens=41, ignore_eos=True), 1),
                 (SamplingParams(temperature=0, max_tokens=80, stop=[stop]), 1),
                 (SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3), 2)]
        want = [_run(plain, prompt, params, n) for params, n in cases]
    finally:
        plain.shutdown()
    lm, spec = _engine(copy_home, name, spec=method, draft=draft)
    try:
        got = [_run(spec, prompt, params, n) for params, n in cases]
        with ThreadPoolExecutor(len(cases)) as pool:  # and all at once: one ending inside a run leaves the others be
            together = list(pool.map(lambda case: _run(spec, prompt, *case), cases))

        def seen(results):
            return [(ids, text, o.finish_reason, o.completion_tokens) for ids, text, o in results]

        for w, g, t in zip(want, got, together):
            assert seen(w) == seen(g) == seen(t)
        assert len(got[0][0][0]) == 41 and got[1][0][2].finish_reason == "stop" and got[1][0][1] == text[:text.index(stop)]
        if method == "draft" or name == "copier":  # (the plain model's answer may repeat nothing of its prompt)
            assert spec.stats.spec_draft_tokens > 0
        if draft == "tiny-coder":  # a draft that writes something else: few of its drafts hold
            assert spec.stats.spec_accepted < 0.5 * spec.stats.spec_draft_tokens
        if name == "copier" and draft != "tiny-coder":  # the copy is in the prompt: most drafts hold, steps are saved
            last = got[0][0][2]
            assert last.drafted_tokens > 0 and last.accepted_tokens >= 0.7 * last.drafted_tokens
            assert spec.stats.spec_accepted > 0 and spec.stats.steps < plain.stats.steps
        off = _run(spec, prompt, SamplingParams(temperature=0, max_tokens=41, ignore_eos=True, speculative=False))
        assert off[0][0] == want[0][0][0] and off[0][2].drafted_tokens == 0  # a request that opts out
    finally:
        spec.shutdown()


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_rows_with_different_adapters_speculate_together(copy_home, method):
    """The copier and the copier under a LoRA adapter, in one batch: each verified under its own weights, each
    the same as without speculation (a draft model drafts for both under its own weights)."""
    from codellm.engine.sampling import SamplingParams
    from codellm.registry import Registry

    prompt = _ids(_engine_tokenizer(copy_home))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    results = {}
    for spec in (False, method):
        base, engine = _engine(copy_home, "copier", spec=spec, draft="copier" if spec == "draft" else None)
        try:
            model, adapter = engine.attach_adapter(Registry(copy_home), Registry(copy_home).get("copier-lora"))
            view = _adapter_view(base, model, adapter)
            got = {}

            def go(key, lm):
                got[key] = _run(engine, prompt, params, lm=lm)[0][0]
            threads = [threading.Thread(target=go, args=("base", None)), threading.Thread(target=go, args=("lora", view))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            results[spec] = got
        finally:
            engine.shutdown()
    assert results[method] == results[False] and results[False]["base"] != results[False]["lora"]


def test_a_draft_catches_up_on_what_it_did_not_see(copy_home):
    """Two streams, where at most one speculates at a time: while both decode, neither drafts; once the short one
    ends, the draft model takes in the tokens the long one decoded meanwhile (a packed prefill, more than its check
    rows hold) and drafts on. Both outputs are the same as without speculation."""
    from codellm.engine.sampling import SamplingParams

    prompt = _ids(_engine_tokenizer(copy_home))
    long, short = (SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (60, 12))
    outputs = {}
    for spec in (False, "draft"):
        _, engine = _engine(copy_home, "copier", spec=spec, draft="copier", config={"max_batch": 1})
        try:
            got = {}
            threads = [threading.Thread(target=lambda k=k, p=p: got.__setitem__(k, _run(engine, prompt, p)[0][0]))
                       for k, p in (("long", long), ("short", short))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            outputs[spec] = got
            if spec:
                assert engine.stats.spec_accepted > 0
        finally:
            engine.shutdown()
    assert outputs["draft"] == outputs[False] and len(outputs[False]["long"]) == 60


def test_a_draft_recomputes_shared_blocks_it_never_saw(copy_home):
    """An answer decoded without speculation goes into the prefix cache with the target's keys only. A next turn that
    reuses it has the draft take in the blocks whose keys it does not hold (a block is marked once the draft has its
    keys), instead of drafting over whatever those blocks held before: afterwards the draft's cache holds, for the
    whole conversation, the keys a draft computing it all from scratch holds, and the output is the same."""
    from codellm.engine.kvcache import cache_rows
    from codellm.engine.sampling import SamplingParams

    prompt = _ids(_engine_tokenizer(copy_home))
    plain = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, speculative=False)
    turn = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    got = {}
    for warm in (False, True):
        _, engine = _engine(copy_home, "copier", spec="draft", draft="copier")
        try:
            answer = _run(engine, prompt, plain)[0][0]  # the first turn: no drafts, its blocks cached
            if not warm:
                engine.pool.reset()  # (nothing held now) the next turn computes everything
            hits = engine.scheduler.prefix_hits
            history = prompt + answer + prompt[:20]
            tokens, _, last = _run(engine, history, turn)[0]
            assert (engine.scheduler.prefix_hits - hits >= len(prompt) + 32) == warm  # the answer's blocks reused
            assert last.drafted_tokens > 0
            cache = engine.drafter.runner.cache
            blocks = engine.pool.match(history, None)
            rows = cache_rows(blocks, 0, len(blocks) * cache.block_size, cache.block_size)
            got[warm] = tokens, cache.k[-1][rows].clone(), cache.v[-1][rows].clone()
        finally:
            engine.shutdown()
    assert got[True][0] == got[False][0]
    for cold, warm in zip(got[False][1:], got[True][1:]):
        assert cold.shape == warm.shape and cold.shape[0] >= len(prompt) + 48
        torch.testing.assert_close(warm, cold, rtol=1e-4, atol=1e-4)


def test_a_draft_of_another_vocabulary_is_refused():
    from codellm.engine import tiny
    from codellm.engine.drafter import check_vocabulary
    from codellm.engine.loader import LoadedModel
    from codellm.errors import InvalidRequest

    def model(name, size):
        return LoadedModel(name=name, manifest=None, model=None, tokenizer=tiny.build_tokenizer(size), device=None,
                           dtype=None, max_len=64)
    check_vocabulary(model("a", 512), model("b", 512))
    with pytest.raises(InvalidRequest, match="vocabulary"):
        check_vocabulary(model("a", 512), model("b", 400))


def _engine_tokenizer(home):
    from transformers import AutoTokenizer

    from codellm.registry import Registry

    return AutoTokenizer.from_pretrained(Registry(home).model_dir("copier"))


def _adapter_view(base, model, adapter: str):
    """The loaded model as requests for the adapter see it: the same weights, rows under ``adapter``."""
    import dataclasses

    return dataclasses.replace(base, model=model, adapter=adapter, name=f"{base.name}+{adapter}")


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_output_keeps_its_distribution(copy_home, method):
    """At temperature 1 the second and third tokens over 150 seeds are distributed alike with speculation and
    without (the unit test above checks the rule exactly; this checks the engine applies it)."""
    from codellm.engine.sampling import SamplingParams

    prompt = _ids(_engine_tokenizer(copy_home))
    seen = {}
    for spec in (False, method):
        _, engine = _engine(copy_home, "tiny-coder", spec=spec, draft="copier" if spec == "draft" else None)
        try:
            counts = Counter()
            for seed in range(150):
                ids = _run(engine, prompt + prompt[:12], SamplingParams(temperature=1.0, seed=seed, max_tokens=3,
                                                                       ignore_eos=True))[0][0]
                counts[tuple(ids[1:3])] += 1
            seen[spec] = counts
        finally:
            engine.shutdown()
    keys = set(seen[method]) | set(seen[False])
    tv = 0.5 * sum(abs(seen[method][k] - seen[False][k]) for k in keys) / 150
    assert tv < 0.35, tv


@pytest.mark.parametrize("placement,how", [("--engine-thread", "ngram"), ("--engine-process", "ngram"),
                                           ("--engine-process", "--draft"), ("--engine-thread", "PARAMETER draft")])
def test_server_reports_speculation_in_usage_and_metrics(copy_home, placement, how):
    """`serve --speculative ngram`, `serve --draft MODEL`, or a Modelfile's PARAMETER draft: usage counts kept and
    rejected drafts as OpenAI counts predicted outputs, and /metrics has vLLM's speculative-decoding counters."""
    model, flags = "copier", {"ngram": ["--speculative", "ngram"], "--draft": ["--draft", "copier"]}.get(how, [])
    if how == "PARAMETER draft":
        from codellm.registry import Registry
        from codellm.registry.create import create
        from codellm.registry.modelfile import parse

        reg = Registry(copy_home)
        if not reg.exists("copier-drafted"):
            create(reg, "copier-drafted", parse("FROM copier\nPARAMETER draft copier\n"))
        model = "copier-drafted"
    srv = Server(copy_home, *flags, "--model", model, "--slots", "4", placement)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = client.completions.create(model=model, prompt=SNIPPET, max_tokens=60, temperature=0)
        details = r.usage.completion_tokens_details
        assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens >= 0
        assert r.choices[0].text.startswith(SNIPPET[:20])
        off = client.completions.create(model=model, prompt=SNIPPET, max_tokens=60, temperature=0,
                                        extra_body={"speculative": False})
        assert off.choices[0].text == r.choices[0].text and off.usage.completion_tokens_details is None
        metrics = httpx.get(srv.url + "/metrics").text
        accepted = [line for line in metrics.splitlines() if line.startswith("vllm:spec_decode_num_accepted_tokens_total")]
        assert accepted and float(accepted[0].rsplit(" ", 1)[1]) >= details.accepted_prediction_tokens
    finally:
        srv.stop()


def test_every_dialect_can_turn_speculation_off(copy_home):
    """OpenAI's chat, completions and Responses, Anthropic's Messages and Ollama's generate and chat: a request
    that says ``speculative: false`` (Ollama: in its options) checks no drafts, and one that does not, does."""
    import anthropic
    import ollama

    def drafted() -> float:
        lines = httpx.get(srv.url + "/metrics").text.splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines
                   if line.startswith("vllm:spec_decode_num_draft_tokens_total"))

    srv = Server(copy_home, "--speculative", "ngram", "--model", "copier", "--slots", "4", "--engine-thread")
    try:
        oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        an = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0)
        ol = ollama.Client(host=srv.url)
        chat = [{"role": "user", "content": SNIPPET}]
        off = {"speculative": False}
        requests = [
            lambda: oa.completions.create(model="copier", prompt=SNIPPET, max_tokens=30, temperature=0, extra_body=off),
            lambda: oa.chat.completions.create(model="copier", messages=chat, max_tokens=30, temperature=0, extra_body=off),
            lambda: oa.responses.create(model="copier", input=SNIPPET, max_output_tokens=30, temperature=0, extra_body=off),
            lambda: an.messages.create(model="copier", messages=chat, max_tokens=30, extra_body=off),
            lambda: ol.generate(model="copier", prompt=SNIPPET, raw=True, options={"num_predict": 30, "temperature": 0,
                                                                                 "speculative": False}),
            lambda: ol.chat(model="copier", messages=chat, options={"num_predict": 30, "temperature": 0, "speculative": False}),
        ]
        before = drafted()
        for request in requests:
            request()
        assert drafted() == before
        ol.generate(model="copier", prompt=SNIPPET, raw=True, options={"num_predict": 30, "temperature": 0})
        assert drafted() > before
        with pytest.raises(ollama.ResponseError):
            ol.generate(model="copier", prompt=SNIPPET, options={"speculative": "sometimes"})
    finally:
        srv.stop()


def test_a_models_parameter_draft_takes_the_place_of_the_servers_way_and_says_so(copy_home, caplog):
    """A Modelfile's PARAMETER draft is the more specific setting: under `serve --speculative ngram` that model
    drafts with its own draft model, the log says so, and other models keep the server's way."""
    import logging

    from codellm.engine import loader
    from codellm.engine.manager import LoadOptions, ModelManager
    from codellm.engine.speculation import SpeculativeConfig
    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import parse

    reg = Registry(copy_home)
    if not reg.exists("copier-drafted"):
        create(reg, "copier-drafted", parse("FROM copier\nPARAMETER draft copier\n"))
    manager = ModelManager(reg, LoadOptions(speculative=SpeculativeConfig(method="ngram", num_tokens=3)))
    with caplog.at_level(logging.INFO, logger="codellm.engine"):
        spec = manager._speculation(*loader.resolve(reg, "copier-drafted"))
    assert (spec.method, spec.draft, spec.num_tokens) == ("draft", "copier", 3)
    assert "drafts with copier (its PARAMETER draft), in place of the server's ngram" in caplog.text
    plain = manager._speculation(*loader.resolve(reg, "copier"))
    assert (plain.method, plain.draft) == ("ngram", None)
