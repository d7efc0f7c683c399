"""Embeddings from a loaded model: mean of the last hidden states over the tokens, L2-normalized.

Runs beside the engine thread (outside a batch context the attention falls back to plain SDPA),
one request at a time per model.
"""

from __future__ import annotations

import threading

import torch

from codellm.engine.loader import LoadedModel

_locks: dict[int, threading.Lock] = {}


def embed(lm: LoadedModel, texts: list[str], *, truncate: bool = True) -> tuple[list[list[float]], int]:
    from codellm.errors import ContextLengthExceeded, InvalidRequest

    if not texts:
        raise InvalidRequest("input must not be empty", param="input")
    lock = _locks.setdefault(id(lm.model), threading.Lock())
    vectors, total = [], 0
    with lock, torch.inference_mode():
        for text in texts:
            ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"] or [lm.tokenizer.eos_token_id or 0]
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


def embed_served(served, texts: list[str], *, truncate: bool = True) -> tuple[list[list[float]], int]:
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
