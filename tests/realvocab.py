"""Tiny models on real tokenizers and chat templates: llama.cpp's vocabularies (``ggml-vocab-*.gguf``, turned into
Hugging Face tokenizers by transformers' GGUF reader) and its copies of the families' own chat templates, fetched by
``scripts/fetch_test_assets.py`` into ``tests/.assets`` (not in git).

Each ``Family`` is how a model family's hub repo looks: its vocabulary, the special tokens its tokenizer adds on top
(appended here; the real tokenizers give some of them ids inside the vocabulary's padding), its template and its
end-of-turn token.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ASSETS = Path(__file__).parent / ".assets"
LLAMA_CPP = ASSETS / "llama.cpp"

# Qwen2.5's tokenizer adds these to Qwen2's vocabulary (as ids 151646..151664, in this order).
QWEN25_ADDED = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
                "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>"]
# Mistral's control tokens of its v3 tokenizer (tool calls and their results), as its templates write them.
MISTRAL_CONTROL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                   "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[ARGS]", "[CALL_ID]"]


@dataclass(frozen=True)
class Family:
    name: str
    vocab: str  # ggml-vocab-<vocab>.gguf
    template: str | None  # templates/<template>.jinja
    eos: str  # the end of an assistant turn
    repo: str  # where the hub mirror serves it (a catalog entry's repo, where the catalog has the family)
    added: tuple[str, ...] = ()
    fim: tuple[str, str, str] | None = None  # the FIM tokens the family's spelling uses, each one token
    tool_format: str | None = None  # the call syntax its template teaches
    extra: dict = field(default_factory=dict)


FAMILIES = {f.name: f for f in [
    Family("qwen2.5-coder", "qwen2", "Qwen-Qwen2.5-7B-Instruct", "<|im_end|>", "Qwen/Qwen2.5-Coder-0.5B-Instruct",
           tuple(QWEN25_ADDED), ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), "hermes"),
    Family("qwen3-coder", "qwen2", "Qwen3-Coder", "<|im_end|>", "acme/qwen3-coder-tiny", tuple(QWEN25_ADDED),
           ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), "qwen3_coder"),
    Family("llama3.2", "llama-bpe", "meta-llama-Llama-3.2-3B-Instruct", "<|eot_id|>", "meta-llama/Llama-3.2-1B-Instruct",
           tool_format="llama3"),
    Family("llama3.1", "llama-bpe", "meta-llama-Llama-3.1-8B-Instruct", "<|eot_id|>", "acme/llama3.1-tiny",
           tool_format="llama3"),
    Family("hermes-2-pro", "llama-bpe", "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use", "<|im_end|>",
           "acme/hermes-2-pro-tiny", ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"),
           tool_format="hermes"),
    Family("mistral-nemo", "llama-spm", "mistralai-Mistral-Nemo-Instruct-2407", "</s>", "acme/mistral-nemo-tiny",
           tuple(MISTRAL_CONTROL), tool_format="mistral"),
    Family("devstral", "llama-spm", "unsloth-mistral-Devstral-Small-2507", "</s>", "acme/devstral-tiny",
           tuple(MISTRAL_CONTROL), tool_format="mistral_args"),
    Family("phi-3.5", "phi-3", "microsoft-Phi-3.5-mini-instruct", "<|end|>", "acme/phi-3.5-tiny"),
    Family("deepseek-coder", "deepseek-coder", None, "<｜end▁of▁sentence｜>", "deepseek-ai/deepseek-coder-1.3b-base",
           fim=("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")),
    Family("starcoder2", "starcoder", None, "<|endoftext|>", "bigcode/starcoder2-3b",
           fim=("<fim_prefix>", "<fim_suffix>", "<fim_middle>")),
]}
VOCABS = sorted({f.vocab for f in FAMILIES.values()})


def require_assets() -> None:
    if not (LLAMA_CPP / "VERSION").is_file():
        pytest.skip("llama.cpp's vocabularies are not fetched: run `python scripts/fetch_test_assets.py` "
                    "(scripts/setup.sh does)")


def vectors(vocab: str) -> list[str]:
    """llama.cpp's tokenizer test inputs for a vocabulary (odd whitespace, emoji, CJK, code)."""
    return (LLAMA_CPP / "vocab" / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8").split(
        "\n__ggml_vocab_test__\n")


def base_tokenizer(vocab: str):
    """The vocabulary as a Hugging Face fast tokenizer, converted once and kept beside the assets."""
    from transformers import AutoTokenizer

    require_assets()
    saved = ASSETS / "tokenizers" / vocab
    if not (saved / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(LLAMA_CPP / "vocab", gguf_file=f"ggml-vocab-{vocab}.gguf")
        tok.chat_template = None
        tmp = saved.with_name(f"{saved.name}.tmp{os.getpid()}")  # test workers may convert the same one at once
        tok.save_pretrained(tmp)
        try:
            tmp.replace(saved)
        except OSError:  # another worker's copy is there already
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(saved)


def _byte_level() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the character each byte is written as in a byte-level BPE vocabulary."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _specials_in_vocab(tok, markers) -> object:
    """``tok`` with each marker that its vocabulary holds only as an ordinary byte-level entry (the GGUF reader loses
    which entries are special) made a special token again, under the same id, as in the family's own tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    table = _byte_level()
    vocab = tok.get_vocab()
    found = {m: vocab["".join(table[b] for b in m.encode())] for m in markers
             if m not in vocab and "".join(table[b] for b in m.encode()) in vocab}
    if not found:
        return tok
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["added_tokens"] += [{"id": i, "content": m, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for m, i in found.items()]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=tok.bos_token,
                                   eos_token=tok.eos_token, unk_token=tok.unk_token, pad_token=tok.pad_token)


def tokenizer(family: Family):
    """The family's tokenizer: its vocabulary, its added special tokens, its chat template."""
    tok = _specials_in_vocab(base_tokenizer(family.vocab), (family.eos, *(family.fim or ()), *family.added))
    missing = [t for t in family.added if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    if family.template:
        tok.chat_template = (LLAMA_CPP / "templates" / f"{family.template}.jinja").read_text(encoding="utf-8")
    tok.eos_token = family.eos
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build(family: Family, directory: Path, *, hidden: int = 32) -> Path:
    """A random-weight Llama-shaped model on the family's tokenizer: real ids, real templates, tiny weights."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = tokenizer(family)
    torch.manual_seed(0)
    eos = tok.convert_tokens_to_ids(family.eos)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=eos, bos_token_id=tok.bos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[eos], pad_token_id=tok.pad_token_id)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    if family.template:  # where hub repos keep it (transformers >= 4.43 also reads it from here)
        (directory / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")
    (directory / "LICENSE").write_text("test model: random weights on a real vocabulary\n")
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return directory
