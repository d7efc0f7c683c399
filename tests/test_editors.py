"""What editor plugins and agent tools send, replayed against the real server: tool calling first."""

from __future__ import annotations

import json
import time

import httpx
import ollama
import openai
import pytest

from conftest import WEATHER_QUESTION, WEATHER_TOOL, Server

MODEL = "qwen2.5-coder-tools"


@pytest.fixture(scope="module")
def server(tool_home):
    srv = Server(tool_home, "--model", MODEL, "--slots", "8")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="codellm", max_retries=0)


def ask(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": WEATHER_QUESTION}],
                                          tools=[WEATHER_TOOL], max_tokens=100, **kw)


def test_tool_call_non_streaming(client):
    r = ask(client)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert not choice.message.content
    plain = ask(client, tool_choice="none")  # no tools rendered: no tool call parsed
    assert plain.choices[0].finish_reason != "tool_calls" and plain.choices[0].message.tool_calls is None


def test_tool_call_streaming_deltas(server, client):
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": WEATHER_QUESTION}],
                                        tools=[WEATHER_TOOL], max_tokens=100) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]  # the SDK's helper concatenates repeated fields
    assert call.function.name == "get_weather" and call.id.startswith("call_") and call.id.count("call_") == 1
    assert json.loads(call.function.arguments) == {"city": "Paris"} and final.choices[0].finish_reason == "tool_calls"
    body = {"model": MODEL, "messages": [{"role": "user", "content": WEATHER_QUESTION}], "tools": [WEATHER_TOOL],
            "stream": True, "max_tokens": 100}
    raw = httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.headers).text
    chunks = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert sum("role" in d for d in deltas) == 1
    tool_deltas = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert all("index" in t for t in tool_deltas)
    assert "id" in tool_deltas[0] and "name" in tool_deltas[0]["function"]
    assert all("id" not in t and "name" not in t.get("function", {}) for t in tool_deltas[1:])
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "tool_calls"


def test_tool_results_go_back_through_the_template(client):
    first = ask(client).choices[0].message
    follow = client.chat.completions.create(model=MODEL, max_tokens=5, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": WEATHER_QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [t.model_dump() for t in first.tool_calls]},
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": '{"temp_c": 18}'}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_ollama_chat_tool_calls_have_object_arguments(server):
    # raw requests, as Continue's Ollama provider sends them (the tiny model memorized this exact tool JSON)
    body = {"model": MODEL, "messages": [{"role": "user", "content": WEATHER_QUESTION}], "tools": [WEATHER_TOOL],
            "options": {"num_predict": 100, "repeat_penalty": 1.0}, "stream": False}
    r = httpx.post(server.url + "/api/chat", json=body, headers=server.headers, timeout=60).json()
    call = r["message"]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}} and r["done"] is True
    lines = httpx.post(server.url + "/api/chat", json={**body, "stream": True}, headers=server.headers, timeout=60).text
    parts = [json.loads(line) for line in lines.splitlines()]
    assert all(line for line in lines.split("\n")[:-1])
    assert any(p["message"].get("tool_calls") for p in parts) and parts[-1]["done"] is True
    # the ollama client parses such a response into its own types
    client = ollama.Client(host=server.url)
    assert client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3}).done


# ---- replay: each client's requests as its source sends them, checked the way its parser reads them ----

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1] / "deploy" / "editors"
CONTINUE_STOPS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                  "<|file_sep|>", "<|im_start|>", "<|im_end|>", "\n\n", "\r\n\r\n", "/src/", "#- coding: utf-8", "```"]
PREFIX, SUFFIX = "def fibonacci(n):\n    ", "\n\nprint(fibonacci(10))\n"


def continue_models(server) -> dict:
    import yaml

    cfg = yaml.safe_load((ROOT / "continue-config.yaml").read_text())
    out = {}
    for m in cfg["models"]:
        base = m["apiBase"].replace("http://127.0.0.1:11435", server.url)
        for role in m.get("roles", []):
            out.setdefault((m["provider"], role), {**m, "apiBase": base})
    return out


def sse_events(raw: str) -> list[dict]:
    """Continue's parser: split on single newlines, one complete JSON per data line, no comments."""
    events = []
    lines = raw.split("\n")
    assert not any(line.startswith(":") for line in lines)
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    assert raw.rstrip("\n").endswith("data: [DONE]")
    return events


def test_continue_openai_chat_autocomplete_embed_rerank(server):
    import base64
    import struct

    models = continue_models(server)
    chat = models[("openai", "chat")]
    headers = {"Authorization": f"Bearer {chat['apiKey']}", "User-Agent": "OpenAI/JS 4.x", "Content-Type": "application/json"}
    body = {"model": chat["model"], "messages": [{"role": "user", "content": "write a function"}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": 4096, "temperature": 0.5,
            "stop": CONTINUE_STOPS[:8] + [f"stop-{i}" for i in range(30)]}
    events = sse_events(httpx.post(chat["apiBase"] + "/chat/completions", json=body, headers=headers, timeout=60).text)
    assert events[-1]["choices"] == [] and all(k in events[-1]["usage"] for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
    auto = models[("openai", "autocomplete")]
    body = {"model": auto["model"], "prompt": f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>", "stream": True,
            "temperature": 0.01, "max_tokens": 4096, "stop": CONTINUE_STOPS}
    events = sse_events(httpx.post(auto["apiBase"] + "/completions", json=body, headers=headers, timeout=60).text)
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert not any(stop in text for stop in CONTINUE_STOPS) and events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "qwen" in auto["model"] and "coder" in auto["model"]  # Continue's template choice keys on the model id
    emb = models[("openai", "embed")]
    raw = httpx.post(emb["apiBase"] + "/embeddings", headers=headers, json={
        "model": emb["model"], "input": ["def add(a, b):", "class Stack:"], "encoding_format": "base64"}).json()
    floats = httpx.post(emb["apiBase"] + "/embeddings", headers=headers, json={
        "model": emb["model"], "input": ["def add(a, b):", "class Stack:"]}).json()
    vec = struct.unpack(f"<{len(floats['data'][0]['embedding'])}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert list(vec) == pytest.approx(floats["data"][0]["embedding"], abs=1e-6) and len(vec) == 32
    rr = models[("openai", "rerank")]
    docs = ["def add(a, b): return a + b", "the weather is nice", "class Stack: pass"]
    r = httpx.post(rr["apiBase"] + "/rerank", headers=headers, json={"model": rr["model"], "query": "add numbers", "documents": docs}).json()
    assert sorted(d["index"] for d in r["data"]) == [0, 1, 2] and r["results"] == r["data"]
    assert all(0 <= d["relevance_score"] <= 1 for d in r["data"])
    assert r["data"] == sorted(r["data"], key=lambda d: -d["relevance_score"])
    top = httpx.post(server.url + "/rerank", json={"model": "bge-small:en-v1.5", "query": "add", "documents": docs, "top_n": 2}).json()
    assert len(top["results"]) == 2  # an embedding model reranks by cosine
    bad = httpx.post(server.url + "/v1/chat/completions", json={"model": "bge-small:en-v1.5", "messages": [{"role": "user", "content": "x"}]})
    assert bad.status_code == 400 and "does not support generate" in bad.json()["error"]["message"]


def test_continue_ollama_provider(server):
    m = continue_models(server)[("ollama", "chat")]
    show = httpx.post(m["apiBase"] + "/api/show", json={"name": m["model"]}).json()
    assert "model_info" in show and isinstance(show["parameters"], str) and "template" in show
    r = httpx.post(m["apiBase"] + "/api/generate", json={
        "model": m["model"], "prompt": f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>", "raw": True,
        "keep_alive": 1800, "options": {"temperature": 0.01, "num_predict": 16, "stop": CONTINUE_STOPS}})
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines[-1]["done"] is True and all(not line["done"] for line in lines[:-1])


def test_tabby_completion_stream(server):
    import tomllib

    cfg = tomllib.loads((ROOT / "tabby-config.toml").read_text())["model"]["completion"]["http"]
    url = cfg["api_endpoint"].replace("http://127.0.0.1:11435", server.url) + "/completions"
    body = {"model": cfg["model_name"], "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 64, "temperature": 0.1,
            "stream": True, "presence_penalty": 0.0}
    with httpx.stream("POST", url, json=body, headers={"Authorization": f"Bearer {cfg['api_key']}"}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = sse_events(raw)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "text" in events[-1]["choices"][0]
    assert all(c["index"] == 0 and (c["finish_reason"] is None) == (e is not events[-1]) for e in events for c in e["choices"])


def test_zed_chat_and_edit_prediction(server):
    cfg = json.loads((ROOT / "zed-settings.json").read_text())["language_models"]["openai_compatible"]["codellm"]
    base = cfg["api_url"].replace("http://127.0.0.1:11435", server.url)
    model = cfg["available_models"][0]["name"]
    raw = httpx.post(base + "/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_completion_tokens": 8,
        "stream_options": {"include_usage": True}}).text
    events = sse_events(raw)
    assert all("choices" in e and isinstance(e["created"], int) for e in events)
    assert all(c["finish_reason"] is None for e in events[:-2] for c in e["choices"])
    r = httpx.post(base + "/completions", json={"model": model, "prompt": PREFIX, "max_tokens": 8, "stream": False}).json()
    assert {"id", "object", "created", "model", "usage"} <= set(r) and isinstance(r["created"], int)


def test_llama_vim_infill_with_repository_context(server):
    import re

    body = {"input_prefix": "import math\n\n", "input_suffix": SUFFIX, "prompt": "def fibonacci(n):\n    ",
            "input_extra": [{"filename": "util.py", "text": "def add(a, b):\n    return a + b\n"}],
            "n_predict": 16, "top_k": 40, "top_p": 0.99, "stream": False, "samplers": ["top_k", "top_p", "infill"],
            "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1000}
    raw = httpx.post(server.url + "/infill", json=body).text
    assert re.search(r'"content":"', raw)  # llama.vim's own check: compact JSON
    r = json.loads(raw)
    assert r["stop"] is True and r["tokens_predicted"] > 0 and "timings" in r and r["tokens_evaluated"] > 20
    warm = httpx.post(server.url + "/infill", json={**body, "n_predict": 0}).json()  # warm-up
    assert warm["content"] == "" and warm["tokens_predicted"] == 0
    without = httpx.post(server.url + "/infill", json={**body, "input_extra": []}).json()
    assert without["tokens_evaluated"] < r["tokens_evaluated"]  # the repository context went into the prompt


def test_llm_ls_and_mistral_fim_and_cline(server, client):
    r = httpx.post(server.url + "/v1/completions", json={
        "model": "qwen2.5-coder:1.5b-base", "prompt": f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>",
        "max_tokens": 20, "temperature": 0.2, "top_p": 0.95, "stream": False}).json()
    assert isinstance(r["choices"][0]["text"], str)
    fim = httpx.post(server.url + "/v1/fim/completions", json={
        "model": "qwen2.5-coder:1.5b", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 12, "temperature": 0}).json()
    assert fim["choices"][0]["message"]["role"] == "assistant" and fim["usage"]["completion_tokens"] > 0
    raw = httpx.post(server.url + "/v1/fim/completions", json={
        "model": "qwen2.5-coder:1.5b", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 12, "stream": True}).text
    assert "".join(e["choices"][0]["delta"]["content"] for e in sse_events(raw) if e["choices"]) == \
        fim["choices"][0]["message"]["content"]
    cline = json.loads((ROOT / "cline.json").read_text())
    oa = openai.OpenAI(base_url=cline["openAiBaseUrl"].replace("http://127.0.0.1:11435", server.url),
                       api_key=cline["openAiApiKey"], max_retries=0)
    chunks = list(oa.chat.completions.create(model=cline["openAiModelId"], messages=[{"role": "user", "content": "hi"}],
                                             stream=True, stream_options={"include_usage": True}, max_tokens=6))
    assert chunks[-1].usage.total_tokens > 0


def test_keystroke_aborts_leave_nothing_running(server):
    """Continue aborts its autocomplete request on nearly every keystroke: 50 of them, each after one chunk."""
    def health():
        return httpx.get(server.url + "/health").json()["models"]["qwen2.5-coder-tools:latest"]

    before = health()["cancelled"]
    body = {"model": MODEL, "prompt": f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>", "stream": True,
            "temperature": 0.01, "max_tokens": 4096, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        for _ in range(50):
            with http.stream("POST", server.url + "/v1/completions", json=body) as resp:
                lines = resp.iter_lines()
                next(lines)
    deadline = time.time() + 120  # a busy machine cancels slowly; the wait only guards a hang
    while time.time() < deadline and (health()["active"] or health()["queued"]):
        time.sleep(0.05)
    info = health()
    assert info["active"] == 0 and info["queued"] == 0
    assert info["cancelled"] == before + 50


def test_tool_choice_required_or_named_forces_a_call(server, client):
    """``tool_choice`` "required" or a named function: the answer is a call of it (its arguments a JSON object,
    constrained), even for a message the model would answer in prose; streamed as tool-call deltas too."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                           tools=[WEATHER_TOOL], tool_choice=choice, max_tokens=100)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c
        assert c.message.tool_calls[0].function.name == "get_weather"
        assert isinstance(json.loads(c.message.tool_calls[0].function.arguments), dict)
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                        tools=[WEATHER_TOOL], tool_choice=named, max_tokens=100) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.tool_calls[0].function.name == "get_weather"
    url, messages = server.url + "/v1/chat/completions", [{"role": "user", "content": "x"}]
    bad = httpx.post(url, json={"model": MODEL, "messages": messages, "tools": [WEATHER_TOOL],
                                "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"
    bad = httpx.post(url, json={"model": MODEL, "messages": messages, "tool_choice": "required"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"


CITY_TOOL = {"type": "function", "function": {
    "name": "forecast", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}


def test_structured_outputs_hold_their_schema(server, client):
    """Forced tool calls, ``response_format: json_schema`` (the SDK's ``parse`` with a pydantic model) and Ollama's
    ``format`` schema: the output is JSON that satisfies the schema, sampled or greedy; a schema the grammar engine
    cannot enforce is refused with a 400 in each API's shape."""
    import pydantic

    for seed in (1, 2, 3):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                           tools=[CITY_TOOL], tool_choice={"type": "function", "function": {"name": "forecast"}},
                                           max_tokens=60, temperature=1.0, seed=seed)
        call = r.choices[0].message.tool_calls[0]
        args = json.loads(call.function.arguments)
        assert call.function.name == "forecast" and set(args) == {"city", "days"}, args
        assert args["city"] in ("Paris", "Oslo", "Lima") and isinstance(args["days"], int) and 1 <= args["days"] <= 7

    class Stack(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        name: str = pydantic.Field(max_length=12)
        depth: int
        ok: bool

    for seed in (1, 2):
        parsed = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Describe a stack."}],
                                               response_format=Stack, max_tokens=80, temperature=0.9, seed=seed)
        message = parsed.choices[0].message
        assert parsed.choices[0].finish_reason == "stop" and isinstance(message.parsed, Stack), message.content
        assert len(message.parsed.name) <= 12

    schema = {"type": "object", "additionalProperties": False, "required": ["lang", "lines"],
              "properties": {"lang": {"type": "string", "enum": ["python", "go"]}, "lines": {"type": "integer"}}}
    answer = ollama.Client(host=server.url).chat(model=MODEL, messages=[{"role": "user", "content": "Which language?"}],
                                                 format=schema, options={"temperature": 0.8, "seed": 3, "num_predict": 60})
    data = json.loads(answer.message.content)
    assert set(data) == {"lang", "lines"} and data["lang"] in ("python", "go") and isinstance(data["lines"], int)

    unsupported = {"type": "object", "properties": {"when": {"type": "string", "format": "no-such-format"}}}
    bad = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": unsupported, "strict": True}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    assert "unsupported JSON schema" in bad.json()["error"]["message"]
    bad = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    bad = httpx.post(server.url + "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                     "format": {"$ref": "http://evil.example/schema.json"}, "stream": False})
    assert bad.status_code == 400 and "unsupported JSON schema" in bad.json()["error"]
