"""Per-request sampling over a batch of logits: penalties, bias, temperature, top-k/p, min-p,
seeds, and log-probabilities. Rows share the work where their parameters allow."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import torch


class SamplingParams(msgspec.Struct, omit_defaults=True):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = {}
    max_tokens: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: also the top k
    json_object: bool = False  # constrain the output to one JSON object (response_format json_object)
    json_prefix: str = ""  # with json_object: the object's text already written before the output (a forced tool call)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the raw logits is the token: no penalties, bias or log-probabilities to compute."""
        return (self.greedy and self.logprobs is None and not self.logit_bias and self.repetition_penalty == 1.0
                and not self.presence_penalty and not self.frequency_penalty)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def _penalize(row: torch.Tensor, params: SamplingParams, history: list[int]) -> None:
    if not history:
        return
    if params.repetition_penalty != 1.0:
        recent = history[-params.repeat_last_n:] if params.repeat_last_n > 0 else history
        ids = torch.tensor(sorted(set(recent)), device=row.device)
        vals = row[ids]
        row[ids] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if params.presence_penalty or params.frequency_penalty:
        ids, counts = torch.unique(torch.tensor(history, device=row.device), return_counts=True)
        row[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(row.dtype)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    histories: list[list[int]],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Pick one token per row of ``logits`` [B, V]; ``histories`` are each row's generated ids."""
    if all(p.plain_greedy for p in params):
        return logits.argmax(dim=-1).tolist(), [None] * len(params)  # the common case: one op, one sync
    logits = logits.float()
    want_logprobs = any(p.logprobs is not None for p in params)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    logits = logits.clone()
    for i, (p, hist) in enumerate(zip(params, histories)):
        _penalize(logits[i], p, hist)
        if p.logit_bias:
            ids = torch.tensor([k for k in p.logit_bias if 0 <= k < logits.shape[1]], dtype=torch.long)
            if len(ids):
                logits[i, ids] += torch.tensor([p.logit_bias[int(k)] for k in ids], dtype=logits.dtype)
    greedy = torch.tensor([p.greedy for p in params])
    chosen = torch.empty(len(params), dtype=torch.long)
    if greedy.any():
        chosen[greedy] = logits[greedy.to(logits.device)].argmax(dim=-1).cpu()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        sub = logits[rows]
        temp = torch.tensor([params[i].temperature for i in rows], device=sub.device).unsqueeze(1)
        sub = sub / temp
        top_k = [params[i].top_k for i in rows]
        if any(k > 0 for k in top_k):
            kmax = min(max(top_k), sub.shape[1])
            kth = torch.topk(sub, kmax, dim=-1).values
            idx = torch.tensor([min(k, kmax) - 1 if k > 0 else kmax - 1 for k in top_k], device=sub.device)
            thresh = kth.gather(1, idx.unsqueeze(1))
            active = torch.tensor([k > 0 for k in top_k], device=sub.device).unsqueeze(1)
            sub = torch.where(active & (sub < thresh), torch.full_like(sub, float("-inf")), sub)
        probs = torch.softmax(sub, dim=-1)
        min_p = torch.tensor([params[i].min_p for i in rows], device=sub.device).unsqueeze(1)
        if (min_p > 0).any():
            probs = torch.where(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0, probs)
        top_p = torch.tensor([params[i].top_p for i in rows], device=sub.device).unsqueeze(1)
        if (top_p < 1).any():
            sorted_p, order = probs.sort(dim=-1, descending=True)
            cum = sorted_p.cumsum(dim=-1)
            drop = (cum - sorted_p) > top_p  # keep the smallest set whose mass reaches top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        probs_cpu = probs.cpu()
        for j, i in enumerate(rows):
            chosen[i] = torch.multinomial(probs_cpu[j], 1, generator=generators[i]).item()
    out_ids = chosen.tolist()
    info: list[TokenLogprob | None] = []
    for i, p in enumerate(params):
        if p.logprobs is None:
            info.append(None)
            continue
        lp = raw_logprobs[i]
        top = []
        if p.logprobs > 0:
            vals, ids = torch.topk(lp, min(p.logprobs, lp.shape[0]))
            top = list(zip(ids.tolist(), vals.tolist()))
        info.append(TokenLogprob(out_ids[i], float(lp[out_ids[i]]), top))
    return out_ids, info
