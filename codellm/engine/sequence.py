"""One choice of one request, as the engine tracks it from submission to its last token."""

from __future__ import annotations

import itertools
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from codellm.engine import blocks
from codellm.engine.detok import IncrementalDetokenizer, StopMatcher
from codellm.engine.grammar import Constraint
from codellm.engine.outputs import Sink
from codellm.engine.sampling import SamplingParams

_ids = itertools.count(1)


@dataclass(eq=False)
class Sequence:
    index: int
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    max_new: int
    stop_ids: set[int]
    detok: IncrementalDetokenizer
    stops: StopMatcher
    generator: Any = None  # a seeded torch.Generator, or None: the sampler's business
    want_prompt_logprobs: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    slot: int | None = None  # its batch row (and block-table row) while running
    chain: blocks.Chain | None = None  # its KV blocks while running
    cached: int = 0  # tokens whose keys and values are in the cache
    target: int = 0  # tokens to have in the cache before decoding: the prompt (after a preemption, all but the last)
    hit: int = 0  # prompt tokens found in the prefix cache when first admitted
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    ending: bool = False  # its last token is in ``generated`` (a stop id, or its limit), its output still to come
    prompt_logprobs: list[float | None] | None = None
    constraint: Constraint | None = None  # the grammar its output follows
    adapter: str | None = None
    inflight: int = 0  # tokens decoded on the device whose ids the host has not read yet
    arrived: float = field(default_factory=time.perf_counter)
    queue_time: float | None = None  # from arrival to its first admission to a row
    speculating: bool = True  # drafts are proposed for it (off by request, or once they rarely hold)
    spec_steps: int = 0  # decode steps taken while speculating
    drafted: int = 0  # speculative draft tokens checked
    accepted: int = 0  # ... and kept
    draft_cached: int = 0  # tokens whose keys the draft model's cache holds (``drafter``)
    _packed: array | None = field(default=None, repr=False)  # ``packed``'s array, kept up to date by appending

    @property
    def pipelined(self) -> bool:
        """Its next token is the plain argmax, picked on the device: the host may read it a step later."""
        return self.params.plain_greedy and self.constraint is None

    @property
    def prefilling(self) -> bool:
        return self.cached < self.target

    @property
    def decodable(self) -> bool:
        return not self.prefilling and not self.finished and not self.ending

    @property
    def length(self) -> int:
        """len(known()), without building the list."""
        return len(self.prompt) + len(self.generated)

    def known(self) -> list[int]:
        """Every token whose keys and values belong in the cache: the prompt and what was generated."""
        return self.prompt + self.generated if self.generated else self.prompt

    def truncate(self, count: int) -> None:
        """Only the first ``count`` generated tokens kept (a stop string ended it there)."""
        del self.generated[count:]
        self._packed = None

    def packed(self) -> array:
        """``known()`` as 4-byte ints, for n-gram lookups: built once, then only what was generated since is
        added (``generated`` only grows). Converting a 1,300-token list anew cost 18 us a sequence a step."""
        if self._packed is None:
            self._packed = array("i", self.prompt)
        missing = self.length - len(self._packed)
        if missing:
            self._packed.extend(self.generated[-missing:])
        return self._packed


Chunk = tuple[Sequence, int, int]  # a sequence and the token range [start, end) of its ``known()`` to compute


def constraint(params: SamplingParams, tokenizer, eos) -> Constraint | None:
    """The grammar state of a choice that asked for one, its prefix already taken in (InvalidRequest when the
    grammar or the prefix cannot be used). The grammar, once complete, allows the model's own end tokens."""
    if not params.grammar:
        return None
    return Constraint(tokenizer, params.grammar, params.grammar_prefix, tuple(sorted(eos)))


def stop_ids(tokenizer, eos_ids, params: SamplingParams) -> tuple[set[int], list[str]]:
    """The token ids that end a choice, and the stop strings left to match in text (a stop that is a special
    token's text is matched as that token)."""
    ids = set() if params.ignore_eos else set(eos_ids)
    ids |= set(params.stop_token_ids)
    strings = []
    special = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}) or {})
    for s in params.stop:
        if s in special:
            ids.add(tokenizer.convert_tokens_to_ids(s))
        else:
            strings.append(s)
    return ids, strings
