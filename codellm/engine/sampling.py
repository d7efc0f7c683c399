"""Per-request sampling over a batch of logits: penalties, bias, temperature, top-k/p, min-p,
seeds, and log-probabilities. Rows share the work where their parameters allow."""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
import torch
from msgspec import Meta

from codellm.errors import InvalidRequest

# Bounds that keep every row's arithmetic finite (NaN and infinities fail them): a value outside them would turn
# a row's probabilities into NaN, and the sampler's failure would hit every sequence in its batch.
_Unit = Annotated[float, Meta(ge=0, le=1)]
_Finite = Annotated[float, Meta(ge=-1e4, le=1e4)]
_TokenId = Annotated[int, Meta(ge=0, lt=1 << 31)]
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1  # int64, as vLLM takes it


class SamplingParams(msgspec.Struct, omit_defaults=True):
    temperature: Annotated[float, Meta(ge=0, le=100)] = 1.0
    top_p: _Unit = 1.0
    top_k: Annotated[int, Meta(ge=-1)] = 0  # 0 or -1: off
    min_p: _Unit = 0.0
    seed: Annotated[int, Meta(ge=SEED_MIN, le=SEED_MAX)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0, le=100)] = 1.0
    repeat_last_n: Annotated[int, Meta(ge=-1)] = 64  # -1: the whole output; 0: no repetition penalty
    presence_penalty: _Finite = 0.0
    frequency_penalty: _Finite = 0.0
    logit_bias: dict[_TokenId, Annotated[float, Meta(ge=-100, le=100)]] = {}
    max_tokens: Annotated[int, Meta(ge=0)] | None = None
    stop: Annotated[list[Annotated[str, Meta(max_length=1000)]], Meta(max_length=64)] = []
    stop_token_ids: Annotated[list[_TokenId], Meta(max_length=64)] = []
    ignore_eos: bool = False
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None  # None: none; 0: the sampled token's; k: also the top k
    grammar: str = ""  # the output must follow this llguidance grammar (``engine.grammar``: JSON schemas, tool calls)
    skip_special_tokens: bool = True  # False: special tokens appear in the text (tool-call markers that are tokens)
    grammar_prefix: str = ""  # with grammar: its text already written before the output (a forced tool call's start)
    speculative: bool = True  # False: no speculative decoding for this request, where the engine offers it

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the raw logits is the token: no penalties, bias or log-probabilities to compute."""
        return (self.greedy and self.logprobs is None and not self.logit_bias and self.repetition_penalty == 1.0
                and not self.presence_penalty and not self.frequency_penalty)


def checked(values: dict, names: dict[str, str] | None = None) -> SamplingParams:
    """``SamplingParams`` from untrusted ``values``, types and bounds checked: the one gate every API's sampling
    fields pass, so that no request reaches the sampler with a value that would break its batch. ``names``
    maps a field to what the caller's API calls it, for the error message."""
    try:
        return msgspec.convert(values, SamplingParams)
    except msgspec.ValidationError as exc:
        message = str(exc)
        where = re.search(r"`\$\.(\w+)", message)
        shown = (names or {}).get(where.group(1), where.group(1)) if where else None
        detail = message.split(" - at ")[0].split(" - in ")[0]
        raise InvalidRequest(f"invalid {shown}: {detail}" if shown else f"invalid sampling parameters: {detail}",
                             param=shown) from None


def generator(seed: int | None, offset: int = 0, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded generator for choice ``offset`` of a request, on the device that samples (seeds wrap to 64 bits,
    so seed + offset always fits)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed((seed + offset) & ((1 << 64) - 1))


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` of [rows, V] logits, in two passes where V allows: a row's single reduction over a
    128k vocabulary runs as one program (tens of microseconds at batch 1 on a GPU); cut into up to 64 pieces
    reduced side by side, then the pieces' maxima, it takes a few. The first maximal index either way."""
    rows, vocab = logits.shape
    pieces = 64
    while pieces > 1 and (vocab % pieces or vocab // pieces < 256):
        pieces //= 2
    if pieces == 1:
        return logits.argmax(dim=-1)
    best, where = logits.reshape(rows, pieces, vocab // pieces).max(dim=-1)
    piece = best.argmax(dim=-1, keepdim=True)
    return (where.gather(1, piece) + piece * (vocab // pieces)).view(rows)


class TokenLogprob(msgspec.Struct, array_like=True):
    """A chosen token's log-probability and the most likely alternatives (it crosses the engine process's pipe)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


def _penalize(row: torch.Tensor, params: SamplingParams, history: list[int]) -> None:
    if not history:
        return
    if params.repetition_penalty != 1.0 and params.repeat_last_n != 0:
        recent = history[-params.repeat_last_n:] if params.repeat_last_n > 0 else history
        ids = torch.tensor(sorted(set(recent)), device=row.device)
        vals = row[ids]
        row[ids] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if params.presence_penalty or params.frequency_penalty:
        ids, counts = torch.unique(torch.tensor(history, device=row.device), return_counts=True)
        row[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(row.dtype)


def _processed(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]]) -> torch.Tensor:
    """A copy of float ``logits`` with each row's penalties and logit bias applied."""
    logits = logits.clone()
    for i, (p, hist) in enumerate(zip(params, histories)):
        _penalize(logits[i], p, hist)
        if p.logit_bias:
            ids = torch.tensor([k for k in p.logit_bias if 0 <= k < logits.shape[1]], dtype=torch.long)
            if len(ids):
                logits[i, ids] += torch.tensor([p.logit_bias[int(k)] for k in ids], dtype=logits.dtype)
    return logits


def _probabilities(sub: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """What sampled rows draw from: temperature, then top-k, min-p and top-p, renormalized."""
    temp = torch.tensor([p.temperature for p in params], device=sub.device).unsqueeze(1)
    sub = sub / temp
    top_k = [p.top_k for p in params]
    if any(k > 0 for k in top_k):
        kmax = min(max(top_k), sub.shape[1])
        kth = torch.topk(sub, kmax, dim=-1).values
        idx = torch.tensor([min(k, kmax) - 1 if k > 0 else kmax - 1 for k in top_k], device=sub.device)
        thresh = kth.gather(1, idx.unsqueeze(1))
        active = torch.tensor([k > 0 for k in top_k], device=sub.device).unsqueeze(1)
        sub = torch.where(active & (sub < thresh), torch.full_like(sub, float("-inf")), sub)
    probs = torch.softmax(sub, dim=-1)
    min_p = torch.tensor([p.min_p for p in params], device=sub.device).unsqueeze(1)
    if (min_p > 0).any():
        probs = torch.where(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0, probs)
    top_p = torch.tensor([p.top_p for p in params], device=sub.device).unsqueeze(1)
    if (top_p < 1).any():
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(dim=-1)
        drop = (cum - sorted_p) > top_p  # keep the smallest set whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_p)
    return probs / probs.sum(dim=-1, keepdim=True)


def choices(logits: torch.Tensor, params: SamplingParams, histories: list[list[int]]) -> torch.Tensor:
    """One sequence's next-token choice at several positions (row j after ``histories[j]``), as ``sample`` would
    make it: the processed logits for a greedy sequence (it takes their argmax), else the probabilities it draws
    from. Speculative decoding checks its drafts against these."""
    logits = _processed(logits.float(), [params] * len(histories), histories)
    return logits if params.greedy else _probabilities(logits, [params] * len(histories))


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
    logits = _processed(logits, params, histories)
    greedy = torch.tensor([p.greedy for p in params])
    chosen = torch.empty(len(params), dtype=torch.long)
    if greedy.any():
        chosen[greedy] = logits[greedy.to(logits.device)].argmax(dim=-1).cpu()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        probs = _probabilities(logits[rows], [params[i] for i in rows])
        # the exponential race: argmax(p / E), E ~ Exp(1), draws token t with probability p[t] (the Gumbel-max trick),
        # on the device for every row at once (a multinomial per row on the host cost ~3 ms a row at a 128k vocabulary)
        noise = torch.empty_like(probs)
        seeded = [j for j, i in enumerate(rows) if generators[i] is not None]
        if len(seeded) < len(rows):
            noise.exponential_()
        for j in seeded:
            g = generators[rows[j]]
            if g.device == noise.device:
                noise[j].exponential_(generator=g)
            else:
                noise[j] = torch.empty(noise.shape[1], device=g.device).exponential_(generator=g).to(noise.device)
        chosen[rows] = (probs / noise).argmax(dim=-1).cpu()
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
