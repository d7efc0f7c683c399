"""Registry end to end: names, pull from a local hub mirror, resume, verification, gc, Modelfiles."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import os
import time

import pytest

from codellm.errors import InvalidName, ModelfileError
from codellm.registry import ModelName, Registry
from codellm.registry import manifest as mt
from codellm.registry import modelfile
from conftest import TINY_REPO


@pytest.mark.parametrize("text,expected", [
    ("qwen2.5-coder", ("library", "qwen2.5-coder", "latest")),
    ("Qwen2.5-Coder:1.5B", ("library", "qwen2.5-coder", "1.5b")),
    ("acme/tiny-coder:v1", ("acme", "tiny-coder", "v1")),
    ("deepseek-coder:1.3b-instruct", ("library", "deepseek-coder", "1.3b-instruct")),
])
def test_names_parse(text, expected):
    assert ModelName.parse(text).parts == expected


@pytest.mark.parametrize("bad", ["", "../x", "a/../../b", "a/b/c", "..", ".hidden", "a:../b", "a b", "x:", "/etc/passwd",
                                 "a\\..\\b", "ns/..:latest", "m:" + "t" * 200, "%2e%2e/x"])
def test_names_refuse_traversal_and_garbage(bad, tmp_path):
    with pytest.raises(InvalidName):
        ModelName.parse(bad)
    reg = Registry(tmp_path)
    with pytest.raises(InvalidName):
        reg.get(bad)
    assert not any(p for p in tmp_path.parent.iterdir() if p.name in ("x", "b"))


def _manifest(home, name="qwen2.5-coder:0.5b"):
    return Registry(home).get(name)


def test_pull_end_to_end(cli, home, hub, tiny_dir):
    r = cli("pull", "qwen2.5-coder:0.5b")
    assert r.returncode == 0, r.stderr
    assert "pulled qwen2.5-coder:0.5b" in r.stdout
    assert "success" in r.stderr and "pulling qwen2.5-coder:0.5b" in r.stderr  # progress went to stderr
    entry = _manifest(home)
    kinds = {layer.filename: layer.media_type for layer in entry.manifest.layers}
    assert kinds["model.safetensors"] == mt.WEIGHTS
    assert kinds["config.json"] == mt.CONFIG
    assert kinds["tokenizer.json"] == mt.TOKENIZER and kinds["LICENSE"] == mt.LICENSE
    for layer in entry.manifest.layers:  # every blob is what the hub has, under its sha256
        blob = Registry(home).blobs.path(layer.digest).read_bytes()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer.digest
        assert blob == (tiny_dir / layer.filename).read_bytes()
    c = entry.manifest.config
    assert (c.architecture, c.model_type, c.family, c.context_length) == ("Qwen2ForCausalLM", "qwen2", "qwen2.5-coder", 2048)
    assert c.chat_template and c.fim and c.fim.prefix == "<|fim_prefix|>" and c.parameters > 50_000
    assert c.source == TINY_REPO and len(c.revision) == 40
    assert not (home / "downloads" / TINY_REPO.replace("/", "--")).exists() or not any((home / "downloads").rglob("*.safetensors"))
    listing = cli("list").stdout.splitlines()
    assert listing[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert listing[1].startswith("qwen2.5-coder:0.5b") and entry.id in listing[1]
    show = cli("show", "qwen2.5-coder:0.5b").stdout
    for text in ("architecture", "qwen2", "context length", "2048", "insert", "License"):
        assert text in show
    # a hub repo id pulls under its own name
    r = cli("pull", "acme/tiny-coder:v1")
    assert r.returncode == 0, r.stderr
    assert Registry(home).get("acme/tiny-coder:v1").manifest.layers == entry.manifest.layers


def test_pull_errors_are_one_line(cli, home, hub):
    for args, needle in (
        (["pull", "nosuch/model"], "not found"),
        (["pull", "no-such-catalog-name"], "not in the catalog"),
        (["pull", "../evil"], "invalid"),
        (["show", "missing"], "not found"),
        (["rm", "missing"], "not found"),
    ):
        r = cli(*args)
        assert r.returncode == 1
        assert r.stderr.strip().splitlines()[-1].startswith("Error:") and needle in r.stderr
        assert "Traceback" not in r.stderr
    hub.gated.add("acme/tiny-coder")
    r = cli("pull", "acme/tiny-coder")
    assert r.returncode == 1 and "gated" in r.stderr and "Traceback" not in r.stderr


def test_pickle_and_remote_code_refused(cli, home, hub):
    r = cli("pull", "acme/pickle-only")
    assert r.returncode == 1 and "--allow-pickle" in r.stderr
    r = cli("pull", "acme/remote-code")
    assert r.returncode == 1 and "--trust-remote-code" in r.stderr
    assert not Registry(home).list()
    assert not any(p for p in (home / "manifests").rglob("*") if p.is_file())
    r = cli("pull", "acme/pickle-only", "--allow-pickle")
    assert r.returncode == 0, r.stderr
    names = {layer.filename for layer in Registry(home).get("acme/pickle-only").manifest.layers}
    assert "pytorch_model.bin" in names
    r = cli("pull", "acme/remote-code", "--trust-remote-code")
    assert r.returncode == 0, r.stderr
    entry = Registry(home).get("acme/remote-code")
    assert entry.manifest.config.trust_remote_code and entry.manifest.layers_of(mt.CODE)


def test_killed_pull_resumes_without_refetching(cli, home, hub, big_dir):
    size = (big_dir / "model.safetensors").stat().st_size
    assert size > 12 * 2**20
    hub.throttle["model.safetensors"] = (11 * 2**20, 0.2)
    env = {**os.environ, "CODELLM_HOME": str(home), "HF_ENDPOINT": hub.url}
    proc = subprocess.Popen([sys.executable, "-m", "codellm.cli.main", "pull", "acme/big-coder"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60

    def on_disk() -> int:
        total = 0
        for part in (home / "downloads").rglob("*.partial"):
            try:
                total += part.stat().st_size
            except FileNotFoundError:  # finished and renamed between the listing and the stat
                pass
        return total

    while on_disk() < 8 * 2**20 and time.time() < deadline:  # kill once 8 MiB are written, mid-transfer
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    sent_before = hub.served["model.safetensors"]
    assert 0 < sent_before < size
    assert not Registry(home).list()  # killed: no manifest
    for blob in (home / "blobs").glob("sha256-*"):  # and no corrupt blob
        assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name.replace("-", ":")
    hub.throttle.clear()
    r = cli("pull", "acme/big-coder")
    assert r.returncode == 0, r.stderr
    assert any(f == "model.safetensors" and rng.startswith("bytes=") and rng != "bytes=0-" for f, rng in hub.ranges)
    # the second pull fetched only what the first had not written yet (less what was in flight when killed)
    refetched = hub.served["model.safetensors"] - sent_before
    assert refetched <= size - 8 * 2**20
    assert Registry(home).blobs.verify(Registry(home).get("acme/big-coder").manifest.layer(mt.WEIGHTS).digest)


def test_corruption_detected_and_refetched(cli, home, hub):
    hub.corrupt_once.add("model.safetensors")
    r = cli("pull", "qwen2.5-coder:0.5b")  # corrupt bytes in transit: checksum fails, fetched again
    assert r.returncode == 0, r.stderr
    reg = Registry(home)
    weights = reg.get("qwen2.5-coder:0.5b").manifest.layer(mt.WEIGHTS)
    assert reg.blobs.verify(weights.digest)
    path = reg.blobs.path(weights.digest)  # now corrupt it on disk
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    served = hub.served["model.safetensors"]
    r = cli("pull", "qwen2.5-coder:0.5b")
    assert r.returncode == 0, r.stderr
    assert hub.served["model.safetensors"] > served  # fetched again
    assert reg.blobs.verify(weights.digest)


def test_concurrent_pulls_store_once(cli, home, hub, tiny_dir):
    hub.throttle["model.safetensors"] = (0, 0.01)
    env = {**os.environ, "CODELLM_HOME": str(home), "HF_ENDPOINT": hub.url}
    procs = [subprocess.Popen([sys.executable, "-m", "codellm.cli.main", "pull", "qwen2.5-coder:0.5b"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert hub.served["model.safetensors"] == (tiny_dir / "model.safetensors").stat().st_size
    reg = Registry(home)
    assert len(reg.list()) == 1
    assert reg.blobs.digests() == {layer.digest for layer in reg.get("qwen2.5-coder:0.5b").manifest.layers}


def test_rm_collects_only_unreferenced_blobs(cli, home, hub, tmp_path):
    assert cli("pull", "qwen2.5-coder:0.5b").returncode == 0
    reg = Registry(home)
    base = reg.get("qwen2.5-coder:0.5b")
    assert cli("cp", "qwen2.5-coder:0.5b", "mine:copy").returncode == 0
    assert reg.get("mine:copy").manifest.layers == base.manifest.layers
    (tmp_path / "Modelfile").write_text("FROM qwen2.5-coder:0.5b\nSYSTEM You write Python.\n")
    assert cli("create", "py-helper", "-f", str(tmp_path / "Modelfile")).returncode == 0
    before = reg.blobs.digests()
    assert len(before) == len(base.manifest.layers) + 1  # py-helper shares everything but its system layer
    r = cli("rm", "qwen2.5-coder:0.5b")
    assert r.returncode == 0 and "0 blobs freed" in r.stdout
    assert reg.blobs.digests() == before
    r = cli("rm", "py-helper")
    assert "1 blobs freed" in r.stdout
    assert reg.blobs.digests() == {layer.digest for layer in base.manifest.layers}
    assert cli("rm", "mine:copy").returncode == 0
    assert reg.blobs.digests() == set() and not reg.list()


MODELFILE = '''# a Python assistant
FROM {src}
PARAMETER temperature 0.2
PARAMETER top_k 20
PARAMETER num_ctx 1024
PARAMETER stop "<|im_end|>"
PARAMETER stop "### End"
PARAMETER seed 7
TEMPLATE """{{% for m in messages %}}<|im_start|>{{{{ m['role'] }}}}
{{{{ m['content'] }}}}<|im_end|>
{{% endfor %}}<|im_start|>assistant
"""
SYSTEM """You are a careful Python assistant.
Answer with code."""
MESSAGE user "What is 2 + 2?"
MESSAGE assistant 4
LICENSE "MIT, for the test"
'''


def test_modelfile_parses_every_instruction():
    mf = modelfile.parse(MODELFILE.format(src="./model") + "ADAPTER ./adapter\n")
    assert mf.from_ == "./model"
    assert mf.parameters == {"temperature": 0.2, "top_k": 20, "num_ctx": 1024, "stop": ["<|im_end|>", "### End"], "seed": 7}
    assert mf.template.startswith("{% for m in messages %}<|im_start|>") and mf.template.endswith("assistant\n")
    assert mf.system == "You are a careful Python assistant.\nAnswer with code."
    assert [(m.role, m.content) for m in mf.messages] == [("user", "What is 2 + 2?"), ("assistant", "4")]
    assert mf.adapters == ["./adapter"] and mf.licenses == ["MIT, for the test"]
    assert modelfile.parse(modelfile.format(mf)) == mf


@pytest.mark.parametrize("text,needle", [
    ("FROM x\nBOGUS thing", "line 2: unknown instruction 'BOGUS'"),
    ("FROM x\n\nPARAMETER temperature hot", "line 3: parameter temperature needs a float"),
    ("FROM x\nPARAMETER nonsense 1", "line 2: unknown parameter 'nonsense'"),
    ("FROM x\nSYSTEM \"\"\"never closed\n", "line 2: unterminated"),
    ("FROM x\nMESSAGE robot hi", "line 2: MESSAGE role"),
    ("PARAMETER top_k 3", "no FROM line"),
    ("FROM a\nFROM b", "line 2: FROM given twice"),
])
def test_modelfile_errors_name_the_line(text, needle):
    with pytest.raises(ModelfileError) as err:
        modelfile.parse(text)
    assert needle in err.value.message


def test_create_and_show_round_trip(cli, home, tiny_dir, tmp_path):
    (tmp_path / "model").symlink_to(tiny_dir)
    (tmp_path / "Modelfile").write_text(MODELFILE.format(src="./model"))
    r = cli("create", "py-helper:v1", "-f", str(tmp_path / "Modelfile"))
    assert r.returncode == 0, r.stderr
    reg = Registry(home)
    made = reg.get("py-helper:v1").manifest
    assert made.config.source == "local" and made.config.family == "qwen2.5-coder"
    assert json.loads(reg.read_layer(made.layer(mt.PARAMS)))["stop"] == ["<|im_end|>", "### End"]
    text = cli("show", "--modelfile", "py-helper:v1").stdout
    assert text.startswith("FROM py-helper:v1\n") and 'PARAMETER stop "### End"' in text
    (tmp_path / "Roundtrip").write_text(text)
    r = cli("create", "again", "-f", str(tmp_path / "Roundtrip"))
    assert r.returncode == 0, r.stderr
    again = reg.get("again").manifest
    assert sorted(map(tuple, [(l.media_type, l.digest) for l in again.layers])) == sorted((l.media_type, l.digest) for l in made.layers)
    assert cli("show", "--modelfile", "again").stdout == text.replace("FROM py-helper:v1", "FROM again:latest")
    shown = cli("show", "py-helper:v1").stdout
    assert "temperature" in shown and "careful Python" in shown and "MIT" in shown
    assert cli("show", "--system", "py-helper:v1").stdout.startswith("You are a careful")
    # errors: a bad Modelfile and a missing base fail in one line and leave nothing behind
    (tmp_path / "Bad").write_text("FROM ./model\nPARAMETER top_k many\n")
    r = cli("create", "bad", "-f", str(tmp_path / "Bad"))
    assert r.returncode == 1 and "line 2" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "Missing").write_text("FROM not-here\n")
    r = cli("create", "bad", "-f", str(tmp_path / "Missing"), env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert not reg.exists("bad")


def test_every_help_is_complete():
    from codellm.cli.main import cli as group
    from conftest import run_cli

    r = run_cli("--help")
    assert r.returncode == 0
    for name in group.commands:
        r = run_cli(name, "--help")
        assert r.returncode == 0 and "Usage:" in r.stdout
        assert len(group.commands[name].help or "") > 20, name


def test_shipped_modelfiles_build_and_render(home, tiny_dir):
    from pathlib import Path

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from codellm.registry.create import create
    from codellm.registry.info import describe_model

    root = Path(__file__).resolve().parents[1] / "Modelfiles"
    files = sorted(root.glob("*.Modelfile"))
    assert {f.name for f in files} >= {"python-assistant.Modelfile", "llama2-alpaca-python.Modelfile"}
    reg = Registry(home)
    for path in files:
        mf = modelfile.parse(path.read_text())
        assert mf.from_ in ("qwen2.5-coder:1.5b", "llama2:7b-chat")
        mf.from_ = str(tiny_dir)  # offline: the same Modelfile on the tiny model
        entry = create(reg, path.stem.lower(), mf)
        info = describe_model(reg, str(entry.name))
        assert info.system and info.parameters["num_ctx"] in (8192, 4096)
    alpaca = modelfile.parse((root / "llama2-alpaca-python.Modelfile").read_text())
    text = ImmutableSandboxedEnvironment().from_string(alpaca.template).render(
        messages=[{"role": "system", "content": alpaca.system}, {"role": "user", "content": "Sum a list"}],
        bos_token="<s>", eos_token="</s>")
    assert text.startswith("<s>Below is an instruction") and "### Task:\nSum a list\n\n### Input:\n" in text
    assert text.endswith("### Response:\n")
