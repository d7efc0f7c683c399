"""Embeddings from a loaded model: mean of the last hidden states over the tokens, L2-normalized.

Runs beside the engine thread (outside a batch context the attention falls back to plain SDPA),
one request at a time per model.
"""

from __future__ import annotations

import threading

import torch

from codellm.engine.loader import LoadedModel

_locks: dict[int, threading.Lock] = {}


Inputs = list  # texts (str), or token-id lists already tokenized for the model (what LangChain sends by default)


def inputs(value) -> Inputs:
    """An embeddings request's input in any of OpenAI's four shapes (a string, strings, token ids, lists of token
    ids) as a list of texts or of token-id lists."""
    from codellm.errors import InvalidRequest

    def ids(item) -> bool:
        return isinstance(item, list) and bool(item) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)

    if isinstance(value, str) or ids(value):
        return [value]
    if isinstance(value, list) and value and (all(isinstance(t, str) for t in value) or all(map(ids, value))):
        return list(value)
    raise InvalidRequest("input must be a string, a list of strings, a list of token ids, or a list of those lists",
                         param="input")


def token_ids(tokenizer, item, *, add_special_tokens: bool = True) -> list[int]:
    """The ids of one input: a text tokenized, or token ids checked against the vocabulary."""
    from codellm.errors import InvalidRequest

    if isinstance(item, str):
        return tokenizer(item, add_special_tokens=add_special_tokens)["input_ids"]
    vocab = len(tokenizer)
    if any(t < 0 or t >= vocab for t in item):
        raise InvalidRequest(f"input token ids must be integers in [0, {vocab})", param="input")
    return list(item)


def embed(lm: LoadedModel, texts: Inputs, *, truncate: bool = True) -> tuple[list[list[float]], int]:
    from codellm.errors import ContextLengthExceeded, InvalidRequest

    if not texts:
        raise InvalidRequest("input must not be empty", param="input")
    lock = _locks.setdefault(id(lm.model), threading.Lock())
    vectors, total = [], 0
    with lock, torch.inference_mode():
        for text in texts:
            ids = token_ids(lm.tokenizer, text) or [lm.tokenizer.eos_token_id or 0]
            if len(ids) > lm.max_len:
                if not truncate:
                    raise ContextLengthExceeded(f"input of {len(ids)} tokens exceeds the context length {lm.max_len}",
                                                param="input")
                ids = ids[:lm.max_len]
            total += len(ids)
            extra = {"adapter_names": [lm.adapter or "__base__"]} if getattr(lm.model, "peft_config", None) else {}
            out = lm.model(input_ids=torch.tensor([ids], device=lm.device), output_hidden_states=True, use_cache=False,
                           logits_to_keep=1, **extra)
            vec = out.hidden_states[-1][0].float().mean(dim=0)
            vectors.append(torch.nn.functional.normalize(vec, dim=0).cpu().tolist())
    return vectors, total


def embed_served(served, texts: Inputs, *, truncate: bool = True) -> tuple[list[list[float]], int]:
    """Embeddings from whatever ``served`` is: an encoder model, or a generative one (mean-pooled)."""
    if served.encoder is not None:
        if not texts:
            from codellm.errors import InvalidRequest

            raise InvalidRequest("input must not be empty", param="input")
        return served.encoder.embed(texts, truncate=truncate)
    return served.engine.embed(served.lm, texts, truncate=truncate)  # where the weights are: here or a child process


def shorten(vectors: list[list[float]], dimensions: int | None) -> list[list[float]]:
    """The first ``dimensions`` of each vector, L2-normalized again (Matryoshka-style truncation)."""
    if not dimensions:
        return vectors
    out = []
    for v in vectors:
        head = v[:dimensions]
        norm = sum(x * x for x in head) ** 0.5 or 1.0
        out.append([x / norm for x in head])
    return out
