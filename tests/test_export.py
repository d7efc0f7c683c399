"""`codellm export`: a registry model as a plain Hugging Face directory that other engines load as it is."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import run_cli


@pytest.fixture(scope="module")
def home(tmp_path_factory, served_home):
    """A copy of the served registry (the merge below adds a model to it)."""
    copy = tmp_path_factory.mktemp("export") / "home"
    shutil.copytree(served_home, copy, symlinks=True)
    return copy


def _logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_export_hf_loads_as_it_is(home, tmp_path, tiny_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = {"CODELLM_HOME": str(home)}
    out = tmp_path / "tiny-coder-hf"
    r = run_cli("export", "tiny-coder", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert "vllm serve" in r.stdout and "copying model.safetensors" in r.stderr
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json"} <= files
    assert not any(p.is_symlink() for p in out.iterdir())  # real files: the directory can be copied anywhere
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.0  # the Modelfile's default
    tok, ref_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny_dir)
    chat = [{"role": "user", "content": "write a function"}]
    assert tok.apply_chat_template(chat, tokenize=False) == ref_tok.apply_chat_template(chat, tokenize=False)
    ids = tok("def fibonacci(n):")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out), ids), _logits(base, ids))

    # an adapter stays an adapter, beside its base
    lora = tmp_path / "tiny-lora-hf"
    r = run_cli("export", "tiny-lora", str(lora), env=env)
    assert r.returncode == 0, r.stderr
    assert (lora / "adapter" / "adapter_config.json").is_file() and "--lora-modules tiny-lora=" in r.stdout
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora), lora / "adapter")
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter_dir)
    with_adapter = _logits(ref, ids)
    assert torch.equal(_logits(peft, ids), with_adapter) and not torch.equal(with_adapter, _logits(base, ids))

    # --merge: one model, the adapter folded in
    merged = tmp_path / "tiny-lora-merged-hf"
    r = run_cli("export", "tiny-lora", str(merged), "--merge", env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert not (merged / "adapter").exists()
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(merged), ids), with_adapter, atol=1e-4)

    # a directory in use is refused, and nothing is left half-written
    r = run_cli("export", "tiny-coder", str(out), env=env)
    assert r.returncode == 1 and "not empty" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-coder-hf", "tiny-lora-hf", "tiny-lora-merged-hf"]
    r = run_cli("export", "no-such-model", str(tmp_path / "x"), env=env)
    assert r.returncode == 1 and not (tmp_path / "x").exists()


def test_export_gguf_reads_back_and_writes_an_ollama_modelfile(tmp_path):
    """A model on Qwen2.5's real vocabulary and chat template, through llama.cpp's own converter: the GGUF computes
    the model's logits when transformers reads it back (the export's own check, f32: top-1 agreement 1.000 and the
    largest difference printed), carries the tokenizer and its chat template, and the
    Modelfile beside it has a Go TEMPLATE that renders conversations as the Jinja template does, the default
    system prompt, the stop token and the model's PARAMETERs."""
    import gguf
    from transformers import AutoTokenizer

    import realvocab
    from codellm.engine.templates import go_template, render_chat
    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile, parse

    realvocab.require_assets()
    convert = realvocab.LLAMA_CPP / "convert"
    src = realvocab.build(realvocab.FAMILIES["qwen2.5-coder"], tmp_path / "src")
    home = tmp_path / "home"
    create(Registry(home), "qcoder", Modelfile(from_=str(src), parameters={"temperature": 0.2, "top_k": 20}))
    out = tmp_path / "exported"
    env = {"CODELLM_HOME": str(home)}
    r = run_cli("export", "qcoder", str(out), "--format", "gguf", "--gguf-type", "f32", "--llama-cpp", str(convert),
                env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checked: top-1 agreement 1.000" in r.stderr and "ollama create" in r.stdout
    assert float(r.stderr.split("largest logit difference ")[1].split()[0]) < 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind

    reader = gguf.GGUFReader(out / "model.gguf")
    meta = {f.name: f for f in reader.fields.values()}

    def text(key):
        f = meta[key]
        return bytes(f.parts[f.data[0]]).decode()
    assert text("general.architecture") == "llama" and text("tokenizer.ggml.model") == "gpt2"
    assert "<|im_start|>" in text("tokenizer.chat_template")
    tok = AutoTokenizer.from_pretrained(src)
    mf = parse((out / "Modelfile").read_text())
    assert mf.from_ == "./model.gguf" and mf.system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert mf.parameters["temperature"] == 0.2 and mf.parameters["top_k"] == 20 and "<|im_end|>" in mf.parameters["stop"]
    convo = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "sort a list"},
             {"role": "assistant", "content": "sorted(xs)"}, {"role": "user", "content": "and reverse it"}]
    ollama = go_template(mf.template, system="Answer in Python.", prompt="sort a list", response="sorted(xs)") + \
        go_template(mf.template, system="", prompt="and reverse it", response="")
    assert ollama == render_chat(tok, convo, add_generation_prompt=True)
    alone = go_template(mf.template, system=mf.system, prompt="sort a list", response="")
    assert alone == render_chat(tok, convo[1:2], add_generation_prompt=True)


def test_export_gguf_refuses_what_it_cannot_write_whole(home, tmp_path):
    """An adapter must be merged first; a converter that fails leaves no directory and no staging behind; a
    non-empty directory is never written into."""
    env = {"CODELLM_HOME": str(home)}
    r = run_cli("export", "tiny-lora", str(tmp_path / "a"), "--format", "gguf", env=env)
    assert r.returncode != 0 and "--merge" in r.stderr and not (tmp_path / "a").exists()
    broken = tmp_path / "llama.cpp"
    (broken / "gguf-py").mkdir(parents=True)
    (broken / "convert_hf_to_gguf.py").write_text("import sys\nsys.exit('this converter is broken')\n")
    r = run_cli("export", "tiny-coder", str(tmp_path / "b"), "--format", "gguf", "--llama-cpp", str(broken), env=env)
    assert r.returncode != 0 and "this converter is broken" in r.stderr
    assert not (tmp_path / "b").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep").write_text("x")
    r = run_cli("export", "tiny-coder", str(tmp_path / "c"), "--format", "gguf", "--llama-cpp", str(broken), env=env)
    assert r.returncode != 0 and "not empty" in r.stderr and (tmp_path / "c" / "keep").read_text() == "x"
