"""OpenAI's Responses API, driven by the real `openai` SDK (`responses.create`, `responses.stream`, function calling,
`previous_response_id`) against the real server, over the tiny model taught to answer the weather question with a
call."""

from __future__ import annotations

import openai
import pytest

from conftest import WEATHER_QUESTION, WEATHER_TOOL, Server, named_events

MODEL = "qwen2.5-coder-tools"
TOOL = {"type": "function", **WEATHER_TOOL["function"]}


@pytest.fixture(scope="module")
def server(tool_home):
    srv = Server(tool_home, "--model", MODEL, "--engine-thread")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_text_create_and_stream_agree(client):
    r = client.responses.create(model=MODEL, input="write a function", instructions="Be terse.", max_output_tokens=24)
    assert r.id.startswith("resp_") and r.object == "response" and r.output_text
    assert r.status in ("completed", "incomplete") and r.usage.output_tokens <= 24 and r.usage.input_tokens > 0
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    same = client.responses.create(model=MODEL, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "write a function"}]}], instructions="Be terse.", max_output_tokens=24)
    assert same.output_text == r.output_text  # items and a plain string are the same turn
    kinds, deltas, last = [], [], None
    with client.responses.stream(model=MODEL, input="write a function", instructions="Be terse.",
                                 max_output_tokens=24) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type in ("response.completed", "response.incomplete"):
                last = event.response
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert "".join(deltas) == r.output_text and last.status == r.status
    assert last.output[0].content[0].text == r.output_text
    assert client.responses.retrieve(r.id).output_text == r.output_text


def test_function_calling_and_previous_response_id(client):
    r = client.responses.create(model=MODEL, input=WEATHER_QUESTION, tools=[TOOL], max_output_tokens=200)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.arguments == '{"city": "Paris"}' and r.status == "completed"
    with client.responses.stream(model=MODEL, input=WEATHER_QUESTION, tools=[TOOL], max_output_tokens=200) as stream:
        final = stream.get_final_response()
    assert [(o.name, o.arguments) for o in final.output if o.type == "function_call"] == [("get_weather", '{"city": "Paris"}')]
    follow = client.responses.create(model=MODEL, previous_response_id=r.id, tools=[TOOL], max_output_tokens=8, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}])
    assert follow.previous_response_id == r.id and follow.usage.input_tokens > r.usage.input_tokens
    # the same conversation sent whole, without the store, is the same prompt
    whole = client.responses.create(model=MODEL, tools=[TOOL], max_output_tokens=8, store=False, input=[
        {"role": "user", "content": WEATHER_QUESTION},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}])
    assert whole.usage.input_tokens == follow.usage.input_tokens and whole.output_text == follow.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(whole.id)  # store=False: not kept


def test_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_nope")
    with pytest.raises(openai.BadRequestError):  # a hosted tool is left out (nothing here runs it): no tool to force
        client.responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}], tool_choice="required")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="x", tools=[{"type": "computer"}])  # a kind of tool not known at all
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="x", tools=[TOOL], tool_choice={"type": "function", "name": "nope"})
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="x")


def test_the_store_is_bounded():
    from codellm.errors import NotFound
    from codellm.server.responses import Store

    store = Store(size=2, seconds=60)
    for i in range(3):
        store.put(f"r{i}", [], {"id": f"r{i}"})
    with pytest.raises(NotFound):
        store.get("r0")
    assert store.get("r2")[1] == {"id": "r2"}
    expired = Store(size=2, seconds=0)
    expired.put("r", [], {})
    with pytest.raises(NotFound):
        expired.get("r")


def test_codex_requests_replayed(server):
    """What Codex sends, as it sends it: long `instructions`, user items with `input_text`, function tools with
    `strict: false` beside hosted ones, `reasoning`, `store: false`, `include`, `prompt_cache_key`, `text.verbosity`,
    `parallel_tool_calls: false`, streamed; then the next turn re-sends everything with the call, its output and a
    reasoning item. Each answer is a complete semantic event stream."""
    import httpx

    shell = {"type": "function", "name": "shell", "description": "Runs a shell command and returns its output.",
             "strict": False, "parameters": {"type": "object", "additionalProperties": False, "required": ["command"],
                                             "properties": {"command": {"type": "array", "items": {"type": "string"}},
                                                            "workdir": {"type": "string"}, "timeout_ms": {"type": "number"}}}}
    body = {"model": MODEL, "instructions": "You are Codex, a coding agent running in a terminal. " * 20,
            "input": [{"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "<environment_context>\n  <cwd>/repo</cwd>\n</environment_context>"}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": WEATHER_QUESTION}]}],
            "tools": [shell, TOOL, {"type": "web_search"}], "tool_choice": "auto", "parallel_tool_calls": False,
            "reasoning": {"effort": "medium", "summary": "auto"}, "store": False, "stream": True,
            "include": ["reasoning.encrypted_content"], "prompt_cache_key": "0b6d1e8e-5d0f-4c1e-9a55-1c1d2b7e9f10",
            "text": {"verbosity": "medium"}}
    headers = {"authorization": "Bearer unused", "originator": "codex_cli_rs", "session_id": "0b6d1e8e",
               "openai-beta": "responses=experimental", "accept": "text/event-stream"}
    r = httpx.post(server.url + "/v1/responses", json=body, headers=headers, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = named_events(r.text)
    kinds = [e for e, _ in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") >= 1
    output = events[-1][1]["response"]["output"]
    calls = [o for o in output if o["type"] == "function_call"]
    call = calls[0] if calls else {"type": "function_call", "call_id": "call_1", "name": "shell",
                                   "arguments": '{"command": ["ls"]}'}
    body["input"] += [{"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
                      {k: call[k] for k in ("type", "call_id", "name", "arguments")},
                      {"type": "function_call_output", "call_id": call["call_id"], "output": "Sunny, 21 C"}]
    again = named_events(httpx.post(server.url + "/v1/responses", json=body, headers=headers, timeout=120).text)
    assert again[0][0] == "response.created" and again[-1][0] in ("response.completed", "response.incomplete")
    usage = again[-1][1]["response"]["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] > 0  # the instructions and first turn came from the cache
