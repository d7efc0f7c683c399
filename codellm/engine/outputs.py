"""From sampled token ids to what a request hears: text, stop strings, finish reasons.

Everything here is host work on sequences, no tensors. ``Output`` and ``Stats`` are msgspec Structs
because they also cross the engine process's pipe (``remote``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import msgspec

from codellm.engine.sampling import TokenLogprob

if TYPE_CHECKING:
    from codellm.engine.sequence import Sequence


class Output(msgspec.Struct):
    """One step's news for one sequence (choice ``index`` of its request)."""

    index: int
    text: str = ""
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] = []
    finish_reason: str | None = None  # stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: list[float | None] | None = None
    error: str | None = None
    stop: str | None = None  # the stop string that ended the choice (finish_reason "stop")
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    queue_time: float | None = None  # on a choice's first output: seconds it waited for a row and its KV blocks
    drafted_tokens: int = 0  # speculative drafts checked for this choice so far
    accepted_tokens: int = 0  # ... and kept


Sink = Callable[[Output], None]


class Stats(msgspec.Struct):
    steps: int = 0
    decode_tokens: int = 0
    prefill_tokens: int = 0
    max_batch: int = 0
    rides: int = 0  # decode rows that rode in a prefill's forward
    batch_sizes: dict[int, int] = {}  # decode steps by batch size
    finished: int = 0
    cancelled: int = 0
    preempted: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, found
    kv_blocks: int = 0
    kv_used: int = 0
    adapters: int = 0  # LoRA adapters on the weights
    spec_drafts: int = 0  # speculative verification rows (a sequence's drafts checked in one step)
    spec_draft_tokens: int = 0
    spec_accepted: int = 0


def final(seq: "Sequence", reason: str, error: str | None = None) -> Output:
    """The output that ends ``seq`` when nothing else is left to say (cancelled, failed, asked for no tokens)."""
    return Output(index=seq.index, prompt_tokens=len(seq.prompt), completion_tokens=len(seq.generated),
                  cached_tokens=seq.hit, drafted_tokens=seq.drafted, accepted_tokens=seq.accepted,
                  finish_reason=reason, error=error, stop=seq.stops.matched)


def process(batch: list["Sequence"], tokens: list[int], infos: list[TokenLogprob | None],
            counts: list[int] | None = None) -> list[Output]:
    """Each sequence's output for a token already appended to ``generated``: its text with stop strings held back or
    cut, and ``finish_reason`` set when the sequence ends here (stop id, stop string, the end of its grammar, or its
    token limit). ``counts``: each token's place in ``generated`` (counted from 1) where it is not the newest."""
    pieces = detokenize(batch, tokens)
    outs = []
    for row, (seq, token, info, piece) in enumerate(zip(batch, tokens, infos, pieces)):
        count = counts[row] if counts is not None else len(seq.generated)
        out = Output(index=seq.index, prompt_tokens=len(seq.prompt), completion_tokens=count,
                     cached_tokens=seq.hit, drafted_tokens=seq.drafted, accepted_tokens=seq.accepted)
        if count == 1:
            out.queue_time = seq.queue_time
            if seq.prompt_logprobs is not None:
                out.prompt_logprobs = seq.prompt_logprobs
        if token in seq.stop_ids:
            out.finish_reason = "stop"
            out.text = _rest(seq)
        else:
            out.text = seq.stops.feed(piece)
            out.token_ids = [token]
            if info is not None:
                out.logprobs = [info]
            ended = seq.stops.stopped or (seq.constraint is not None and seq.constraint.done)
            if ended or count >= seq.max_new:
                out.text += _rest(seq)
                out.finish_reason = "stop" if ended or seq.stops.stopped else "length"
        out.stop = seq.stops.matched if out.finish_reason else None
        outs.append(out)
    return outs


def merge(first: Output, then: Output) -> Output:
    """One output saying what two consecutive ones of the same choice say (several tokens of one step)."""
    return msgspec.structs.replace(
        then, text=first.text + then.text, token_ids=first.token_ids + then.token_ids,
        logprobs=first.logprobs + then.logprobs, prompt_logprobs=first.prompt_logprobs or then.prompt_logprobs,
        queue_time=first.queue_time if first.queue_time is not None else then.queue_time)


def _rest(seq: "Sequence") -> str:
    """The text a finishing sequence still holds: the detokenizer's last bytes, and the tail kept back for stop
    strings unless one matched."""
    text = seq.stops.feed(seq.detok.flush())
    return text + ("" if seq.stops.stopped else seq.stops.flush())


# windows (two a sequence) from which one batched decode beats a call each: the batch call hands work to a thread
# pool, about 20 us whatever its size, ten times a lone sequence's two decodes (a decode step at one stream)
_BATCH_DECODE_FROM = 64


def detokenize(batch: list["Sequence"], tokens: list[int]) -> list[str]:
    """Each sequence's new text: a table lookup for most tokens (``detok.pieces_of``), and for the rest one batched
    decode per tokenizer instead of two calls per sequence."""
    pieces: list[str] = [""] * len(batch)
    groups: dict[int, list[int]] = {}
    windows: dict[int, tuple[list[int], list[int]]] = {}
    for row, (seq, token) in enumerate(zip(batch, tokens)):
        if token in seq.stop_ids:
            continue
        piece = seq.detok.known(token)
        if piece is not None:
            pieces[row] = piece
            continue
        windows[row] = seq.detok.windows(token)
        groups.setdefault((id(seq.detok.tokenizer), seq.detok.skip), []).append(row)
    for (_, skip), rows in groups.items():
        tok = batch[rows[0]].detok.tokenizer
        flat = [w for row in rows for w in windows[row]]
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None and len(flat) < _BATCH_DECODE_FROM:  # a few: the Rust decode, one call each
            texts = [backend.decode(w, skip_special_tokens=skip) for w in flat]
        elif backend is not None:  # many: its batch decode, without transformers' per-item Python
            texts = backend.decode_batch(flat, skip_special_tokens=skip)  # (3x less host time at 256 rows)
        else:
            texts = tok.batch_decode(flat, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        for i, row in enumerate(rows):
            pieces[row] = batch[row].detok.commit(texts[2 * i], texts[2 * i + 1])
    return pieces
