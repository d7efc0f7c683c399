"""Speculative decoding by prompt lookup: what a code assistant writes is often already in its context (an edit
re-emits the file it was given, an agent quotes the tool output it just read), so the tokens that followed the
last n tokens the previous time they appeared are proposed as the next ones, and the model checks them all in
one forward pass.

Pure host work on token lists, no tensors but the probability rows ``accept`` is given:

- ``propose``: up to k draft tokens, from the latest earlier occurrence of the longest suffix (n_max down to
  n_min tokens) found in the prompt and what was generated;
- ``accept``: which drafts the model keeps, given its distributions at each draft position. Greedy rows keep
  the drafts that equal the argmax, then the argmax where they differ: token for token the output without
  speculation. Sampled rows use rejection sampling against the draft's point mass: draft ``d`` is kept with
  probability p(d); on rejection the token is drawn from p with ``d`` removed; after every draft is kept one more
  is drawn from the last distribution. The output's distribution is the model's, unchanged.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass

import msgspec
import torch


class SpeculativeConfig(msgspec.Struct, frozen=True):
    method: str = "ngram"  # "ngram": prompt lookup; "draft": a small model of the same vocabulary (``drafter``)
    num_tokens: int = 4  # drafts proposed at most per step
    draft: str | None = None  # the draft model's registry name (method "draft")
    ngram_max: int = 4  # the longest suffix looked up
    ngram_min: int = 2
    max_batch: int = 32  # never speculate with more sequences decoding than this
    # a sequence stops speculating once, after ``warmup`` steps, its kept drafts add fewer than ``min_gain`` tokens
    # a step on average: a step that speculates cannot overlap the host's work with the device's
    min_gain: float = 0.5
    warmup: int = 16

    @property
    def verify_rows(self) -> int:
        """Rows the widest check takes: every sequence that may speculate at once, its last token and its drafts."""
        return self.max_batch * (self.num_tokens + 1)

    @property
    def verify_run(self) -> int:
        """Rows one sequence has in a check: its last token and its drafts."""
        return self.num_tokens + 1


class Pace:
    """Whether speculating pays at a batch size, learnt from the engine's own steps: windows of ``window`` steps of
    one way (speculating or not) are timed whole, per batch size (rounded up to a power of two), and their tokens a
    second kept as moving averages. Whole windows, because a plain step overlaps the host's work with the device's:
    its device time is paid in the step after it, which a step-by-step clock would charge to whichever step comes
    next. The first step of a window is not timed for the same reason, nor is one after idling, though they count
    towards it. Steps that prefill are timed: each way meets the same prompts per token it outputs. The
    better way is taken, and the other tried again every ``explore`` windows (four times as rarely when it was more
    than 25% behind), since what pays changes with the traffic: on a GPU a step of a few sequences costs about the
    same with five tokens each as with one, on a CPU five times as much. A larger batch pays less for speculating than a smaller one, so a batch size
    not yet measured starts without it where a smaller one found it did not pay."""

    def __init__(self, window: int = 8, explore: int = 16):
        self.window, self.explore = window, explore
        self.rate: dict[tuple[bool, int], float] = {}
        self._open: dict[int, list] = {}  # by bucket: [speculating, steps left, tokens, seconds] of its window
        self.windows: Counter = Counter()

    @staticmethod
    def bucket(n: int) -> int:
        return 1 << max(0, n - 1).bit_length()

    def choose(self, n: int) -> bool:
        b = self.bucket(n)
        win = self._open.get(b)
        if win is None or win[1] <= 0:
            self.windows[b] += 1
            spec, plain = self.rate.get((True, b)), self.rate.get((False, b))
            if spec is not None and plain is not None:
                best, gap = spec >= plain, max(spec, plain) / max(min(spec, plain), 1e-9)
            elif spec is None and self._verdict_below(b) is False:
                best, gap = False, 1.0  # it lost with fewer sequences: it loses with more, until tried here
            else:
                best, gap = None, 1.0
            if best is None and win is not None and win[3] == 0:
                way = not win[0]  # the last window had no step to time (all prefilled): the other way meanwhile
            elif best is None:
                way = spec is None  # each way once, speculating first
            else:  # the loser is tried again, the less often the further behind it was
                every = self.explore if gap < 1.25 else 4 * self.explore
                way = (not best) if self.windows[b] % every == 0 else best
            win = self._open[b] = [way, self.window + 1, 0, 0.0]
        return win[0]

    def _verdict_below(self, b: int) -> bool | None:
        """Whether speculating won at the largest smaller batch size measured both ways (None: none was)."""
        for smaller in sorted((s for w, s in self.rate if s < b), reverse=True):
            spec, plain = self.rate.get((True, smaller)), self.rate.get((False, smaller))
            if spec is not None and plain is not None:
                return spec >= plain
        return None

    def record(self, speculated: bool, n: int, tokens: int, seconds: float | None) -> None:
        """A step of ``n`` sequences that took ``seconds`` and output ``tokens``; ``seconds`` None: a step that is
        not timed (it came after idling) but counts towards its window all the same."""
        b = self.bucket(n)
        win = self._open.get(b)
        if win is None or win[0] != speculated or win[1] <= 0:
            return
        win[1] -= 1
        if win[1] < self.window and seconds is not None:  # not the window's first step
            win[2] += tokens
            win[3] += seconds
        if win[1] == 0 and win[3] > 0:  # (a window of untimed steps only says nothing)
            key = (speculated, b)
            rate = win[2] / max(win[3], 1e-6)
            self.rate[key] = rate if key not in self.rate else 0.7 * self.rate[key] + 0.3 * rate


def propose(tokens: list[int] | array, k: int, n_max: int = 4, n_min: int = 2) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix of ``tokens`` (between
    ``n_max`` and ``n_min`` tokens long); [] where none recurs. ``tokens`` may be a 4-byte ``array``
    (``Sequence.packed``), which saves converting it."""
    if k <= 0 or len(tokens) <= n_min:
        return []
    data = (tokens if isinstance(tokens, array) else array("i", tokens)).tobytes()  # a C-speed search over 4-byte tokens
    size = len(data) // len(tokens)
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        tail = data[-n * size:]
        end = len(data) - size  # an occurrence must end before the last token: the suffix itself is not one
        while True:
            at = data.rfind(tail, 0, end)
            if at < 0:
                break
            if at % size == 0:
                start = at // size + n
                return list(tokens[start:start + k])
            end = at + len(tail) - 1
    return []


@dataclass
class Verdict:
    tokens: list[int]  # the tokens to emit: the kept drafts, then one the model chose
    accepted: int  # drafts kept


def accept(drafts: list[int], greedy: bool, rows: torch.Tensor, generator: torch.Generator | None = None) -> Verdict:
    """``rows`` [len(drafts) + 1, V]: the model's next-token choice at each draft position (greedy: processed
    logits, whose argmax it picks; sampled: probabilities, each row summing to 1)."""
    if greedy:
        return keep_agreeing(drafts, rows.argmax(dim=-1).tolist())
    probs = rows.float().cpu()
    u = torch.rand(len(drafts) + 1, generator=generator if generator is not None and generator.device.type == "cpu"
                   else None)
    for j, d in enumerate(drafts):
        p = probs[j]
        if u[j] < p[d]:
            continue
        rest = p.clone()
        rest[d] = 0.0
        total = rest.sum()
        if total <= 0:  # p was all on d: a rejection cannot happen, but float error said so
            continue
        return Verdict(drafts[:j] + [_draw(rest / total, generator)], j)
    return Verdict(drafts + [_draw(probs[len(drafts)], generator)], len(drafts))


def keep_agreeing(drafts: list[int], best: list[int]) -> Verdict:
    """Greedy: the drafts that equal the model's choices ``best`` (one a position), then its choice where they part."""
    kept = 0
    while kept < len(drafts) and drafts[kept] == best[kept]:
        kept += 1
    return Verdict(drafts[:kept] + [best[kept]], kept)


def _draw(p: torch.Tensor, generator: torch.Generator | None) -> int:
    g = generator if generator is not None and generator.device.type == "cpu" else None
    return int(torch.multinomial(p, 1, generator=g))
