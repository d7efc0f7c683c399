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
