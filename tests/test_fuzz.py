"""Schemathesis over the served OpenAPI document: every route, bounded example counts, and no 5xx allowed.

Two runs: one on the document as served (random model names mostly meet 404s and validation), and one with
every model field pinned to a real model, so that generated requests reach prompt building and the engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import Server

SCHEMATHESIS = [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())"]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_dir):
    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    home = tmp_path_factory.mktemp("fuzz-home")
    create(Registry(home), "tiny-coder", Modelfile(from_=str(tiny_dir), parameters={"num_predict": 8}))
    # the hub is a closed port: pulls fail at once, and the fuzzer skips them (a hub's failure is a 5xx by right)
    srv = Server(home, "--model", "tiny-coder", "--num-ctx", "64", "--slots", "4", "--prefill-chunk", "16",
                 "--engine-thread",
                 env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    yield srv
    srv.stop()


def run_schemathesis(location: str, base_url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [*SCHEMATHESIS, "run", location, "--url", base_url, "--checks", "not_a_server_error,status_code_conformance",
           "--phases", "coverage,fuzzing", "--max-examples", "10", "--workers", "2", "--request-timeout", "120",
           "--exclude-path", "/api/pull", "--seed", "1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=1800,
                          env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"})


def test_the_served_schema_describes_bodies_and_errors(fuzz_server):
    doc = httpx.get(fuzz_server.url + "/schema/openapi.json").json()
    generate = doc["paths"]["/api/generate"]["post"]
    assert generate["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/GenerateRequest"}
    assert generate["responses"]["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OllamaError"}
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert chat["429"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OpenAIError"}
    temperature = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["temperature"]
    assert {"type": "number", "minimum": 0, "maximum": 2} in temperature["anyOf"]  # bounds of an optional field kept
    assert "from" in doc["components"]["schemas"]["CreateRequest"]["properties"]
    # what the schema says a 400 looks like is what a 400 is
    r = httpx.post(fuzz_server.url + "/api/generate", json={"model": "tiny-coder", "prompt": 5})
    assert r.status_code == 400 and set(r.json()) == {"error"}
    r = httpx.post(fuzz_server.url + "/v1/chat/completions", json={"model": "tiny-coder", "messages": 5})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_fuzz_the_served_schema(fuzz_server, tmp_path):
    r = run_schemathesis(fuzz_server.url + "/schema/openapi.json", fuzz_server.url, tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "passed" in r.stdout and " failed" not in r.stdout.split("SUMMARY")[-1]


def test_fuzz_with_real_model_names(fuzz_server, tmp_path):
    doc = httpx.get(fuzz_server.url + "/schema/openapi.json").json()
    for schema in doc["components"]["schemas"].values():
        for key in ("model", "name", "source"):
            if key in schema.get("properties", {}):
                schema["properties"][key] = {"const": "tiny-coder"}
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps(doc))
    r = run_schemathesis(str(pinned), fuzz_server.url, tmp_path, "--exclude-path", "/api/delete")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    info = fuzz_server.health()["models"]["tiny-coder:latest"]
    assert info["active"] == 0 and info["queued"] == 0  # nothing leaked
    assert info["steps"] > 0  # the fuzzer's requests reached the engine
