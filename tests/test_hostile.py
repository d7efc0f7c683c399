"""Hostile and careless input: each bad request gets a clear error in its API's shape, and nobody else notices.

A real server on loopback (engine in a thread), real clients; the victims are real streams whose text must come
out exactly as it does alone.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from conftest import Server

VICTIM = {"model": "tiny-coder", "messages": [{"role": "user", "content": "write a function"}], "max_tokens": 160,
          "stream": True, "ignore_eos": True}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(served_home):
    srv = Server(served_home, "--slots", "8", "--num-ctx", "256", "--model", "tiny-coder", "--engine-thread")
    yield srv
    srv.stop()


def stream_text(url: str, body: dict, started: threading.Event | None = None) -> tuple[str, str | None]:
    """The whole text of a streamed chat completion and its finish reason."""
    text, finish = [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
            if started is not None and any(text):
                started.set()
    return "".join(text), finish


POISONS = [  # (route, body, shape) that reached the sampler or the model unchecked and failed its whole batch
    ("/api/generate", {"model": "tiny-coder", "prompt": "x", "options": {"temperature": "0.5"}}, "ollama"),
    ("/api/generate", {"model": "tiny-coder", "prompt": "x", "options": {"top_p": "high"}}, "ollama"),
    ("/api/generate", {"model": "tiny-coder", "prompt": "x", "options": {"repeat_penalty": 0}}, "ollama"),
    ("/api/generate", {"model": "tiny-coder", "prompt": "x", "options": {"min_p": 5}}, "ollama"),
    ("/api/generate", {"model": "tiny-coder", "prompt": "x", "options": {"top_p": -1}}, "ollama"),
    ("/api/generate", {"model": "tiny-coder", "prompt": "x", "options": {"seed": 2 ** 70}}, "ollama"),
    ("/api/generate", {"model": "tiny-coder", "prompt": "x", "options": {"stop": [1, 2]}}, "ollama"),
    ("/api/generate", {"model": "tiny-coder", "prompt": "x", "context": [-5, 3]}, "ollama"),
    ("/api/generate", {"model": "tiny-coder", "prompt": "x", "context": [10 ** 9]}, "ollama"),
    ("/api/chat", {"model": "tiny-coder", "messages": [{"role": "user", "content": "x"}],
                   "options": {"temperature": 1e308}}, "ollama"),
    ("/infill", {"model": "tiny-coder", "input_prefix": "def f(", "input_suffix": ")", "min_p": 5}, "openai"),
    ("/infill", {"model": "tiny-coder", "input_prefix": "def f(", "input_suffix": ")", "top_p": -1}, "openai"),
    ("/infill", {"model": "tiny-coder", "input_prefix": "def f(", "seed": 2 ** 64}, "openai"),
    ("/v1/chat/completions", {"model": "tiny-coder", "messages": [{"role": "user", "content": "x"}], "seed": 2 ** 63},
     "openai"),
    ("/v1/completions", {"model": "tiny-coder", "prompt": "x", "seed": -(2 ** 63) - 1}, "openai"),
    ("/v1/fim/completions", {"model": "tiny-coder", "prompt": "x", "suffix": "y", "seed": 2 ** 64 + 1}, "openai"),
    ("/v1/completions", {"model": "tiny-coder", "prompt": [-1, 5]}, "openai"),
    ("/v1/chat/completions", {"model": "tiny-coder", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"function": 5}], "tool_choice": "required"}, "openai"),
]


def assert_shaped_400(resp: httpx.Response, shape: str) -> None:
    assert resp.status_code == 400, resp.text
    body = resp.json()
    if shape == "ollama":
        assert isinstance(body["error"], str) and body["error"]
    else:
        assert isinstance(body["error"]["message"], str) and body["error"]["type"] == "invalid_request_error"


def test_poison_beside_a_victim(server):
    alone, finish = stream_text(server.url, VICTIM)
    assert finish == "length" and alone
    started, result = threading.Event(), {}
    victim = threading.Thread(target=lambda: result.update(zip(("text", "finish"), stream_text(server.url, VICTIM, started))))
    victim.start()
    assert started.wait(60)
    for route, body, shape in POISONS:
        assert_shaped_400(httpx.post(server.url + route, json=body, timeout=30), shape)
    victim.join(120)
    assert result == {"text": alone, "finish": "length"}  # finished, and token for token what it writes alone
    info = server.health()["models"]["tiny-coder:latest"]
    assert info["active"] == 0


def test_engine_isolates_a_sequence_that_fails_in_its_step(served_home):
    """Defence in depth: a sequence that breaks the sampler past every check is aborted alone; the step loop and
    the other sequences in its batch go on."""
    from codellm.engine.loader import load
    from codellm.engine.sampling import SamplingParams
    from codellm.engine.core import Engine
    from codellm.registry import Registry

    lm = load(Registry(served_home), "tiny-coder")
    engine = Engine(lm, slots=4)
    try:
        outs: dict[str, list] = {"victim": [], "poison": [], "alone": []}
        done = {k: threading.Event() for k in outs}

        def sink(name):
            def put(out):
                outs[name].append(out)
                if out.finish_reason:
                    done[name].set()
            return put

        prompt = lm.tokenizer("def add(a, b):")["input_ids"]
        engine.submit(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), sink("alone"))
        assert done["alone"].wait(60)
        poison = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True)
        engine.submit(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), sink("victim"))
        engine.submit(prompt, poison, sink("poison"))
        poison.repetition_penalty, poison.repeat_last_n = 1.3, "x"  # past the checks: the sampler fails on this row
        assert done["victim"].wait(60) and done["poison"].wait(60)
        assert outs["poison"][-1].finish_reason == "error" and "TypeError" in outs["poison"][-1].error
        ids = lambda name: [t for o in outs[name] for t in o.token_ids]  # noqa: E731
        assert outs["victim"][-1].finish_reason == "length" and ids("victim") == ids("alone")
        assert engine.active() == 0 and engine.pending() == 0 and engine.alive
    finally:
        engine.shutdown()


BOMB = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def test_template_bombs_are_bounded(server):
    # a Go template from the request: Jinja syntax in it is text, rendered in one pass
    t0 = time.time()
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny-coder", "prompt": "hi", "template": BOMB + "{{ .Prompt }}",
                                                       "stream": False, "options": {"num_predict": 2}}, timeout=30)
    assert r.status_code == 200 and time.time() - t0 < 10
    # a chat TEMPLATE created by a client: rendered in the bounded sandbox while the server keeps answering
    for name, template in (("bomb-loop", BOMB), ("bomb-size", "{{ 'a' * 1000000000 }}"),
                           ("bomb-pad", "{{ 'a'.ljust(1000000000) }}"), ("bomb-grow", "{% set ns = namespace(s='ab') %}"
                            "{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}")):
        r = httpx.post(server.url + "/api/create", json={"model": name, "from": "tiny-coder", "template": template,
                                                         "stream": False}, timeout=30)
        assert r.status_code == 200, r.text
        answers: list[float] = []
        stop = threading.Event()

        def probe():
            while not stop.is_set():
                start = time.time()
                assert httpx.get(server.url + "/health", timeout=10).status_code == 200
                answers.append(time.time() - start)
                time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            t0 = time.time()
            chat = httpx.post(server.url + "/api/chat", json={"model": name, "messages": [{"role": "user", "content": "hi"}],
                                                               "stream": False}, timeout=60)
            openai_chat = httpx.post(server.url + "/v1/chat/completions", json={
                "model": name, "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
            took = time.time() - t0
        finally:
            stop.set()
            prober.join()
        assert chat.status_code == 400 and "template" in chat.json()["error"], chat.text
        assert openai_chat.status_code == 400 and "template" in openai_chat.json()["error"]["message"]
        assert took < 30 and answers and max(answers) < 5


def test_dns_rebinding_and_cross_site_requests(server, served_home):
    url = server.url
    for path, shape in (("/api/tags", "ollama"), ("/v1/models", "openai")):
        for host in ("evil.example", "evil.example:11435", "127.0.0.1.evil.example"):
            r = httpx.get(url + path, headers={"Host": host})
            assert r.status_code == 403
            assert ("host" in r.json()["error"]) if shape == "ollama" else r.json()["error"]["code"] == "forbidden"
    for host in ("localhost", f"127.0.0.1:{server.port}", "[::1]", f"localhost:{server.port}", "app.localhost"):
        assert httpx.get(url + "/api/tags", headers={"Host": host}).status_code == 200
    create = {"model": "evil-copy", "from": "tiny-coder", "stream": False}
    # a web page's no-preflight POST: text/plain with a foreign Origin, or a form
    r = httpx.post(url + "/api/create", content=json.dumps(create), headers={"Content-Type": "text/plain",
                                                                            "Origin": "http://evil.example"})
    assert r.status_code == 403
    r = httpx.post(url + "/api/copy", content=json.dumps({"source": "tiny-coder", "destination": "evil"}),
                   headers={"Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 415
    r = httpx.post(url + "/v1/chat/completions", content=json.dumps(VICTIM), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(url + "/api/copy", json={"source": "tiny-coder", "destination": "evil"},
                   headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    from codellm.registry import Registry

    assert not Registry(served_home).exists("evil") and not Registry(served_home).exists("evil-copy")
    # what does work: curl -d (form type, no browser headers), JSON from a page on localhost, editor webviews
    assert httpx.post(url + "/api/show", content=json.dumps({"model": "tiny-coder"}),
                      headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 200
    for origin in ("http://localhost:3000", "vscode-webview://abc"):
        assert httpx.post(url + "/api/show", json={"model": "tiny-coder"}, headers={"Origin": origin}).status_code == 200


def test_allowed_hosts_and_origins_are_configurable(served_home):
    srv = Server(served_home, "--allowed-hosts", "*.example.com,codellm.lan", "--cors-origin", "https://app.example.com")
    try:
        ok = lambda **h: httpx.get(srv.url + "/api/tags", headers=h).status_code  # noqa: E731
        assert ok(Host="codellm.lan") == 200 and ok(Host="a.example.com:8080") == 200 and ok(Host="evil.example") == 403
        assert ok(Origin="https://app.example.com") == 200 and ok(Origin="https://other.example.com") == 403
    finally:
        srv.stop()


def test_origin_policy_rules():
    from codellm.server.origins import Policy, check

    loop = Policy()
    assert check(loop, "GET", {"host": "evil.example"}, False)[0] == 403
    assert check(loop, "GET", {}, False)[0] == 403  # no Host at all
    assert check(loop, "GET", {"host": "127.0.0.2:80"}, False) is None
    network = Policy(bind="0.0.0.0")
    assert check(network, "GET", {"host": "gpu-box.lan"}, False) is None
    assert check(Policy(bind="0.0.0.0", allowed_hosts=("gpu-box.lan",)), "GET", {"host": "other"}, False)[0] == 403
    assert check(loop, "POST", {"host": "localhost", "content-type": "application/json; charset=utf-8"}, True) is None
    assert check(loop, "POST", {"host": "localhost", "content-type": "multipart/form-data; b=x"}, True)[0] == 415
    assert check(loop, "OPTIONS", {"host": "localhost", "origin": "http://evil.example"}, False) is None  # preflight


MALFORMED = [  # (method, route, body or raw bytes, shape)
    ("POST", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, "openai"),
    ("POST", "/api/chat", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "ollama"),
    ("POST", "/api/copy", {"source": ["tiny-coder"], "destination": "x"}, "ollama"),
    ("POST", "/api/copy", {"source": "tiny-coder", "destination": ["x"]}, "ollama"),
    ("POST", "/api/create", {"model": "m", "from": "tiny-coder", "messages": [{"role": "user"}, {"content": "x"}]},
     "ollama"),
    ("POST", "/api/show", {"model": 5}, "ollama"),
    ("DELETE", "/api/delete", {"model": {"a": 1}}, "ollama"),
    ("POST", "/api/pull", {"model": True}, "ollama"),
    ("POST", "/api/embed", {"model": "tiny-coder", "input": [1, 2]}, "ollama"),
    ("POST", "/api/show", {"model": "k\u212aelvin"}, "ollama"),  # KELVIN SIGN: not folded into 'kkelvin'
]


def test_malformed_bodies_are_400s(server):
    for method, route, body, shape in MALFORMED:
        kw = {"content": body, "headers": JSON} if isinstance(body, bytes) else {"json": body}
        r = httpx.request(method, server.url + route, timeout=30, **kw)
        if route == "/api/show" and "\u212a" in str(body):
            assert r.status_code in (400, 404) and "\u212a" in r.json()["error"]
            continue
        assert_shaped_400(r, shape)


WRONG = [5, -1, 1.5, "x", True, None, [], {}, [1], {"a": 1}, "9" * 400]


@pytest.mark.parametrize("route,base", [
    ("/api/generate", {"model": "tiny-coder", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}),
    ("/api/chat", {"model": "tiny-coder", "messages": [{"role": "user", "content": "hi"}], "stream": False,
                   "options": {"num_predict": 2}}),
])
def test_wrong_types_never_answer_5xx(server, route, base):
    fields = ["model", "prompt", "suffix", "system", "template", "raw", "context", "format", "options", "keep_alive",
              "stream", "messages", "tools", "images"]
    option_names = ["temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty", "repeat_last_n",
                    "presence_penalty", "frequency_penalty", "num_predict", "stop"]
    cases = [{**base, f: v} for f in fields for v in WRONG]
    cases += [{**base, "options": {**base["options"], o: v}} for o in option_names for v in WRONG]
    statuses = {}
    for body in cases:
        r = httpx.post(server.url + route, json=body, timeout=60)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert isinstance(r.json()["error"], str)
    assert statuses.get(400, 0) > 50
    assert server.health()["models"]["tiny-coder:latest"]["active"] == 0


def test_removed_model_leaves_the_server_consistent(served_home, tiny_dir):
    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    reg = Registry(served_home)
    create(reg, "doomed", Modelfile(from_="tiny-coder"))
    srv = Server(served_home, "--model", "doomed")
    try:
        assert [m["name"] for m in httpx.get(srv.url + "/api/ps").json()["models"]] == ["doomed:latest"]
        reg.remove("doomed")  # codellm rm, beside the running server
        ps = httpx.get(srv.url + "/api/ps")
        assert ps.status_code == 200 and "doomed:latest" not in [m["name"] for m in ps.json()["models"]]
        chat = httpx.post(srv.url + "/v1/chat/completions", json={"model": "doomed", "messages": [{"role": "user", "content": "x"}]})
        assert chat.status_code == 404
        assert "doomed:latest" not in [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]
        assert "doomed:latest" not in srv.health()["models"]
    finally:
        srv.stop()


def test_infill_timings_are_real(server):
    r = httpx.post(server.url + "/infill", json={"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n",
                                                 "n_predict": 16, "model": "tiny-coder"}, timeout=60)
    t = r.json()["timings"]
    assert r.status_code == 200 and t["predicted_n"] > 0
    assert t["predicted_ms"] > 0.01 and t["predicted_per_second"] < 100_000


# -- the registry against a hostile hub ----------------------------------------------------------------------------
def test_hostile_hub_cannot_write_or_delete_outside_the_registry(hub, home, tmp_path):
    from codellm.errors import DownloadError
    from codellm.registry import Registry
    from codellm.registry.hub import pull

    victim = home.parent / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    reg = Registry(home)
    for hostile in ({"sha": "../../../victim"}, {"sha": "../" * 8 + "tmp"}, {"path": ".."},
                    {"lfs": "../../x"}, {"oid": "not-a-sha"}, {"size": -1}):
        hub.hostile = hostile
        with pytest.raises(DownloadError, match="invalid"):
            pull(reg, "acme/tiny-coder", endpoint=hub.url)
        assert (victim / "precious.txt").read_text() == "keep me"
        assert not reg.exists("acme/tiny-coder")
    hub.hostile = {}
    outside = {p for p in home.parent.rglob("*") if not p.is_relative_to(home)}
    assert outside == {victim, victim / "precious.txt"}
    assert pull(reg, "acme/tiny-coder", endpoint=hub.url).name.short == "acme/tiny-coder"


def test_pull_stopped_between_files_keeps_the_finished_ones(hub, home):
    from codellm.errors import DownloadError
    from codellm.registry import Registry
    from codellm.registry.hub import pull

    reg = Registry(home)
    hub.broken.add("model.safetensors")  # the pull fails after the small files are done
    with pytest.raises(DownloadError):
        pull(reg, "acme/tiny-coder", endpoint=hub.url)
    hub.broken.clear()
    before = dict(hub.served)
    pull(reg, "acme/tiny-coder", endpoint=hub.url)
    again = {f: hub.served[f] - before.get(f, 0) for f in hub.served}
    assert again.get("config.json", 0) == 0 and again.get("tokenizer.json", 0) == 0
    assert again["model.safetensors"] > 0


def test_prune_collects_blobs_no_manifest_names(home, tiny_dir, cli):
    import os

    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    reg = Registry(home)
    create(reg, "kept", Modelfile(from_=str(tiny_dir)))
    orphan, _ = reg.blobs.add_bytes(b"left by a pull stopped before its manifest")
    fresh, _ = reg.blobs.add_bytes(b"written by a create still running")
    old = time.time() - 3600
    os.utime(reg.blobs.path(orphan), (old, old))
    r = cli("prune")
    assert r.returncode == 0 and "pruned 1 blobs" in r.stdout, r.stderr
    assert not reg.blobs.has(orphan) and reg.blobs.has(fresh)
    assert all(reg.blobs.has(layer.digest) for layer in reg.get("kept").manifest.layers)


def test_links_out_of_a_from_directory_are_refused(home, tiny_dir, tmp_path):
    from codellm.errors import InvalidRequest
    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    d = tmp_path / "model"
    d.mkdir()
    for f in tiny_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    secret = tmp_path / "secret.txt"
    secret.write_text("ssh key")
    (d / "LICENSE").unlink(missing_ok=True)
    (d / "LICENSE").symlink_to(secret)
    with pytest.raises(InvalidRequest, match="outside"):
        create(Registry(home), "linked", Modelfile(from_=str(d)))
    (d / "LICENSE").unlink()
    (d / "LICENSE").symlink_to(d / "config.json")  # a link that stays inside is fine
    create(Registry(home), "linked", Modelfile(from_=str(d)))


def test_names_are_ascii():
    from codellm.errors import InvalidName
    from codellm.registry.names import ModelName

    for bad in ("\u212aelvin", "caf\u00e9", "\uff41bc", ["a"], 5):
        with pytest.raises(InvalidName):
            ModelName.parse(bad)
    assert str(ModelName.parse("Kelvin")) == "kelvin:latest"


def test_go_templates_render_the_ollama_subset():
    from codellm.engine.templates import go_template

    t = "{{ if .System }}<s>{{ .System }}</s>\n{{ end }}{{- if .Prompt }} [{{ .Prompt }}] {{- else }}none{{ end }}{% raw %}"
    assert go_template(t, system="S", prompt="P") == "<s>S</s>\n [P]{% raw %}"  # {{- trims the text before it
    assert go_template(t, system="", prompt="") == "none{% raw %}"
    assert go_template("a \n{{- .Prompt -}}\n b", prompt="P") == "aPb"
    from codellm.errors import InvalidRequest

    for bad in ("{{ .Foo }}", "{{ if .Prompt }}x", "{{ range .Messages }}{{ end }}"):
        with pytest.raises(InvalidRequest):
            go_template(bad, prompt="p")


def test_chat_templates_render_as_transformers_does(tiny_dir):
    from transformers import AutoTokenizer

    from codellm.engine.templates import render_chat

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]
    for messages, kw in (([{"role": "user", "content": "hi"}], {}),
                         ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "yo"}, {"role": "user", "content": "more"}], {}),
                         ([{"role": "user", "content": "hi"}], {"tools": tools})):
        for add in (True, False):
            assert render_chat(tok, messages, add_generation_prompt=add, **kw) == tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add, **kw)


# -- damaged files -------------------------------------------------------------------------------------------------
def test_a_damaged_weights_blob_is_caught_before_it_is_served(home, tiny_dir, cli):
    from codellm.engine.loader import load
    from codellm.errors import Corrupt
    from codellm.registry import Registry
    from codellm.registry import manifest as mt
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    reg = Registry(home)
    create(reg, "fragile", Modelfile(from_=str(tiny_dir)))
    assert cli("show", "--verify", "fragile").returncode == 0
    weights = reg.get("fragile").manifest.layer(mt.WEIGHTS)
    path = reg.blobs.path(weights.digest)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # a flipped bit, same size
    path.write_bytes(bytes(data))
    with pytest.raises(Corrupt, match="model.safetensors of fragile.*damaged.*pull or create"):
        load(reg, "fragile")
    r = cli("show", "--verify", "fragile")
    assert r.returncode == 1 and "damaged" in r.stderr and "Traceback" not in r.stderr
    config = reg.blobs.path(reg.get("fragile").manifest.layer(mt.CONFIG).digest)
    config.write_text("{not json")
    r = cli("run", "--local", "fragile", "hi")
    assert r.returncode == 1 and "damaged" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("header", [b"", b"\x05\x00", (1 << 62).to_bytes(8, "little") + b"{}",
                                    (12).to_bytes(8, "little") + b"not json at!",
                                    (30).to_bytes(8, "little") + b'{"w": {"dtype": "F32"}}       '])
def test_a_damaged_safetensors_header_is_one_line(home, tiny_dir, tmp_path, cli, header):
    d = tmp_path / "model"
    d.mkdir()
    for f in tiny_dir.iterdir():
        (d / f.name).write_bytes(header if f.name == "model.safetensors" else f.read_bytes())
    (tmp_path / "Modelfile").write_text(f"FROM {d}\n")
    r = cli("create", "broken", "-f", str(tmp_path / "Modelfile"))
    assert r.returncode == 1 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Error: model.safetensors: ")  # progress lines, then one error


@pytest.mark.parametrize("content,where", [
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
     b'{"messages": ["hi", {"role": "assistant", "content": "yo"}]}\n', "data.jsonl:2"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff\xfe", "output": "b"}\n', "data.jsonl:2"),
])
def test_bad_training_data_names_the_file_and_line(tmp_path, content, where):
    from codellm.errors import InvalidRequest
    from codellm.trainer.data import load_examples

    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(InvalidRequest, match=where):
        load_examples(path)


def test_a_full_disk_is_one_line_and_leaves_the_registry_whole(hub, tmp_path):
    import subprocess

    from conftest import run_cli

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        env = {"CODELLM_HOME": str(mount / "home"), "HF_ENDPOINT": hub.url}
        r = run_cli("pull", "acme/big-coder", env=env)
        assert r.returncode == 1 and "no space left" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert run_cli("list", env=env).stdout.count("\n") <= 1  # no model, not even half a one
        assert not list((mount / "home" / "blobs").glob(".tmp-*"))
    finally:
        subprocess.run(["umount", str(mount)])


def test_template_deadlines_racing_the_end_of_renders_never_hang():
    """Renders that end just as their deadline passes, on several threads at once: each is an answer or TooSlow,
    nothing is raised outside a render, and the watchdog keeps working (an interruption that landed while a thread
    took the watchdog's lock once left it held, and every later chat request hung). A one-microsecond switch
    interval lets the watchdog run inside any bytecode of a render's arming, where the hang lived."""
    import sys
    import threading

    from codellm.engine.templates import TooSlow, bounded

    def render() -> str:
        return "".join(str(i) for i in range(300))  # about as long as the deadlines below

    def endless() -> str:
        return "".join(str(i) for i in range(10**8))  # far past its deadline on any machine: always stopped

    outcomes, errors = [], []

    def worker() -> None:
        for i in range(400):  # (a fast machine can finish every short render in time: a twentieth are endless)
            fn, seconds = (endless, 0.001) if i % 20 == 19 else (render, 0.00002 * (i % 20))
            try:
                outcomes.append(bounded(fn, seconds=seconds) is not None)
            except TooSlow:
                outcomes.append(False)
            except BaseException as exc:  # noqa: BLE001 (an interruption escaping a render is the bug)
                errors.append(exc)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads) and not errors
    assert len(outcomes) == 1600 and any(outcomes) and not all(outcomes)
    assert bounded(render, seconds=5) == render()
