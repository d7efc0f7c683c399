"""Built-in catalog: short names of well-known code models, their hub repos and FIM spelling."""

from __future__ import annotations

import json
from dataclasses import dataclass

from codellm.registry.manifest import FimTokens
from codellm.registry.names import ModelName

FIM = {
    "qwen2.5-coder": FimTokens(
        "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
        stop=("<|endoftext|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<|im_end|>"),
    ),
    "starcoder": FimTokens("<fim_prefix>", "<fim_suffix>", "<fim_middle>", stop=("<|endoftext|>", "<file_sep>")),
    "deepseek-coder": FimTokens(
        "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", stop=("<|EOT|>", "<｜end▁of▁sentence｜>")
    ),
    "codellama": FimTokens("<PRE> ", " <SUF>", " <MID>", stop=("<EOT>",)),
    "codestral": FimTokens("[PREFIX]", "[SUFFIX]", "", order="spm", stop=("</s>",)),
    "codegemma": FimTokens(
        "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", stop=("<|file_separator|>", "<eos>")
    ),
}


@dataclass(frozen=True)
class Entry:
    repo: str
    family: str
    description: str = ""

    @property
    def fim(self) -> FimTokens | None:
        return FIM.get(self.family)


_E = Entry
CATALOG: dict[str, Entry] = {
    "qwen2.5-coder:0.5b": _E("Qwen/Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder", "Qwen2.5 Coder 0.5B instruct"),
    "qwen2.5-coder:1.5b": _E("Qwen/Qwen2.5-Coder-1.5B-Instruct", "qwen2.5-coder", "Qwen2.5 Coder 1.5B instruct"),
    "qwen2.5-coder:3b": _E("Qwen/Qwen2.5-Coder-3B-Instruct", "qwen2.5-coder", "Qwen2.5 Coder 3B instruct"),
    "qwen2.5-coder:7b": _E("Qwen/Qwen2.5-Coder-7B-Instruct", "qwen2.5-coder", "Qwen2.5 Coder 7B instruct"),
    "qwen2.5-coder:14b": _E("Qwen/Qwen2.5-Coder-14B-Instruct", "qwen2.5-coder", "Qwen2.5 Coder 14B instruct"),
    "qwen2.5-coder:32b": _E("Qwen/Qwen2.5-Coder-32B-Instruct", "qwen2.5-coder", "Qwen2.5 Coder 32B instruct"),
    "qwen2.5-coder:0.5b-base": _E("Qwen/Qwen2.5-Coder-0.5B", "qwen2.5-coder", "Qwen2.5 Coder 0.5B base (FIM)"),
    "qwen2.5-coder:1.5b-base": _E("Qwen/Qwen2.5-Coder-1.5B", "qwen2.5-coder", "Qwen2.5 Coder 1.5B base (FIM)"),
    "qwen2.5-coder:7b-base": _E("Qwen/Qwen2.5-Coder-7B", "qwen2.5-coder", "Qwen2.5 Coder 7B base (FIM)"),
    "deepseek-coder:1.3b-instruct": _E("deepseek-ai/deepseek-coder-1.3b-instruct", "deepseek-coder"),
    "deepseek-coder:1.3b-base": _E("deepseek-ai/deepseek-coder-1.3b-base", "deepseek-coder"),
    "deepseek-coder:6.7b-instruct": _E("deepseek-ai/deepseek-coder-6.7b-instruct", "deepseek-coder"),
    "deepseek-coder:6.7b-base": _E("deepseek-ai/deepseek-coder-6.7b-base", "deepseek-coder"),
    "starcoder2:3b": _E("bigcode/starcoder2-3b", "starcoder"),
    "starcoder2:7b": _E("bigcode/starcoder2-7b", "starcoder"),
    "starcoder2:15b": _E("bigcode/starcoder2-15b", "starcoder"),
    "codellama:7b": _E("codellama/CodeLlama-7b-hf", "codellama"),
    "codellama:7b-instruct": _E("codellama/CodeLlama-7b-Instruct-hf", "codellama"),
    "codellama:7b-python": _E("codellama/CodeLlama-7b-Python-hf", "codellama"),
    "codellama:13b": _E("codellama/CodeLlama-13b-hf", "codellama"),
    "codegemma:2b": _E("google/codegemma-2b", "codegemma"),
    "llama2:7b": _E("NousResearch/Llama-2-7b-hf", "llama", "LLaMA-2 7B base (NousResearch build)"),
    "llama2:7b-chat": _E("NousResearch/Llama-2-7b-chat-hf", "llama", "LLaMA-2 7B chat (NousResearch build)"),
    "llama3.2:1b": _E("meta-llama/Llama-3.2-1B-Instruct", "llama", "Llama 3.2 1B instruct (gated)"),
    "llama3.2:1b-base": _E("meta-llama/Llama-3.2-1B", "llama", "Llama 3.2 1B base (gated)"),
    "llama3.2:3b": _E("meta-llama/Llama-3.2-3B-Instruct", "llama", "Llama 3.2 3B instruct (gated)"),
    # embeddings and rerank (encoders, served by /v1/embeddings, /api/embed, /v1/rerank)
    "bge-small:en-v1.5": _E("BAAI/bge-small-en-v1.5", "bert", "BGE small English embeddings (384-d)"),
    "all-minilm:l6-v2": _E("sentence-transformers/all-MiniLM-L6-v2", "bert", "MiniLM sentence embeddings (384-d)"),
    "bge-reranker:base": _E("BAAI/bge-reranker-base", "xlm-roberta", "BGE cross-encoder reranker"),
}
# The tag a bare name (``qwen2.5-coder``) means.
DEFAULT_TAGS = {
    "qwen2.5-coder": "1.5b",
    "deepseek-coder": "1.3b-instruct",
    "starcoder2": "3b",
    "codellama": "7b",
    "codegemma": "2b",
    "llama2": "7b-chat",
    "llama3.2": "1b",
    "bge-small": "en-v1.5",
    "all-minilm": "l6-v2",
    "bge-reranker": "base",
}
DEFAULT_MODEL = "qwen2.5-coder:0.5b"


def lookup(text: str) -> tuple[ModelName, Entry] | None:
    """Resolve a short name (``qwen2.5-coder:1.5b``, ``starcoder2``) to (registry name, entry)."""
    if "/" in text:
        return None
    name = ModelName.parse(text)
    tag = name.tag
    if ":" not in text and name.model in DEFAULT_TAGS:
        tag = DEFAULT_TAGS[name.model]
    entry = CATALOG.get(f"{name.model}:{tag}")
    if entry is None:
        return None
    return ModelName(name.namespace, name.model, tag), entry


def family_of(repo: str, model_type: str | None, special_tokens: set[str]) -> str | None:
    """Guess a model family from its repo id, architecture and tokenizer's special tokens."""
    for entry in CATALOG.values():
        if entry.repo.lower() == repo.lower():
            return entry.family
    lowered = repo.lower()
    for family, fim in FIM.items():
        if family in lowered.replace("_", "-"):
            return family
    for family, fim in FIM.items():
        marks = {fim.prefix.strip(), fim.suffix.strip(), fim.middle.strip()} - {""}
        if marks and marks <= special_tokens:
            return family
    if model_type in {"llama", "mistral", "qwen2", "gemma", "gemma2", "starcoder2"}:
        return {"starcoder2": "starcoder"}.get(model_type, model_type)
    return model_type


def special_tokens_of(tokenizer_json: bytes | None, tokenizer_config: bytes | None) -> set[str]:
    found: set[str] = set()
    if tokenizer_json:
        try:
            found |= {t["content"] for t in json.loads(tokenizer_json).get("added_tokens", [])}
        except (ValueError, TypeError, KeyError):
            pass
    if tokenizer_config:
        try:
            decoders = json.loads(tokenizer_config).get("added_tokens_decoder", {})
            found |= {v.get("content", "") for v in decoders.values()}
        except (ValueError, TypeError, AttributeError):
            pass
    return found
