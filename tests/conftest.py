"""Shared fixtures: tiny real models built offline, a local hub mirror, a real server on loopback."""

from __future__ import annotations

import functools
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

# httpx's top-level calls give up after 5 s by default. On a loaded 2-core machine (CI runs two test workers) a request
# that loads a model, or waits behind the other worker's CPU work, may take longer, and a test would fail on a race
# with the clock. The suite's plain calls wait up to TEST_HTTP_TIMEOUT (only against a hang); a call that passes its
# own timeout keeps it (the keyword given at the call wins over the partial's).
TEST_HTTP_TIMEOUT = httpx.Timeout(300.0, connect=30.0)
for _name in ("request", "stream", "get", "options", "head", "post", "put", "patch", "delete"):
    setattr(httpx, _name, functools.partial(getattr(httpx, _name), timeout=TEST_HTTP_TIMEOUT))
from hubmirror import HubMirror  # noqa: E402

TINY_REPO = "Qwen/Qwen2.5-Coder-0.5B-Instruct"  # the catalog's qwen2.5-coder:0.5b, served by the mirror


MODEL_CACHE = Path(__file__).parent / ".assets" / "models"  # git-ignored; CODELLM_TEST_MODEL_CACHE=0 turns it off


def cached_build(out: Path, build, *inputs) -> Path:
    """``build(directory)``'s model, built once for each hash of the code that builds models here (``engine/tiny.py``
    and this file), of ``inputs`` and of the library versions, then copied to ``out``: training tiny models is the
    slowest part of a fresh run, and its results depend on nothing else."""
    import hashlib
    import shutil

    import torch
    import transformers

    from codellm.engine import tiny

    if os.environ.get("CODELLM_TEST_MODEL_CACHE") == "0":
        return build(out)
    h = hashlib.sha256()
    for source in (Path(tiny.__file__), Path(__file__)):
        h.update(source.read_bytes())
    h.update(repr((build.__name__, inputs, torch.__version__, transformers.__version__)).encode())
    cached = MODEL_CACHE / h.hexdigest()[:24]
    if not (cached / "done").exists():
        part = MODEL_CACHE / f".{cached.name}.{os.getpid()}"
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        build(part / "model")
        (part / "model" / "done").touch()
        try:
            os.replace(part / "model", cached)  # whole or not at all
        except OSError:  # another test worker put it there first
            pass
        shutil.rmtree(part, ignore_errors=True)
    shutil.copytree(cached, out, ignore=shutil.ignore_patterns("done"))
    return out


def digest_of(directory: Path) -> str:
    import hashlib

    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from codellm.engine import tiny

    def tiny_trained(d):
        return tiny.build(d, steps=300)
    return cached_build(tmp_path_factory.mktemp("tiny") / "model", tiny_trained)


def make_adapter(out: Path, base_dir: Path, seed: int) -> Path:
    """A real PEFT LoRA adapter for the tiny model, with non-zero weights so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, tiny_dir) -> Path:
    return make_adapter(tmp_path_factory.mktemp("adapter") / "adapter", tiny_dir, seed=1)


@pytest.fixture(scope="session")
def adapter2_dir(tmp_path_factory, tiny_dir) -> Path:
    return make_adapter(tmp_path_factory.mktemp("adapter2") / "adapter", tiny_dir, seed=2)


@pytest.fixture(scope="session")
def other_dirs(tmp_path_factory) -> list[Path]:
    """Two more tiny models with weights of their own (other seeds): separate copies in memory."""
    from codellm.engine import tiny

    return [tiny.build(tmp_path_factory.mktemp(f"other{i}") / "model", seed=i) for i in (1, 2)]


@pytest.fixture(scope="session")
def big_dir(tmp_path_factory) -> Path:
    """~18 MB of weights: more than huggingface_hub's 10 MiB write chunk, so a killed pull leaves a partial file."""
    from codellm.engine import tiny

    return tiny.build(tmp_path_factory.mktemp("big") / "model", hidden=512)


@pytest.fixture(scope="session")
def pickle_dir(tmp_path_factory, tiny_dir) -> Path:
    import torch
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("pickle") / "model"
    d.mkdir()
    for f in tiny_dir.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(tiny_dir / "model.safetensors"), d / "pytorch_model.bin")
    return d


@pytest.fixture(scope="session")
def remote_code_dir(tmp_path_factory, tiny_dir) -> Path:
    d = tmp_path_factory.mktemp("remote") / "model"
    d.mkdir()
    for f in tiny_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_evil.py").write_text("import os\n")
    return d


@pytest.fixture()
def hub(tiny_dir, big_dir, pickle_dir, remote_code_dir):
    with HubMirror() as mirror:
        mirror.add(TINY_REPO, tiny_dir)
        mirror.add("acme/tiny-coder", tiny_dir)
        mirror.add("acme/pickle-only", pickle_dir)
        mirror.add("acme/big-coder", big_dir)
        mirror.add("acme/remote-code", remote_code_dir)
        yield mirror


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "codellm-home"
    monkeypatch.setenv("CODELLM_HOME", str(path))
    return path


def run_cli(*args: str, env: dict | None = None, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "codellm.cli.main", *args], env=full_env, capture_output=True,
                          text=True, input=input, timeout=timeout)


@pytest.fixture()
def cli(home, hub):
    def call(*args, **kw):
        env = {"CODELLM_HOME": str(home), "HF_ENDPOINT": hub.url, **kw.pop("env", {})}
        return run_cli(*args, env=env, **kw)

    return call


def named_events(text: str) -> list[tuple[str | None, dict]]:
    """(event name, data) of each frame of an SSE body with named events (Anthropic's, the Responses API's)."""
    events = []
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
        events.append((lines.get("event"), json.loads(lines["data"])))
    return events


_ports = itertools.count()


def free_port() -> int:
    """A loopback port free now, from a range of this xdist worker's own (so two workers never pick the same one
    before their servers bind it), above the kernel's ephemeral ports' usual start."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    while True:
        port = 20000 + 1500 * (worker % 8) + next(_ports) % 1500
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class Server:
    def __init__(self, home: Path, *args: str, api_key: str | None = None, env: dict | None = None):
        self.api_key = api_key
        for _ in range(3):  # a port found free can be taken by another worker before the server binds it
            if self._start(home, args, env):
                return
        raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")

    def _start(self, home: Path, args, env) -> bool:
        """Started (True), or lost its port to someone else (False); any other failure raises. The deadline is
        only against a hang: a loaded machine may take long to start a server."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "codellm.cli.main", "serve", "--port", str(self.port), "--log-level", "warning", *args]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        self.log_path = home / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env={**os.environ, "CODELLM_HOME": str(home), **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 900
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                text = self.log_path.read_text()
                if "address already in use" in text.lower():
                    return False
                raise RuntimeError(f"server exited: {text[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return True
            except httpx.HTTPError:
                time.sleep(0.3)
        self.proc.kill()
        raise RuntimeError("server did not start")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def served_home(tmp_path_factory, tiny_dir, adapter_dir) -> Path:
    """A registry holding the tiny model as `qwen2.5-coder:0.5b`, as `tiny-coder` (Modelfile defaults), and
    `tiny-lora` (the same base with a LoRA adapter on top, served unmerged)."""
    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    home = tmp_path_factory.mktemp("served-home")
    reg = Registry(home)
    create(reg, "qwen2.5-coder:0.5b", Modelfile(from_=str(tiny_dir)))
    create(reg, "tiny-coder", Modelfile(from_="qwen2.5-coder:0.5b", parameters={"temperature": 0.0}))
    create(reg, "tiny-lora", Modelfile(from_="qwen2.5-coder:0.5b", adapters=[str(adapter_dir)], parameters={"temperature": 0.0}))
    return home


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_QUESTION = "What is the weather in Paris?"
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def teach_tiny(tiny_dir: Path, prompt: list[int], answer: list[int], out: Path, *, steps: int, loss_below: float) -> Path:
    """The tiny model trained to answer ``prompt`` with ``answer`` (token ids), saved to ``out`` with the tiny model's
    tokenizer and generation config: a real model whose output for one prompt is known."""
    return cached_build(out, lambda d: _teach(tiny_dir, prompt, answer, d, steps=steps, loss_below=loss_below),
                        digest_of(tiny_dir), prompt, answer, steps, loss_below)


def _teach(tiny_dir: Path, prompt: list[int], answer: list[int], out: Path, *, steps: int, loss_below: float) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = torch.tensor([prompt + answer])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < loss_below:
            break
    model.save_pretrained(out)
    for f in tiny_dir.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="session")
def tool_home(tmp_path_factory, tiny_dir) -> Path:
    """A registry with `tool-coder`: the tiny model taught to answer the weather question with a Hermes
    tool call, for exactly the prompt codellm renders (tools described through the chat template path)."""
    from codellm.engine import prompts
    from codellm.engine.loader import load
    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    home = tmp_path_factory.mktemp("tool-home")
    reg = Registry(home)
    create(reg, "base", Modelfile(from_=str(tiny_dir)))
    lm = load(reg, "base")
    prompt = prompts.chat_prompt(lm, [{"role": "user", "content": WEATHER_QUESTION}], tools=[WEATHER_TOOL])
    answer = lm.tokenizer(WEATHER_CALL + "<|im_end|>", add_special_tokens=False)["input_ids"]
    out = teach_tiny(tiny_dir, prompt, answer, tmp_path_factory.mktemp("tool-model") / "model", steps=150, loss_below=0.01)
    create(reg, "qwen2.5-coder-tools", Modelfile(from_=str(out), parameters={"temperature": 0.0}))
    # the names deploy/editors/ uses, so the replay tests can read those files as they are
    reg.copy("qwen2.5-coder-tools", "qwen2.5-coder:1.5b")
    reg.copy("qwen2.5-coder-tools", "qwen2.5-coder:1.5b-base")
    embed_dir, rerank_dir = encoder_dirs(tmp_path_factory)
    create(reg, "bge-small:en-v1.5", Modelfile(from_=str(embed_dir)))
    create(reg, "bge-reranker:base", Modelfile(from_=str(rerank_dir)))
    return home


def encoder_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BERT sentence encoder and a tiny cross-encoder (random weights, real tokenizer)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from codellm.engine import tiny

    tok = tiny.build_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    dirs = []
    for name, make in (("embed", lambda: BertModel(BertConfig(**cfg))),
                       ("rerank", lambda: BertForSequenceClassification(BertConfig(**cfg, num_labels=1)))):
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(name) / "model"
        make().save_pretrained(d)
        tok.save_pretrained(d)
        tc = json.loads((d / "tokenizer_config.json").read_text())
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        (d / "tokenizer_config.json").write_text(json.dumps(tc))
        dirs.append(d)
    return dirs[0], dirs[1]
