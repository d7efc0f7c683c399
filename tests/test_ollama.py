"""Ollama's native API, driven by the real `ollama` client (and raw httpx where clients are strict)."""

from __future__ import annotations

import base64
import json
import struct
import time

import httpx
import ollama
import openai
import pytest

from conftest import Server, run_cli


@pytest.fixture(scope="module", params=["--engine-thread", "--engine-process"])
def placement(request) -> str:
    """Every test runs against both engine placements (a thread of the server; a child process, the GPU
    default), each on a registry of its own."""
    return request.param


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_dir, adapter_dir, other_dirs, placement):
    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    home = tmp_path_factory.mktemp("ollama-home")
    reg = Registry(home)
    create(reg, "qwen2.5-coder:0.5b", Modelfile(from_=str(tiny_dir)))
    create(reg, "tiny-coder", Modelfile(from_="qwen2.5-coder:0.5b", parameters={"temperature": 0.0, "stop": ["zzz"]}))
    create(reg, "tiny-lora", Modelfile(from_="qwen2.5-coder:0.5b", adapters=[str(adapter_dir)]))
    create(reg, "other-a", Modelfile(from_=str(other_dirs[0])))
    create(reg, "other-b", Modelfile(from_=str(other_dirs[1])))
    return home


@pytest.fixture(scope="module")
def server(home, tiny_dir, placement):
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from hubmirror import HubMirror

    with HubMirror() as hub:
        hub.add("acme/tiny-coder", tiny_dir)
        srv = Server(home, "--num-ctx", "256", "--max-loaded", "2", placement, env={"HF_ENDPOINT": hub.url})
        yield srv
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


def test_root_version_tags_show(server, client):
    assert httpx.get(server.url + "/").text == "Ollama is running"
    assert httpx.head(server.url + "/").status_code == 200
    version = httpx.get(server.url + "/api/version").json()["version"]
    assert tuple(int(x) for x in version.split(".")) >= (0, 6, 4)
    models = {m.model: m for m in client.list().models}
    assert "tiny-coder:latest" in models
    tag = httpx.get(server.url + "/api/tags").json()["models"][0]
    assert {"name", "model", "modified_at", "size", "digest", "details"} <= set(tag) and ":" in tag["model"]
    assert tag["modified_at"].endswith("Z") and tag["details"]["parameter_size"]
    info = client.show("tiny-coder")
    assert info.modelinfo["general.architecture"] == "qwen2" and info.modelinfo["qwen2.context_length"] == 2048
    assert "completion" in info.capabilities and "insert" in info.capabilities
    assert "temperature" in info.parameters and info.template
    legacy = httpx.post(server.url + "/api/show", json={"name": "tiny-coder"})  # Continue sends `name`
    assert legacy.status_code == 200 and "model_info" in legacy.json()


def test_generate_and_chat(server, client):
    r = client.generate(model="tiny-coder", prompt="def add(a, b):", options={"num_predict": 12}, stream=False)
    assert r.done and r.response and r.eval_count > 0 and r.total_duration > 0 and r.context
    chunks = list(client.generate(model="tiny-coder", prompt="def add(a, b):", options={"num_predict": 12}, stream=True))
    assert "".join(c.response for c in chunks) == r.response and chunks[-1].done and chunks[-1].done_reason
    c = client.chat(model="tiny-coder", messages=[{"role": "user", "content": "write a function"}],
                    options={"num_predict": 10}, stream=False)
    assert c.message.role == "assistant" and c.message.content and c.done
    body = {"model": "tiny-coder", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 8}}
    raw = httpx.post(server.url + "/api/chat", json=body).text  # stream defaults to true: NDJSON
    lines = raw.split("\n")
    assert lines[-1] == "" and all(lines[:-1])
    objs = [json.loads(line) for line in lines[:-1]]
    assert all({"model", "created_at", "message"} <= set(o) for o in objs) and objs[-1]["done"] is True
    assert all(o["done"] is False for o in objs[:-1])


def test_continue_ollama_provider_shapes(server):
    """What Continue's Ollama provider sends: FIM through suffix, raw prompts, keep_alive 1800, stream false."""
    fim = httpx.post(server.url + "/api/generate", json={
        "model": "tiny-coder", "prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))", "raw": True,
        "keep_alive": 1800, "options": {"num_predict": 8, "temperature": 0.01}, "stream": False}).json()
    assert fim["done"] and "response" in fim
    raw = httpx.post(server.url + "/api/generate", json={
        "model": "tiny-coder", "prompt": "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n\nprint(add(1, 2))<|fim_middle|>",
        "raw": True, "keep_alive": 1800, "options": {"num_predict": 8, "temperature": 0.01}, "stream": False}).json()
    assert raw["prompt_eval_count"] == fim["prompt_eval_count"]  # special-token text became special tokens
    chat = httpx.post(server.url + "/api/chat", json={
        "model": "tiny-coder", "messages": [{"role": "user", "content": "x"}], "stream": False, "keep_alive": 1800,
        "options": {"num_predict": 4}}).json()
    assert chat["message"]["role"] == "assistant" and chat["done"] is True


def test_format_json(client):
    r = client.chat(model="tiny-coder", messages=[{"role": "user", "content": "a JSON object please"}],
                    format="json", options={"num_predict": 200, "temperature": 0.7, "seed": 3}, stream=False)
    text = r.message.content
    assert text.lstrip().startswith("{")
    if r.done_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_pull_with_progress_create_copy_delete(server, client):
    statuses = [p for p in client.pull("acme/tiny-coder", stream=True)]
    assert statuses[0].status.startswith("pulling manifest") and statuses[-1].status == "success"
    assert any(p.digest and p.total and p.completed == p.total for p in statuses)
    shown = {p.status for p in statuses}
    assert {"verifying sha256 digest", "writing manifest"} <= shown  # Ollama's own status lines
    assert any(s.startswith("pulling ") and len(s) == len("pulling ") + 12 for s in shown)  # LFS weights: their digest
    assert "pulling tokenizer_config.json" in shown  # a file in git: its whole name
    assert "acme/tiny-coder:latest" in {m.model for m in client.list().models}
    assert client.pull("acme/tiny-coder", stream=False).status == "success"
    client.create(model="terse", from_="tiny-coder", system="You are terse.", parameters={"temperature": 0.1}, stream=False)
    assert "SYSTEM You are terse." in client.show("terse").modelfile
    old = httpx.post(server.url + "/api/create", json={"name": "terse2", "modelfile": "FROM tiny-coder\nSYSTEM Short.\n"})
    assert old.status_code == 200 and json.loads(old.text.strip().split("\n")[-1])["status"] == "success"
    bad = httpx.post(server.url + "/api/create", json={"name": "evil", "modelfile": "FROM /etc\n", "stream": False})
    assert bad.status_code == 400 and "not allowed" in bad.json()["error"]
    client.copy("terse", "terse-copy")
    assert "terse-copy:latest" in {m.model for m in client.list().models}
    client.delete("terse-copy")
    assert "terse-copy:latest" not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("terse-copy")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="missing", prompt="x")
    assert err.value.status_code == 404 and 'model "missing" not found, try pulling it first' in str(err.value)
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("nope/nope", stream=False)


def _loaded(client) -> dict:
    return {m.model: m for m in client.ps().models}


def test_keep_alive_ps_stop_and_eviction(server, client, home):
    client.generate(model="tiny-coder", prompt="x", options={"num_predict": 2}, stream=False)
    ps = _loaded(client)["tiny-coder:latest"]
    assert ps.expires_at and ps.context_length == 256
    client.generate(model="tiny-coder", prompt="", keep_alive=0)  # only a model and keep_alive 0: unload now
    assert "tiny-coder:latest" not in _loaded(client)
    r = client.generate(model="tiny-coder", keep_alive="1s")  # only a model: load it
    assert r.done_reason == "load" and "tiny-coder:latest" in _loaded(client)
    deadline = time.time() + 120
    while "tiny-coder:latest" in _loaded(client) and time.time() < deadline:
        time.sleep(0.25)
    assert "tiny-coder:latest" not in _loaded(client)  # keep_alive ran out
    # a base and its adapters share one copy of the weights: all three load together
    for name in ("tiny-coder", "qwen2.5-coder:0.5b", "tiny-lora"):
        client.generate(model=name, prompt="x", options={"num_predict": 1}, keep_alive=-1, stream=False)
    assert set(_loaded(client)) == {"tiny-coder:latest", "qwen2.5-coder:0.5b", "tiny-lora:latest"}
    # models with weights of their own count against the cap of 2: the least recently used weights go
    client.generate(model="other-a", prompt="x", options={"num_predict": 1}, keep_alive=-1, stream=False)
    assert set(_loaded(client)) == {"tiny-coder:latest", "qwen2.5-coder:0.5b", "tiny-lora:latest", "other-a:latest"}
    client.generate(model="tiny-lora", prompt="x", options={"num_predict": 1}, keep_alive=-1, stream=False)
    client.generate(model="other-b", prompt="x", options={"num_predict": 1}, keep_alive=-1, stream=False)
    assert set(_loaded(client)) == {"tiny-coder:latest", "qwen2.5-coder:0.5b", "tiny-lora:latest", "other-b:latest"}
    r = run_cli("ps", "--url", server.url, env={"CODELLM_HOME": str(home)})
    assert r.returncode == 0 and "tiny-lora:latest" in r.stdout and "Forever" in r.stdout
    r = run_cli("stop", "tiny-lora", "--url", server.url, env={"CODELLM_HOME": str(home)})
    assert r.returncode == 0 and "tiny-lora:latest" not in _loaded(client) and "tiny-coder:latest" in _loaded(client)
    r = run_cli("stop", "nothing-here", "--url", server.url)
    assert r.returncode == 1 and "not found" in r.stderr


def test_embeddings_three_ways(server, client, tiny_dir):
    e = client.embed(model="tiny-coder", input=["def add(a, b):", "class Stack:"])
    assert len(e.embeddings) == 2 and abs(sum(x * x for x in e.embeddings[0]) - 1) < 1e-4
    legacy = client.embeddings(model="tiny-coder", prompt="def add(a, b):")
    assert legacy.embedding == pytest.approx(e.embeddings[0], abs=1e-5)
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    floats = oa.embeddings.create(model="tiny-coder", input="def add(a, b):", encoding_format="float").data[0].embedding
    assert floats == pytest.approx(e.embeddings[0], abs=1e-5)
    raw = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny-coder", "input": ["def add(a, b):"],
                                                          "encoding_format": "base64"}).json()
    vec = struct.unpack(f"<{len(floats)}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert list(vec) == pytest.approx(floats, abs=1e-6) and raw["usage"]["prompt_tokens"] > 0
    # token ids, as LangChain's OpenAIEmbeddings sends them: the same vectors as the text they encode
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = [tok("def add(a, b):")["input_ids"], tok("class Stack:")["input_ids"]]
    by_ids = oa.embeddings.create(model="tiny-coder", input=ids, encoding_format="float")
    assert [d.embedding for d in by_ids.data] == [pytest.approx(v, abs=1e-5) for v in e.embeddings]
    one = oa.embeddings.create(model="tiny-coder", input=ids[0], encoding_format="float").data
    assert len(one) == 1 and one[0].embedding == pytest.approx(e.embeddings[0], abs=1e-5)
    for bad in ([[len(tok) + 5]], [[1, "x"]], [], [["a"]]):
        r = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny-coder", "input": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input", (bad, r.text)


def test_generate_with_go_template(server):
    from codellm.engine.prompts import go_template

    t = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"
    assert go_template(t, prompt="hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert go_template(t, system="S", prompt="hi").startswith("<|im_start|>system\nS<|im_end|>\n")
    assert go_template("{{- .Prompt -}}  ", prompt="x") == "x"
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny-coder", "prompt": "hi", "template": t, "stream": False,
                                                        "options": {"num_predict": 3}})
    assert r.status_code == 200 and r.json()["done"]
    bad = httpx.post(server.url + "/api/generate", json={"model": "tiny-coder", "prompt": "hi", "template": "{{ range .Messages }}x{{ end }}",
                                                          "stream": False})
    assert bad.status_code == 400 and "unsupported template action" in bad.json()["error"]


def test_long_prompts_are_cut_as_ollama_cuts_them(server, client):
    """Ollama keeps the end of a prompt longer than the context and answers (Open WebUI relies on it); the OpenAI
    routes keep their 400."""
    long = "def f():\n    return 1\n" * 200  # far past the 256-token context
    r = client.generate(model="tiny-coder", prompt=long, options={"num_predict": 8})
    assert r.done and 0 < r.prompt_eval_count <= 256 - 8 and r.eval_count <= 8
    chat = client.chat(model="tiny-coder", messages=[{"role": "user", "content": long}], options={"num_predict": 8})
    assert chat.done and chat.prompt_eval_count <= 256 - 8
    refused = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny-coder", "max_tokens": 4,
                                                                     "messages": [{"role": "user", "content": long}]})
    assert refused.status_code == 400 and "maximum context length" in refused.json()["error"]["message"]
    think = httpx.post(server.url + "/api/chat", json={"model": "tiny-coder", "think": True, "stream": False,
                                                       "messages": [{"role": "user", "content": "hi"}]})
    assert think.status_code == 400 and "thinking" in think.json()["error"]
    vectors = httpx.post(server.url + "/api/embed", json={"model": "tiny-coder", "input": ["a b", "c"], "dimensions": 8}).json()
    assert [len(v) for v in vectors["embeddings"]] == [8, 8]
    assert all(abs(sum(x * x for x in v) - 1) < 1e-5 for v in vectors["embeddings"])  # normalized again


def test_create_from_uploaded_blobs(server, client, home, tiny_dir, adapter_dir):
    """`ollama create` from files: the client uploads each file as a blob (HEAD, then POST /api/blobs/<digest>) and
    creates the model from {filename: digest}; an adapter's files come the same way. Uploads that lie about their
    digest, and creates that name files oddly or blobs never uploaded, are refused and leave nothing behind."""
    from codellm.registry.blobs import sha256_bytes

    files = {p.name: client.create_blob(p) for p in sorted(tiny_dir.iterdir()) if p.is_file()}
    adapters = {p.name: client.create_blob(p) for p in sorted(adapter_dir.iterdir()) if p.is_file()}
    assert httpx.head(f"{server.url}/api/blobs/{files['config.json']}").status_code == 200
    client.create(model="uploaded", files=files, stream=False)
    client.create(model="uploaded-lora", from_="uploaded", adapters=adapters, stream=False)
    again = client.create_blob(tiny_dir / "config.json")  # already there: not written twice
    assert again == files["config.json"]
    shown = client.show("uploaded-lora")
    assert shown.details.parent_model == "uploaded:latest"
    base = client.generate(model="uploaded", prompt="def add(a, b):", options={"temperature": 0, "num_predict": 8})
    lora = client.generate(model="uploaded-lora", prompt="def add(a, b):", options={"temperature": 0, "num_predict": 8})
    same = client.generate(model="qwen2.5-coder:0.5b", prompt="def add(a, b):", options={"temperature": 0, "num_predict": 8})
    assert base.response == same.response and lora.response != base.response  # the same weights; the adapter applies

    body = b"not what the digest says"
    wrong = "sha256:" + "0" * 64
    assert httpx.head(f"{server.url}/api/blobs/{wrong}").status_code == 404
    r = httpx.post(f"{server.url}/api/blobs/{wrong}", content=body)
    assert r.status_code == 400 and "digest" in r.json()["error"]
    assert httpx.head(f"{server.url}/api/blobs/{wrong}").status_code == 404
    assert httpx.post(f"{server.url}/api/blobs/sha256:../../etc", content=body).status_code in (400, 404)
    assert httpx.post(f"{server.url}/api/blobs/md5:abc", content=body).status_code == 400
    assert not list((home / "blobs").glob(".tmp-*"))  # no half-written blob
    good = sha256_bytes(body)
    assert httpx.post(f"{server.url}/api/blobs/{good}", content=body).status_code == 201
    for bad_files, says in (({"../config.json": files["config.json"]}, "invalid file name"),
                            ({"config.json": wrong}, "upload it first"),
                            ({"config.json": "sha256:xyz"}, "invalid digest"),
                            ({"weights.bin": good}, "no config.json")):
        with pytest.raises(ollama.ResponseError) as err:
            client.create(model="refused", files=bad_files, stream=False)
        assert err.value.status_code == 400 and says in str(err.value), (bad_files, str(err.value))
    assert "refused:latest" not in {m.model for m in client.list().models}
