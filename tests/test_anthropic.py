"""Anthropic's Messages API, driven by the real `anthropic` SDK against the real server (sync, async, streaming,
a tools round trip, count_tokens, errors), over the tiny model taught to answer the weather question with a call."""

from __future__ import annotations

import asyncio
import json

import anthropic
import httpx
import pytest

from conftest import WEATHER_QUESTION, WEATHER_TOOL, Server, named_events

KEY = "sk-ant-test"
MODEL = "qwen2.5-coder-tools"
TOOL = {"name": WEATHER_TOOL["function"]["name"], "description": WEATHER_TOOL["function"]["description"],
        "input_schema": WEATHER_TOOL["function"]["parameters"]}


@pytest.fixture(scope="module")
def server(tool_home):
    srv = Server(tool_home, "--model", MODEL, "--engine-thread", api_key=KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


def ask(client, content="write a function", **kw):
    kw.setdefault("max_tokens", 24)
    return client.messages.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)



def prompt_tokens(usage) -> int:
    """The whole prompt: Anthropic counts tokens read from the cache apart from input_tokens."""
    return usage.input_tokens + usage.cache_read_input_tokens

def test_create_sync_async_and_stream_agree(client, server):
    m = ask(client, system="You are terse.")
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.stop_reason in ("end_turn", "max_tokens") and m.content[0].type == "text" and m.content[0].text
    assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 24
    blocks = ask(client, system=[{"type": "text", "text": "You are terse."}])  # system as blocks: the same prompt
    assert blocks.content[0].text == m.content[0].text and prompt_tokens(blocks.usage) == prompt_tokens(m.usage)
    assert blocks.usage.cache_read_input_tokens >= 16  # the same prompt again: read from the prefix cache, counted apart

    async def async_ask():
        async with anthropic.AsyncAnthropic(base_url=server.url, api_key=KEY, max_retries=0) as aclient:
            return await aclient.messages.create(model=MODEL, max_tokens=24, system="You are terse.",
                                                 messages=[{"role": "user", "content": "write a function"}])
    assert asyncio.run(async_ask()).content[0].text == m.content[0].text

    with client.messages.stream(model=MODEL, max_tokens=24, system="You are terse.",
                                messages=[{"role": "user", "content": "write a function"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == m.content[0].text and final.stop_reason == m.stop_reason
    assert final.usage.output_tokens == m.usage.output_tokens


def test_the_event_stream_is_in_anthropics_order(server):
    body = {"model": MODEL, "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    events = []
    with httpx.stream("POST", server.url + "/v1/messages", json=body, headers={"x-api-key": KEY}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == name
                events.append(name)
    assert events[:2] == ["message_start", "ping"] and events[2] == "content_block_start"
    assert set(events[3:-3]) == {"content_block_delta"}
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_tools_round_trip(client):
    m = client.messages.create(model=MODEL, max_tokens=200, tools=[TOOL],
                               messages=[{"role": "user", "content": WEATHER_QUESTION}])
    assert m.stop_reason == "tool_use"
    (call,) = [b for b in m.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input == {"city": "Paris"} and call.id.startswith("toolu_")
    with client.messages.stream(model=MODEL, max_tokens=200, tools=[TOOL],
                                messages=[{"role": "user", "content": WEATHER_QUESTION}]) as stream:
        streamed = stream.get_final_message()
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [{"city": "Paris"}]
    follow = client.messages.create(model=MODEL, max_tokens=16, tools=[TOOL], messages=[
        {"role": "user", "content": WEATHER_QUESTION},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C and sunny"}]}])
    assert follow.type == "message" and prompt_tokens(follow.usage) > prompt_tokens(m.usage)
    counted = client.messages.count_tokens(model=MODEL, tools=[TOOL], messages=[{"role": "user", "content": WEATHER_QUESTION}])
    assert counted.input_tokens == prompt_tokens(m.usage)


def test_stop_sequences_and_tool_choice(client):
    text = ask(client, max_tokens=24).content[0].text
    stop = text[6:9]
    m = ask(client, max_tokens=24, stop_sequences=[stop])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop and stop not in m.content[0].text
    none = client.messages.create(model=MODEL, max_tokens=16, tools=[TOOL], tool_choice={"type": "none"},
                                  messages=[{"role": "user", "content": WEATHER_QUESTION}])
    assert all(b.type == "text" for b in none.content)
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model=MODEL, max_tokens=16, tools=[TOOL], tool_choice={"type": "tool", "name": "nope"},
                               messages=[{"role": "user", "content": WEATHER_QUESTION}])
    assert err.value.body["error"]["type"] == "invalid_request_error"


def test_errors_have_anthropics_shape(client, server):
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="nope", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert err.value.body == {"type": "error", "error": {"type": "not_found_error", "message": err.value.body["error"]["message"]}}
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "x"}],
                               extra_body={"temperature": 3})
    assert "temperature" in err.value.body["error"]["message"]
    missing = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY},  # max_tokens is required here
                         json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert missing.status_code == 400 and missing.json()["type"] == "error" and "max_tokens" in missing.text
    with pytest.raises(anthropic.AuthenticationError) as err:
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["error"]["type"] == "authentication_error"
    bearer = httpx.post(server.url + "/v1/messages", headers={"Authorization": f"Bearer {KEY}"},
                        json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]})
    assert bearer.status_code == 200
    image = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY}, json={
        "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]})
    assert image.status_code == 400 and "image" in image.json()["error"]["message"]


def test_claude_code_requests_replayed(server):
    """What Claude Code sends, as it sends it: `?beta=true`, `anthropic-beta` and `anthropic-version` headers, the
    key as x-api-key, system blocks and message blocks with `cache_control`, `metadata.user_id`, tools with a
    `$schema` in their input schema beside a server tool, `thinking` enabled, `max_tokens` far past the context,
    `temperature` 1, streamed; then the tool result goes back and count_tokens is asked. Each answer is a complete
    Anthropic event stream."""
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json",
               "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14",
               "user-agent": "claude-cli/2.0.0 (external, cli)", "x-app": "cli"}
    schema = {**TOOL["input_schema"], "$schema": "http://json-schema.org/draft-07/schema#"}
    body = {
        "model": MODEL, "max_tokens": 32000, "temperature": 1, "stream": True,
        "metadata": {"user_id": "user_abc_account__session_123"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "system": [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                    "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "You are an interactive CLI tool that helps users with software "
                                            "engineering tasks.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>\nAs you answer, use the tools.\n</system-reminder>"},
            {"type": "text", "text": WEATHER_QUESTION, "cache_control": {"type": "ephemeral"}}]}],
        "tools": [{"name": TOOL["name"], "description": TOOL["description"], "input_schema": schema},
                  {"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
    }
    url = server.url + "/v1/messages?beta=true"
    r = httpx.post(url, json=body, headers=headers, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = named_events(r.text)
    kinds = [e for e, _ in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") >= 1
    uses = [d["content_block"] for e, d in events if e == "content_block_start" and d["content_block"]["type"] == "tool_use"]
    final = next(d for e, d in events if e == "message_delta")
    assert final["delta"]["stop_reason"] in ("tool_use", "end_turn")  # (under this prompt the tiny model may not call)
    args = "".join(d["delta"]["partial_json"] for e, d in events
                   if e == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
    if uses:
        assert final["delta"]["stop_reason"] == "tool_use" and uses[0]["name"] == TOOL["name"]
        assert isinstance(json.loads(args), dict)
    else:  # the history Claude Code would send after a call
        uses, args = [{"id": "toolu_01A09q90qw90lq917835lq9", "name": TOOL["name"]}], '{"city": "Paris"}'

    body["messages"] += [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "", "signature": "sig"},
                                          {"type": "tool_use", "id": uses[0]["id"], "name": uses[0]["name"],
                                           "input": json.loads(args)}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0]["id"],
                                      "content": [{"type": "text", "text": "Sunny, 21 C"}],
                                      "cache_control": {"type": "ephemeral"}}]}]
    again = named_events(httpx.post(url, json=body, headers=headers, timeout=120).text)
    assert again[0][0] == "message_start" and again[-1][0] == "message_stop"
    delta = next(d for e, d in again if e == "message_delta")
    assert delta["usage"]["cache_read_input_tokens"] > 0  # the first turn's prefix was reused
    counted = httpx.post(server.url + "/v1/messages/count_tokens?beta=true", headers=headers, json={
        k: body[k] for k in ("model", "system", "messages", "tools")})
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0
