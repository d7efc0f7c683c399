"""Running codellm for a team: named API keys from a file, request ids and JSON logs, body size limits, and a
graceful drain on SIGTERM. Real servers on loopback, real clients."""

from __future__ import annotations

import json
import signal
import threading
import time

import anthropic
import httpx
import openai
import pytest

from conftest import Server, run_cli

BODY = {"model": "tiny-coder", "messages": [{"role": "user", "content": "write a function"}], "max_tokens": 4}


def access_lines(srv: Server) -> list[dict]:
    """The server's JSON log lines from codellm.access."""
    srv.log.flush()
    lines = []
    for line in (srv.log_path).read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["logger"] == "codellm.access":
                lines.append(entry)
    return lines


def wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_named_keys_from_a_file_request_ids_and_json_logs(served_home, tmp_path):
    """Several keys, each named; the logs name the key that opened each request (never the key) and carry its
    request id, which comes back as x-request-id (the client's own when it sent a sane one). Editing the file
    adds and revokes keys without a restart; a broken edit keeps the keys read before."""
    keyfile = tmp_path / "keys"
    keyfile.write_text("# team keys\nalice sk-alice-0123456789\nci-bot sk-robot-0123456789\n")
    keyfile.chmod(0o600)
    srv = Server(served_home, "--slots", "4", "--model", "tiny-coder", "--api-key-file", str(keyfile),
                 "--log-format", "json", "--log-level", "info")
    try:
        url = srv.url + "/v1/chat/completions"
        for key in ("sk-alice-0123456789", "sk-robot-0123456789"):
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)
            assert client.chat.completions.create(**BODY).choices[0].message.content is not None
        assert httpx.post(url, json=BODY, headers={"Authorization": "Bearer sk-alice-01234567"}).status_code == 401
        assert httpx.post(url, json=BODY).status_code == 401
        # Anthropic's clients send x-api-key
        ac = anthropic.Anthropic(base_url=srv.url, api_key="sk-robot-0123456789", max_retries=0)
        assert ac.messages.create(model="tiny-coder", max_tokens=4, messages=[{"role": "user", "content": "x"}]).content
        r = httpx.post(url, json=BODY, headers={"Authorization": "Bearer sk-alice-0123456789",
                                               "x-request-id": "trace-42/abc"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42/abc"
        made = httpx.post(url, json=BODY, headers={"Authorization": "Bearer sk-alice-0123456789",
                                                  "x-request-id": "bad id\twith spaces"})
        assert made.headers["x-request-id"] != "bad id\twith spaces" and len(made.headers["x-request-id"]) == 32
        refused = httpx.post(url, json=BODY)
        assert refused.headers["x-request-id"]  # refusals have ids too
        lines = wait_for(lambda: [e for e in access_lines(srv) if e.get("request_id") == made.headers["x-request-id"]])
        entry = lines[0]
        assert entry["key"] == "alice" and entry["status"] == 200 and entry["path"] == "/v1/chat/completions"
        assert entry["method"] == "POST" and entry["duration_ms"] > 0 and entry["level"] == "info"
        logged = srv.log_path.read_text()
        assert "sk-alice" not in logged and "sk-robot" not in logged
        assert any(e.get("key") == "ci-bot" and e["path"] == "/v1/messages" for e in access_lines(srv))
        assert any(e["request_id"] == "trace-42/abc" for e in access_lines(srv))
        assert any(e["status"] == 401 and "key" not in e for e in access_lines(srv))
        # revoke alice, add carol: no restart
        time.sleep(0.01)
        keyfile.write_text("ci-bot sk-robot-0123456789\ncarol sk-carol-0123456789\n")
        assert httpx.post(url, json=BODY, headers={"Authorization": "Bearer sk-alice-0123456789"}).status_code == 401
        assert httpx.post(url, json=BODY, headers={"Authorization": "Bearer sk-carol-0123456789"}).status_code == 200
        keyfile.write_text("carol\tsk-carol-0123456789 extra words\n")  # broken: the keys before stay
        assert httpx.post(url, json=BODY, headers={"Authorization": "Bearer sk-carol-0123456789"}).status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200  # public
    finally:
        srv.stop()
    keyfile.write_text("alice short\n")
    bad = run_cli("serve", "--api-key-file", str(keyfile), env={"CODELLM_HOME": str(served_home)})
    assert bad.returncode == 2 and "line 1" in bad.stderr and "short" not in bad.stderr.replace("shorter", "")


def test_body_size_limit_in_each_api_shape(served_home):
    """A body past --max-body-size is a 413 in its API's shape, with or without Content-Length, and the server
    goes on serving."""
    srv = Server(served_home, "--slots", "4", "--model", "tiny-coder", "--max-body-size", "256KB")
    try:
        big = "x " * 200_000
        r = httpx.post(srv.url + "/v1/chat/completions", json={**BODY, "messages": [{"role": "user", "content": big}]})
        assert r.status_code == 413 and r.json()["error"]["message"]
        r = httpx.post(srv.url + "/api/chat", json={"model": "tiny-coder", "messages": [{"role": "user", "content": big}]})
        assert r.status_code == 413 and isinstance(r.json()["error"], str)
        ac = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as err:
            ac.messages.create(model="tiny-coder", max_tokens=4, messages=[{"role": "user", "content": big}])
        assert err.value.status_code == 413 and err.value.body["error"]["type"] == "request_too_large"

        def chunks():  # no Content-Length: the limit holds while reading
            yield b'{"model": "tiny-coder", "messages": [{"role": "user", "content": "'
            for _ in range(64):
                yield b"y" * 8192
            yield b'"}]}'
        r = httpx.post(srv.url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        assert client.chat.completions.create(**BODY).choices[0].finish_reason in ("stop", "length")
    finally:
        srv.stop()


def _stream(srv: Server, tokens: int, got: list, done: threading.Event) -> None:
    """A long stream, read slowly to its end (or cut) in a thread, so that it lasts seconds however fast the machine:
    with 20 logprobs a token the answer is megabytes, more than the sockets buffer, so the server's sends wait for
    the slow reader and the request stays in flight; what arrived goes to ``got``."""
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        for chunk in client.chat.completions.create(**{**BODY, "max_tokens": tokens}, stream=True, logprobs=True,
                                                    top_logprobs=20, extra_body={"ignore_eos": True}):
            got.append(chunk)
            time.sleep(0.004)
    except Exception as exc:  # a cut stream
        got.append(exc)
    finally:
        done.set()


def test_sigterm_drains_streams_and_refuses_new_requests(served_home):
    """On SIGTERM: /health says draining with a 503 (readiness fails), a new request gets a 503 in its API's shape
    with Retry-After, the stream in flight runs to its end, and then the server exits by itself."""
    srv = Server(served_home, "--slots", "2", "--num-ctx", "2048", "--model", "tiny-coder", "--drain-timeout", "300")
    try:
        client, resp, lines = _stalled(srv)
        srv.proc.send_signal(signal.SIGTERM)
        health = wait_for(lambda: (r := httpx.get(srv.url + "/health")).status_code == 503 and r)
        assert health.json()["status"] == "draining"
        r = httpx.post(srv.url + "/v1/chat/completions", json=BODY)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "server_error"
        o = httpx.post(srv.url + "/api/generate", json={"model": "tiny-coder", "prompt": "x", "stream": False})
        assert o.status_code == 503 and isinstance(o.json()["error"], str)
        assert srv.proc.poll() is None  # still draining: the stream is not done
        rest = [line for line in _rest(lines) if line]  # read on: the stream runs to its end
        assert rest[-1] == "data: [DONE]"
        finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest
                    if line.startswith("data: {") and '"finish_reason":"length"' in line.replace(" ", "")]
        assert finishes == ["length", "length"]
        resp.close()
        client.close()
        srv.proc.wait(60)
    finally:
        srv.stop()


def _stalled(srv: Server):
    """A stream the client stops reading after its first line: two choices of 2,000 tokens with 20 logprobs each are
    several megabytes, more than the sockets hold, so the server's sends wait and the request stays in flight."""
    body = {**BODY, "max_tokens": 2000, "n": 2, "stream": True, "logprobs": True, "top_logprobs": 20,
            "ignore_eos": True}
    client = httpx.Client(timeout=120)
    resp = client.send(client.build_request("POST", srv.url + "/v1/chat/completions", json=body), stream=True)
    lines = resp.iter_lines()
    assert next(lines).startswith("data: ")
    return client, resp, lines


def _rest(lines) -> list[str]:
    try:
        return list(lines)
    except httpx.HTTPError:  # cut
        return []


def test_drain_deadline_cuts_what_is_left(served_home):
    """Past --drain-timeout the server exits anyway, cutting the stream still running; a second signal stops it
    at once."""
    for drain, signals in (("1", 1), ("300", 2)):
        srv = Server(served_home, "--slots", "2", "--num-ctx", "2048", "--model", "tiny-coder", "--drain-timeout", drain)
        try:
            client, resp, lines = _stalled(srv)
            srv.proc.send_signal(signal.SIGTERM)
            if signals == 2:
                wait_for(lambda: httpx.get(srv.url + "/health").status_code == 503)
                srv.proc.send_signal(signal.SIGTERM)
            srv.proc.wait(60)  # while the client still reads nothing
            assert "data: [DONE]" not in _rest(lines)
            resp.close()
            client.close()
        finally:
            srv.stop()


def test_refusals_and_health_do_not_wait_for_a_busy_engine(served_home, placement="--engine-thread"):
    """With every row busy and the queue full, a 429 (503 for Ollama's routes) and /health are answered while the
    work in the engine goes on: they wait for nothing the engine holds. The engine is a thread of the server here,
    where it competes with the event loop for the GIL and the cores. (Their latency is a figure for benchmarks, not a
    timed assertion.)"""
    srv = Server(served_home, "--slots", "1", "--max-queue", "2", "--num-ctx", "2048", "--model", "tiny-coder", placement)
    try:
        got, done = [], threading.Event()
        threading.Thread(target=_stream, args=(srv, 1800, got, done), daemon=True).start()
        wait_for(lambda: got)
        queued = threading.Event()

        def wait_in_queue() -> None:
            try:
                httpx.post(srv.url + "/v1/chat/completions", timeout=300, json={**BODY, "max_tokens": 1800,
                                                                                 "ignore_eos": True})
                queued.set()
            except httpx.HTTPError:  # the server stopped at the end of the test
                pass
        threading.Thread(target=wait_in_queue, daemon=True).start()
        wait_for(lambda: httpx.get(srv.url + "/health").json()["models"]["tiny-coder:latest"]["queued"] == 2)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for _ in range(20):
                r = c.post("/v1/chat/completions", json=BODY)
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                o = c.post("/api/generate", json={"model": "tiny-coder", "prompt": "x", "stream": False})
                assert o.status_code == 503 and "busy" in o.json()["error"]
                h = c.get("/health")
                assert h.status_code == 200 and h.json()["models"]["tiny-coder:latest"]["active"] == 1
        assert not done.is_set() and not queued.is_set()  # all of it while the engine was busy
    finally:
        srv.stop()


def _tree(home) -> dict[str, tuple]:
    return {str(p.relative_to(home)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.lstat().st_mtime_ns)
            for p in sorted(home.rglob("*"))}


def test_read_only_registry_serves_and_writes_nothing(tiny_dir, tmp_path):
    """A serving replica over a shared registry volume (--read-only): it loads and serves models, in this process
    or an engine process, and writes nothing under the registry, not a lock, a link directory or a hash record;
    every route that would write is a 403 in its API's shape. With no model to serve it says why and stops."""
    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    home = tmp_path / "shared"
    reg = Registry(home)
    create(reg, "tiny-coder", Modelfile(from_=str(tiny_dir), parameters={"temperature": 0.0}))
    reg.copy("tiny-coder", "other-coder")
    before = _tree(home)
    logs = tmp_path / "logs"
    logs.mkdir()
    srv = Server(logs, "--read-only", "--model", "tiny-coder", "--engine-process", env={"CODELLM_HOME": str(home)})
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        assert client.chat.completions.create(**BODY).choices[0].message.content is not None
        # another model, loaded on first use in the engine process's sibling (a thread here would do the same)
        r = httpx.post(srv.url + "/api/generate", timeout=120, json={"model": "other-coder", "prompt": "x",
                                                                     "stream": False, "options": {"num_predict": 2}})
        assert r.status_code == 200
        assert {m["name"] for m in httpx.get(srv.url + "/api/tags").json()["models"]} >= {"tiny-coder:latest"}
        assert httpx.post(srv.url + "/api/show", json={"model": "tiny-coder"}).status_code == 200
        for path, body in (("/api/pull", {"model": "qwen2.5-coder:0.5b", "stream": False}),
                           ("/api/copy", {"source": "tiny-coder", "destination": "copied"}),
                           ("/api/create", {"model": "made", "from": "tiny-coder", "stream": False})):
            r = httpx.post(srv.url + path, json=body, timeout=60)
            assert r.status_code == 403 and "read-only" in r.json()["error"], (path, r.text)
        r = httpx.request("DELETE", srv.url + "/api/delete", json={"model": "other-coder"})
        assert r.status_code == 403 and "read-only" in r.json()["error"]
        digest = "sha256:" + "0" * 64
        r = httpx.post(srv.url + f"/api/blobs/{digest}", content=b"x", headers={"content-type": "application/octet-stream"})
        assert r.status_code == 403
    finally:
        srv.stop()
    assert _tree(home) == before
    empty = tmp_path / "empty"
    r = run_cli("serve", "--read-only", env={"CODELLM_HOME": str(empty)})
    assert r.returncode != 0 and "read-only" in r.stderr and not empty.exists()


def test_serve_announces_the_bound_port_only_once_listening(served_home):
    """`serve --port 0` says where it listens once the socket is bound, with the port the system picked; a second
    server on that port fails with the bind error and announces nothing."""
    import os
    import re
    import subprocess
    import sys

    env = {**os.environ, "CODELLM_HOME": str(served_home)}
    cmd = [sys.executable, "-m", "codellm.cli.main", "serve", "--log-level", "warning", "--port"]
    first = subprocess.Popen(cmd + ["0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in first.stderr:  # read until the announcement (or the end, should it exit)
            found = re.search(r"serving on http://127\.0\.0\.1:(\d+) ", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "no announcement"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200  # bound before it said so
        second = run_cli("serve", "--port", str(port), env={"CODELLM_HOME": str(served_home)}, timeout=300)
        assert second.returncode != 0 and "address already in use" in second.stderr.lower()
        assert "serving on" not in second.stderr
    finally:
        first.terminate()
        first.wait(60)
