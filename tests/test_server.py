"""The OpenAI-compatible server, started for real on loopback, driven by the openai SDK and httpx."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import Server, run_cli

KEY = "sk-test-key"


@pytest.fixture(scope="module", params=["--engine-thread", "--engine-process"])
def server(served_home, request):
    """Every test runs against both engine placements: a thread of the server, and a child process (the
    default on GPUs), whose outputs cross a pipe."""
    srv = Server(served_home, "--slots", "16", "--num-ctx", "256", "--model", "tiny-coder", request.param, api_key=KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def aclient(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def chat(client, content="write a function", **kw):
    kw.setdefault("max_tokens", 24)
    return client.chat.completions.create(model="tiny-coder", messages=[{"role": "user", "content": content}], **kw)


def wait_idle(server, timeout=120.0) -> dict:
    """The tiny model with nothing running or queued (the wait only guards against a hang: a busy machine is slow)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = server.health()["models"]["tiny-coder:latest"]
        if info["active"] == 0 and info["queued"] == 0:
            return info
        time.sleep(0.05)
    raise AssertionError(f"work still running: {server.health()}")


def test_models(client, server, served_home):
    ids = [m.id for m in client.models.list().data]
    # ids are name:tag, as `codellm list` and Ollama show them; bare names still work
    assert {"tiny-coder:latest", "qwen2.5-coder:0.5b", "tiny-lora:latest"} <= set(ids)
    listed = run_cli("list", env={"CODELLM_HOME": str(served_home)})
    assert set(ids) == {line.split()[0] for line in listed.stdout.splitlines()[1:]}
    assert client.models.retrieve("tiny-lora").model_extra["parent"] == "qwen2.5-coder:0.5b"
    prompt = "def fibonacci(n):\n"
    lora = client.completions.create(model="tiny-lora:latest", prompt=prompt, max_tokens=12, extra_body={"ignore_eos": True})
    plain = client.completions.create(model="tiny-coder", prompt=prompt, max_tokens=12, extra_body={"ignore_eos": True})
    assert lora.choices[0].text != plain.choices[0].text  # the adapter is applied (unmerged) on its base
    card = client.models.retrieve("tiny-coder")
    assert card.id == "tiny-coder:latest" and card.model_extra["max_model_len"] == 256
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.body["code"] == "model_not_found"


def test_chat_non_streaming(client):
    r = chat(client)
    choice = r.choices[0]
    assert r.object == "chat.completion" and isinstance(r.created, int) and r.model == "tiny-coder"
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    # the model's Modelfile default (temperature 0) makes it deterministic
    assert chat(client).choices[0].message.content == choice.message.content
    multi = client.chat.completions.create(model="tiny-coder", max_tokens=8, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}])
    assert multi.usage.prompt_tokens > r.usage.prompt_tokens - 10


def test_chat_streaming_sse_framing(server, client):
    text = chat(client).choices[0].message.content
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == text
    assert [c.choices[0].finish_reason for c in chunks[:-2]] == [None] * (len(chunks) - 2)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    # raw bytes: compact JSON per data line, no comments, [DONE] last, then the body ends
    body = {"model": "tiny-coder", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.headers) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") and "\n" not in e and ": " not in e[6:30] for e in events[:-2])
    assert '"usage"' not in raw


def test_async_clients_and_16_concurrent_streams_share_batches(server, aclient):
    async def one(i):
        stream = await aclient.chat.completions.create(
            model="tiny-coder", messages=[{"role": "user", "content": f"task {i}"}], max_tokens=40, stream=True,
            temperature=0.9, seed=i, extra_body={"ignore_eos": True})
        parts, finish = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def main():
        return await asyncio.gather(*(one(i) for i in range(16)))

    before = server.health()["models"]["tiny-coder:latest"]
    results = asyncio.run(main())
    assert all(finish == "length" for _, finish in results)
    after = wait_idle(server)
    assert after["max_batch"] >= 12  # requests decoded together, not one after another
    steps = after["steps"] - before["steps"]
    assert steps < 16 * 40 / 4  # far fewer forward passes than tokens


def test_completions_fim_and_raw_fim_agree(client):
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    with_suffix = client.completions.create(model="tiny-coder", prompt=prefix, suffix=suffix, max_tokens=12)
    raw = client.completions.create(model="tiny-coder", prompt=f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",
                                    max_tokens=12)
    # special-token text in a raw prompt tokenizes to the special ids: same prompt, same answer
    assert with_suffix.usage.prompt_tokens == raw.usage.prompt_tokens
    assert with_suffix.choices[0].text == raw.choices[0].text
    split = client.completions.create(model="tiny-coder", prompt=f"<|fim_prefix|>{prefix}", max_tokens=1)
    assert split.usage.prompt_tokens < raw.usage.prompt_tokens
    assert with_suffix.object == "text_completion" and isinstance(with_suffix.created, int)


def test_completions_list_echo_logprobs(client):
    r = client.completions.create(model="tiny-coder", prompt=["def fib", "class Stack"], max_tokens=6, n=2,
                                  logprobs=3, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.startswith("def fib") and r.choices[2].text.startswith("class Stack")
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset)
    assert all(len(t) <= 3 for t in lp.top_logprobs[-6:])
    streamed = client.completions.create(model="tiny-coder", prompt="def fib", max_tokens=8, logprobs=1, stream=True,
                                         temperature=0, extra_body={"ignore_eos": True})
    tokens, offsets = [], []
    for ev in streamed:
        if ev.choices and ev.choices[0].logprobs:
            tokens += ev.choices[0].logprobs.tokens
            offsets += ev.choices[0].logprobs.text_offset
    assert len(tokens) == 8  # offsets run on across chunks, from the start of the text
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    c = chat(client, logprobs=True, top_logprobs=2, max_tokens=5)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and len(content[0].top_logprobs) == 2
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob


def test_stop_strings_across_token_boundaries(client):
    base = client.completions.create(model="tiny-coder", prompt="class Stack:\n", max_tokens=30, temperature=0).choices[0].text
    assert len(base) > 12
    # a stop that starts in the middle of one token and ends inside a later one
    stop = base[5:11]
    r = client.completions.create(model="tiny-coder", prompt="class Stack:\n", max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == base[:base.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny-coder", prompt="class Stack:\n", max_tokens=30, temperature=0,
                                         stop=stop, stream=True)
    pieces = list(streamed)
    assert "".join(p.choices[0].text for p in pieces) == base[:base.index(stop)]
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_multibyte_utf8_never_broken(client):
    prompt = "# Unicode"
    r = client.completions.create(model="tiny-coder", prompt=prompt, max_tokens=40, temperature=0)
    text = r.choices[0].text
    assert any(ord(ch) > 127 for ch in text) and "\ufffd" not in text
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny-coder", prompt=prompt, max_tokens=40,
                                                                    temperature=0, stream=True)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_seed_reproducible(client):
    kw = dict(temperature=2.0, max_tokens=20, extra_body={"ignore_eos": True})
    a = chat(client, seed=1234, **kw).choices[0].message.content
    b = chat(client, seed=1234, **kw).choices[0].message.content
    others = {chat(client, seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert a == b and len(others | {a}) > 1
    n = chat(client, seed=5, n=3, **kw)
    assert [c.index for c in n.choices] == [0, 1, 2] and len({c.message.content for c in n.choices}) > 1


def test_disconnect_frees_slot(server):
    wait_idle(server)
    before = server.health()["models"]["tiny-coder:latest"]["cancelled"]
    body = {"model": "tiny-coder", "messages": [{"role": "user", "content": "go"}], "max_tokens": 10_000,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.headers) as resp:
        lines = resp.iter_lines()
        next(lines), next(lines)
        assert server.health()["models"]["tiny-coder:latest"]["active"] == 1
    info = wait_idle(server)
    assert info["cancelled"] == before + 1
    # non-streaming: the client gives up while waiting
    body.update(stream=False, n=16)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.headers, timeout=0.2)
    info = wait_idle(server)
    assert info["cancelled"] == before + 1 + 16


def test_errors_in_openai_shape_and_server_keeps_serving(server, client):
    url, h = server.url + "/v1/chat/completions", server.headers

    def err(resp, status, code=None, param=None):
        assert resp.status_code == status, resp.text
        e = resp.json()["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["message"]
        if code:
            assert e["code"] == code
        if param:
            assert e["param"] == param
        return e

    err(httpx.post(url, content=b"{not json", headers={**h, "content-type": "application/json"}), 400)
    err(httpx.post(url, json={"model": "tiny-coder"}, headers=h), 400)
    err(httpx.post(url, json={"model": "tiny-coder", "messages": [{"role": "user", "content": "x"}], "temperature": 9}, headers=h),
        400, param="temperature")
    err(httpx.post(url, json={"model": "tiny-coder", "messages": [{"role": "wizard", "content": "x"}]}, headers=h), 400)
    err(httpx.post(url, json={"model": "tiny-coder", "messages": []}, headers=h), 400, param="messages")
    err(httpx.post(url, json={"model": "tiny-coder", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"a": 1}}, headers=h),
        400, param="logit_bias")
    assert err(httpx.post(url, json={"model": "x", "messages": []}), 401)["type"] == "authentication_error"
    err(httpx.post(url, json={"model": "x", "messages": []}, headers={"Authorization": "Bearer wrong"}), 401)
    err(httpx.post(url, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}, headers=h), 404, "model_not_found", "model")
    e = err(httpx.post(url, json={"model": "tiny-coder", "messages": [{"role": "user", "content": "word " * 400}]}, headers=h),
            400, "context_length_exceeded")
    assert "maximum context length is 256 tokens" in e["message"] and "requested" in e["message"]
    with pytest.raises(openai.BadRequestError):
        chat(client, content="word " * 400)
    # max_tokens beyond the context left is clamped, not refused
    r = chat(client, max_tokens=4096, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.total_tokens == 256
    r = client.completions.create(model="tiny-coder", prompt="x", suffix="y", echo=True, max_tokens=2) if False else None
    e = err(httpx.post(server.url + "/v1/completions", json={"model": "tiny-coder", "prompt": [1, "a"]}, headers=h), 400)
    assert httpx.get(server.url + "/health").status_code == 200  # public
    assert httpx.get(server.url + "/schema/openapi.json").status_code in (200, 401)
    assert chat(client).choices[0].message.content  # still serving


def test_queue_full_is_429_with_retry_after(served_home):
    srv = Server(served_home, "--slots", "1", "--max-queue", "1", "--cors-origin", "http://localhost:3000")
    try:
        body = {"model": "tiny-coder", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1900,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body) as resp:
            lines = resp.iter_lines()  # keep the iterator: dropping it closes the connection
            next(lines)
            r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": False})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            o = httpx.post(srv.url + "/api/generate", json={"model": "tiny-coder", "prompt": "x", "stream": False})
            assert o.status_code == 503 and "busy" in o.json()["error"]  # Ollama's status and shape
        assert srv.health()["status"] == "ok"
        pre = httpx.options(srv.url + "/v1/chat/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code in (200, 204) and pre.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.get(srv.url + "/v1/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        srv.stop()


def test_stream_interval_groups_tokens_and_keeps_the_text(served_home):
    """``--stream-interval``: a stream's tokens that come within the interval go out as one chunk; the text and the
    usage are those of the unpaced answer. 'auto' grows with the open streams; a bad value is a usage error."""
    from conftest import run_cli

    from codellm.engine.streams import MAX_INTERVAL, auto_interval

    assert auto_interval(0) == 0 and auto_interval(8) < 0.002 and auto_interval(256) == 256 / 8000
    assert auto_interval(10_000) == MAX_INTERVAL
    bad = run_cli("serve", "--stream-interval", "fast", env={"CODELLM_HOME": str(served_home)})
    assert bad.returncode == 2 and "--stream-interval" in bad.stderr
    srv = Server(served_home, "--slots", "4", "--num-ctx", "256", "--model", "tiny-coder", "--stream-interval", "200")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        kw = dict(model="tiny-coder", prompt="def parse(", max_tokens=48, temperature=0, extra_body={"ignore_eos": True})
        whole = client.completions.create(**kw)
        chunks = [c for c in client.completions.create(**kw, stream=True, stream_options={"include_usage": True})]
        texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
        assert "".join(texts) == whole.choices[0].text
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 48
        assert 1 <= len(texts) < 24  # 48 tokens in a few chunks, not one each
        # two choices interleave in one stream: each is still grouped (and nothing falls behind)
        two = client.completions.create(**kw, n=2)
        chunks = [c for c in client.completions.create(**kw, n=2, stream=True)]
        for index in (0, 1):
            mine = [c.choices[0].text for c in chunks if c.choices and c.choices[0].index == index]
            assert "".join(mine) == two.choices[index].text and len(mine) < 24
    finally:
        srv.stop()


def test_cli_run_one_shot_and_interactive(served_home, server):
    from conftest import run_cli

    env = {"CODELLM_HOME": str(served_home)}
    r = run_cli("run", "tiny-coder", "write", "a", "function", "--url", server.url, "--api-key", KEY, env=env)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    script = '/set system You are terse.\n/set parameter num_predict 5\n"""\nfirst line\nsecond line\n"""\nhello\n/bogus\n/bye\n'
    r = run_cli("run", "tiny-coder", "--local", "--num-ctx", "256", env=env, input=script)
    assert r.returncode == 0, r.stderr
    assert "Set system message." in r.stdout and "Set parameter 'num_predict' to '5'" in r.stdout
    assert "unknown command '/bogus'" in r.stdout
    r = run_cli("run", "no-such-model", "hi", "--local", env=env)
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_response_format_json_object(client):
    import json

    parsed = 0
    for seed in (1, 2, 3, 4):
        r = chat(client, content="Give me a JSON object describing a stack", max_tokens=200, seed=seed, temperature=0.8,
                 response_format={"type": "json_object"})
        text = r.choices[0].message.content
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
            parsed += 1
        else:  # cut by max_tokens: still a prefix of a JSON object
            assert text.lstrip().startswith("{")
    assert parsed >= 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(
        client, content="json please", max_tokens=200, response_format={"type": "json_object"}, stream=True))
    assert streamed.lstrip().startswith("{")


def test_disconnect_before_the_response_starts_frees_slot(server, client):
    """Clients that send a streaming request and hang up at once, before any byte of the response: nothing
    stays running or counted busy, and the server goes on serving."""
    import json
    import socket
    from urllib.parse import urlparse

    wait_idle(server)
    u = urlparse(server.url)
    body = json.dumps({"model": "tiny-coder", "messages": [{"role": "user", "content": "go"}], "max_tokens": 10_000,
                       "stream": True, "ignore_eos": True}).encode()
    for _ in range(3):
        with socket.create_connection((u.hostname, u.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    info = wait_idle(server)
    assert info["active"] == 0 and info["queued"] == 0
    assert chat(client, max_tokens=4).choices[0].finish_reason in ("stop", "length")


def scrape(server) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client's own parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401  # what runs here is not public
    r = httpx.get(server.url + "/metrics", timeout=10, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics(client, server):
    """Prometheus text under vLLM's names (behind the API key), one series per loaded model whichever process runs its
    engine: request histograms (time to first token, between tokens, end to end, in the queue, token counts),
    finished choices by reason, and the engine's gauges and counters. An unloaded model's series go with it."""
    chat(client, max_tokens=4, extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model="tiny-coder", max_tokens=6, stream=True, extra_body={
        "ignore_eos": True}, messages=[{"role": "user", "content": "write a function"}]))
    assert chunks
    m = scrape(server)
    me = (("model_name", "tiny-coder:latest"),)

    def hist(name):
        return m[(f"vllm:{name}_count", me)], m[(f"vllm:{name}_sum", me)], m[(f"vllm:{name}_bucket", (("le", "+Inf"), *me))]

    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        count, total, inf = hist(name)
        assert count >= 2 and inf == count and 0 <= total < 60 * count, name
    count, total, _ = hist("inter_token_latency_seconds")
    assert count >= 3 + 5 and total > 0  # at least one gap per token after the first, in both answers
    count, total, _ = hist("request_generation_tokens")
    assert count >= 2 and total >= 10
    assert hist("request_prompt_tokens")[1] > 0
    assert m[("vllm:request_success_total", (("finished_reason", "length"), *me))] >= 2
    assert m[("vllm:generation_tokens_total", me)] >= 10 and m[("vllm:prompt_tokens_total", me)] > 0
    assert m[("vllm:num_requests_running", me)] == 0 and m[("vllm:num_requests_waiting", me)] == 0
    assert 0 <= m[("vllm:kv_cache_usage_perc", me)] <= 1 and m[("codellm_kv_cache_blocks", me)] > 0
    # the Grafana dashboard in deploy/ graphs only what is exported
    import re
    dashboard = json.loads((Path(__file__).parents[1] / "deploy" / "grafana" / "codellm.json").read_text())
    queried = {name for panel in dashboard["panels"] for t in panel["targets"]
               for name in re.findall(r"(?:vllm:|codellm_)[a-z0-9_]+", t["expr"])}
    assert len(queried) >= 12 and queried <= {name for name, _ in m}, queried - {name for name, _ in m}
    # a second model gets series of its own; unloading it (Ollama's keep_alive 0) takes them away
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/api/generate", headers=h, timeout=60, json={
        "model": "qwen2.5-coder:0.5b", "prompt": "x", "stream": False, "options": {"num_predict": 2}})
    assert r.status_code == 200
    other = (("model_name", "qwen2.5-coder:0.5b"),)
    assert scrape(server)[("vllm:time_to_first_token_seconds_count", other)] == 1
    assert httpx.post(server.url + "/api/generate", headers=h, json={"model": "qwen2.5-coder:0.5b", "keep_alive": 0},
                      timeout=60).status_code == 200
    after = scrape(server)
    assert not [k for k in after if ("model_name", "qwen2.5-coder:0.5b") in k[1]]
    assert after[("vllm:time_to_first_token_seconds_count", me)] >= 2


def test_prefix_cache_reports_cached_tokens(client, server):
    """A long system prompt sent again (an agent's rules and tools) comes from the prefix cache the second time:
    usage says how many tokens, streamed or not, and /metrics counts the hits under vLLM's names too."""
    system = f"You are a careful coding assistant ({time.time_ns()}). Answer with code only, no prose. " * 2

    def ask(question, **kw):
        return client.chat.completions.create(model="tiny-coder", max_tokens=4, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": question}], **kw)

    first = ask("write a stack")
    assert first.usage.prompt_tokens > 64 and first.usage.prompt_tokens_details.cached_tokens == 0
    second = ask("write a queue")
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 32 <= cached < second.usage.prompt_tokens and cached % 16 == 0
    chunks = list(ask("write a heap", stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= cached
    m, me = scrape(server), (("model_name", "tiny-coder:latest"),)
    assert m[("vllm:prefix_cache_hits_total", me)] >= 2 * cached
    assert m[("vllm:prefix_cache_queries_total", me)] >= 3 * first.usage.prompt_tokens


def _engine_children(pid: int) -> list[int]:
    """The server's engine processes (spawned children, not multiprocessing's resource tracker)."""
    from pathlib import Path

    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
                found.append(int(child))
    return found


def test_killed_engine_process_is_loaded_again(client, server):
    """The engine process dies (OOM killer, a crash): the server stays up, and the next request loads it again."""
    import os
    import signal

    if "--engine-process" not in server.proc.args:
        pytest.skip("the engine runs as a thread here")
    chat(client, max_tokens=2)
    before = _engine_children(server.proc.pid)
    assert before
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 120
    while True:  # the first request may still meet the dying engine: it fails cleanly, then the model reloads
        try:
            r = chat(client, max_tokens=4)
            break
        except openai.APIError:
            assert time.time() < deadline
            time.sleep(0.2)
    assert r.choices[0].message.content is not None and r.usage.completion_tokens > 0
    after = _engine_children(server.proc.pid)
    assert after and not set(after) & set(before)
    wait_idle(server)


def test_generative_rerank_and_embeddings_wherever_the_engine_runs(server):
    """A generative model reranks by the cosine of its mean-pooled embeddings, computed where its weights are (in a
    child process the server has no model to call)."""
    docs = ["def add(a, b):\n    return a + b", "The weather is nice today."]
    r = httpx.post(server.url + "/v1/rerank", headers=server.headers,
                   json={"model": "tiny-coder", "query": "add two numbers", "documents": docs})
    assert r.status_code == 200, r.text
    assert sorted(x["index"] for x in r.json()["results"]) == [0, 1]
    e = httpx.post(server.url + "/v1/embeddings", headers=server.headers, json={"model": "tiny-coder", "input": docs})
    assert e.status_code == 200 and len(e.json()["data"]) == 2 and len(e.json()["data"][0]["embedding"]) > 0


def test_explicit_nulls_mean_the_defaults(server):
    """What wrappers that forward None send: OpenAI's spec allows null for these."""
    body = {"model": "tiny-coder", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": None,
            "n": None, "stop": None, "temperature": None, "stream": None, "top_p": None, "seed": None}
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers, json=body)
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
    r = httpx.post(server.url + "/v1/completions", headers=server.headers,
                   json={"model": "tiny-coder", "prompt": "x", "max_tokens": 4, "echo": None, "n": None, "stream": None})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text


def test_adapters_a_killed_server_added_are_removed_by_the_next_one(served_home, adapter_dir):
    """A server killed before its shutdown cannot remove the adapters it added at run time; the next server on the
    registry does, from the dead one's ledger, and leaves a live server's alone."""
    from codellm.registry import Registry

    reg = Registry(served_home)
    live = Server(served_home, "--slots", "2", "--num-ctx", "256", "--engine-thread", "--allow-lora-updates")
    doomed = Server(served_home, "--slots", "2", "--num-ctx", "256", "--engine-thread", "--allow-lora-updates")
    try:
        for srv, name in ((live, "lora-of-the-living"), (doomed, "lora-of-the-killed")):
            r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapter_dir),
                                                                     "base_model_name": "tiny-coder"})
            assert r.status_code == 200, r.text
        doomed.proc.kill()
        doomed.proc.wait(60)
        assert reg.exists("lora-of-the-killed")  # left behind
        assert any(p.name.endswith(f"-{doomed.proc.pid}.json") for p in (served_home / "run").iterdir())
        nxt = Server(served_home, "--slots", "2", "--num-ctx", "256", "--engine-thread", "--allow-lora-updates")
        try:
            assert not reg.exists("lora-of-the-killed") and reg.exists("lora-of-the-living")
            assert not any(p.name.endswith(f"-{doomed.proc.pid}.json") for p in (served_home / "run").iterdir())
            r = httpx.post(nxt.url + "/v1/load_lora_adapter", json={"lora_name": "lora-of-the-killed",
                                                                    "lora_path": str(adapter_dir),
                                                                    "base_model_name": "tiny-coder"})
            assert r.status_code == 200, r.text  # the name is free again
        finally:
            nxt.stop()
    finally:
        live.stop()
        doomed.stop()
    assert not reg.exists("lora-of-the-living") and not reg.exists("lora-of-the-killed")


@pytest.mark.parametrize("placement", ["--engine-thread", "--engine-process"])
def test_lora_adapters_loaded_and_unloaded_while_serving(served_home, adapter_dir, placement):
    """vLLM's runtime LoRA routes: off by default; on, an adapter from a PEFT directory (from this machine) or a
    registry adapter becomes a model at once, listed and served on its base like the same adapter created ahead
    of time; unloading it removes it again. Wrong names and repeats are refused in OpenAI's shape."""
    if placement == "--engine-thread":
        plain = Server(served_home, "--slots", "4", "--num-ctx", "256", "--model", "qwen2.5-coder:0.5b", placement)
        try:
            r = httpx.post(plain.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(adapter_dir)})
            assert r.status_code == 403 and "--allow-lora-updates" in r.json()["error"]["message"]
        finally:
            plain.stop()
    srv = Server(served_home, "--slots", "4", "--num-ctx", "256", "--model", "qwen2.5-coder:0.5b", placement,
                 "--allow-lora-updates")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        ask = dict(prompt="def fibonacci(n):\n", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "live-lora", "lora_path": str(adapter_dir)})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'live-lora' added successfully."
        assert "live-lora:latest" in [m.id for m in client.models.list().data]
        live = client.completions.create(model="live-lora", **ask).choices[0].text
        assert live == client.completions.create(model="tiny-lora", **ask).choices[0].text  # the same adapter, same text
        assert live != client.completions.create(model="qwen2.5-coder:0.5b", **ask).choices[0].text
        r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "live-lora", "lora_path": str(adapter_dir)})
        assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "from-registry", "lora_path": "tiny-lora"})
        assert r.status_code == 200
        assert client.completions.create(model="from-registry", **ask).choices[0].text == live
        r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "tiny-coder"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
        # base:adapter names the adapter model on its base; an adapter made for another base is refused
        assert client.completions.create(model="qwen2.5-coder:0.5b:tiny-lora", **ask).choices[0].text == live
        with pytest.raises(openai.BadRequestError, match="was made for"):
            client.completions.create(model="tiny-coder:tiny-lora", **ask)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="qwen2.5-coder:0.5b:no-such-adapter", **ask)

        def adapters_on_base(expected: int | None = None) -> int:
            """How many adapters the base's weights carry; ``expected``: once they come to that (adapters come off
            between two steps, in the background)."""
            deadline = time.monotonic() + 120
            while True:
                n = httpx.get(srv.url + "/health").json()["models"]["qwen2.5-coder:0.5b"]["lora_adapters"]
                if expected is None or n == expected or time.monotonic() > deadline:
                    return n
                time.sleep(0.2)

        assert adapters_on_base() == 2  # the directory's copy, and tiny-lora's files (from-registry shares them)
        for name in ("live-lora", "from-registry"):
            r = httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": name})
            assert r.status_code == 200 and "removed successfully" in r.text
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="live-lora", **ask)
        r = httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "tiny-lora"})  # not added at run time
        assert r.status_code == 404 and r.json()["error"]["code"] == "lora_not_found"
        assert "tiny-lora:latest" in [m.id for m in client.models.list().data]
        assert adapters_on_base(1) == 1  # tiny-lora still serves its files
        r = httpx.post(srv.url + "/api/generate", json={"model": "tiny-lora", "keep_alive": 0})
        assert r.status_code == 200 and r.json()["done_reason"] == "unload"
        assert adapters_on_base(0) == 0  # off the weights: the base alone, as before
        assert client.completions.create(model="qwen2.5-coder:0.5b", **ask).choices[0].text != live
        r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "kept-lora", "lora_path": "tiny-lora"})
        assert r.status_code == 200
    finally:
        srv.stop()
    from codellm.registry import Registry

    assert not Registry(served_home).exists("kept-lora")  # added at run time: gone with the server, as in vLLM
