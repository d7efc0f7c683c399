"""Encoder models for embeddings and reranking (BERT-style sentence encoders, cross-encoders).

They run outside the generation engine, one request at a time per model: requests are short and
batched by the caller (a list of inputs, or a query with its documents).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from codellm.errors import ContextLengthExceeded, InvalidRequest


@dataclass
class Encoder:
    name: str
    task: str  # embed | rerank
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    max_len: int

    def __post_init__(self):
        self.lock = threading.Lock()

    def _batch(self, texts, pairs=None, truncate=True):
        if pairs is None and texts and not isinstance(texts[0], str):  # token ids, as the client tokenized them
            from codellm.engine.embeddings import token_ids

            ids = [token_ids(self.tokenizer, t)[: self.max_len if truncate else None] for t in texts]
            enc = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        else:
            enc = self.tokenizer(texts, pairs, padding=True, truncation=truncate, max_length=self.max_len,
                                 return_tensors="pt")
        if not truncate and enc["input_ids"].shape[1] > self.max_len:
            raise ContextLengthExceeded(f"input exceeds the context length {self.max_len}", param="input")
        return {k: v.to(self.device) for k, v in enc.items()}

    def embed(self, texts: list[str], *, truncate: bool = True) -> tuple[list[list[float]], int]:
        """Mean of the last hidden states over real tokens, L2-normalized (sentence-transformers' default)."""
        if self.task != "embed":
            raise InvalidRequest(f"{self.name} is a reranker, not an embedding model", param="model")
        with self.lock, torch.inference_mode():
            enc = self._batch(texts, truncate=truncate)
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            vecs = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
        return vecs.cpu().tolist(), int(enc["attention_mask"].sum())

    def rerank(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        """Relevance of each document to the query: a cross-encoder's sigmoid score, or embedding cosine."""
        if self.task == "rerank":
            with self.lock, torch.inference_mode():
                enc = self._batch([query] * len(documents), documents)
                logits = self.model(**enc).logits.float()
                scores = torch.sigmoid(logits[:, 0] if logits.shape[-1] == 1 else logits.softmax(-1)[:, -1].logit())
            return scores.cpu().tolist(), int(enc["attention_mask"].sum())
        vecs, n = self.embed([query] + documents)
        q = torch.tensor(vecs[0])
        return [float(torch.dot(q, torch.tensor(v))) for v in vecs[1:]], n


def load_encoder(registry, entry, *, device=None, dtype=None, trust_remote_code=False) -> Encoder:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from codellm.engine.loader import DEFAULT_NUM_CTX, pick_device, weights_identity
    from codellm.registry import manifest as mt

    manifest = entry.manifest
    directory = registry.files_dir(manifest, mt.FILE_LAYERS - {mt.ADAPTER}, key=f"w{weights_identity(manifest)}")
    dev, torch_dtype = pick_device(device, dtype)
    cls = AutoModelForSequenceClassification if manifest.config.task == "rerank" else AutoModel
    model = cls.from_pretrained(directory, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    max_len = min(manifest.config.context_length or DEFAULT_NUM_CTX, getattr(tokenizer, "model_max_length", 10**9))
    return Encoder(str(entry.name), manifest.config.task, model.to(dev).eval(), tokenizer, dev, max_len)
