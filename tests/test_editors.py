"""What editor plugins and agent tools send, replayed against the real server: tool calling first."""

from __future__ import annotations

import json

import httpx
import ollama
import openai
import pytest

from conftest import WEATHER_QUESTION, WEATHER_TOOL, Server

MODEL = "qwen2.5-coder-tools"


@pytest.fixture(scope="module")
def server(tool_home):
    srv = Server(tool_home, "--model", MODEL, api_key="sk-editor")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-editor", max_retries=0)


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
    client = ollama.Client(host=server.url, headers={"Authorization": "Bearer sk-editor"})
    assert client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3}).done
