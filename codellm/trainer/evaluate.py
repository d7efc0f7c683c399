"""Evaluation on the held-out split: mean token loss over every eval example, and chrF of greedy
generations against the reference answers for a few of them.

chrF comes from sacrebleu with ``whitespace=True``: its default drops whitespace, which for code would
score a completion with the indentation wrong as perfect."""

from __future__ import annotations

import torch

from codellm.trainer.loss import CausalLMLoss, collate, labelled_tokens
from codellm.trainer.prompts import IGNORE


def eval_loss(loss: CausalLMLoss, items: list[tuple[list[int], list[int]]], batch_size: int, pad: int,
              device: torch.device) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            batch = items[i:i + batch_size]
            ids, labels, mask, positions = (t.to(device) if t is not None else None for t in collate(batch, pad))
            total += float(loss(ids, labels, mask, positions))
            count += labelled_tokens(batch)
    return total / max(1, count)


def split_prompt(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, reference response ids) of one encoded example."""
    first = next((i for i, t in enumerate(labels) if t != IGNORE), len(ids))
    return ids[:first], ids[first:]


def generate_samples(model, tokenizer, items: list[tuple[list[int], list[int]]], device: torch.device,
                     max_new: int = 256, synced: bool = False) -> list[tuple[str, str]]:
    """(generated, reference) text pairs, greedy, one example at a time (no padding effects). ``synced``: a
    sharded model, whose every rank generates alike, each step until all ranks are done."""
    pairs = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
    with torch.no_grad():
        for ids, labels in items:
            prompt, reference = split_prompt(ids, labels)
            if not prompt:
                continue
            out = model.generate(input_ids=torch.tensor([prompt], device=device),
                                 attention_mask=torch.ones((1, len(prompt)), dtype=torch.long, device=device),
                                 max_new_tokens=min(max_new, len(reference) + 16), do_sample=False,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
            text = tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
            pairs.append((text, tokenizer.decode(reference, skip_special_tokens=True)))
    return pairs


def chrf(pairs: list[tuple[str, str]]) -> float:
    from sacrebleu.metrics import CHRF

    if not pairs:
        return float("nan")
    return CHRF(whitespace=True).corpus_score([g for g, _ in pairs], [[r for _, r in pairs]]).score
