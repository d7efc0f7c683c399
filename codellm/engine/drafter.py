"""Draft-model speculation: a small model of the same vocabulary (``--draft qwen2.5-coder:0.5b`` for a 7B Qwen
coder) proposes the next k tokens greedily, and the target checks them all in one step, as it checks prompt-lookup
drafts (``speculation``).

The draft runs in the same engine, on its own paged cache: a ``ModelRunner`` of its own whose pool has as many
blocks as the target's and is indexed by the same block tables, so a sequence's blocks hold its keys in both. The
draft computes what the target computes for prompts (each prefill chunk, mirrored), and catches up on the tokens it
has not seen (the last one, and any decoded while not speculating) at the start of each drafting step. A sequence's
``draft_cached`` says how far the draft's keys are its own, and the block pool marks the blocks whose draft keys are
whole (``BlockPool.mirror``): a prompt that shares cached blocks the draft never computed (an answer decoded without
speculating, reused by the next turn) has the draft compute them first. Nothing the draft computes decides an output
token; a wrong draft key would cost only kept drafts.

One drafting step launches a catch-up (every sequence's unseen tokens as rows of the verify lane, or a packed
prefill when they are many) and k - 1 decode steps, each feeding the next on the device, and reads the k drafts of
every sequence back in one copy.
"""

from __future__ import annotations

import torch

from codellm.engine.blocks import BlockPool
from codellm.engine.loader import LoadedModel
from codellm.engine.runner import ModelRunner, kv_shape
from codellm.engine.sequence import Chunk, Sequence
from codellm.errors import InvalidRequest


def check_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    """A draft proposes token ids: they must mean the same text to the target."""
    if target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
        raise InvalidRequest(f"draft model {draft.name} does not share {target.name}'s vocabulary: "
                             "pick a smaller model of the same family", param="draft")


class Drafter:
    def __init__(self, lm: LoadedModel, *, pool: BlockPool, rows: int, verify_rows: int,
                 verify_run: int = 1, cuda_graphs: bool = True, compile: bool = False):
        self.lm = lm
        self.pool = pool  # the target's: the draft's cache has as many blocks, under the same ids
        layers, kv_heads, head_dim = kv_shape(lm.model)
        self.runner = ModelRunner(lm, blocks=pool.num_blocks, block_size=pool.size, rows=rows, layers=layers,
                                  kv_heads=kv_heads, head_dim=head_dim, cuda_graphs=cuda_graphs, compile=compile,
                                  verify_rows=verify_rows, verify_run=verify_run)
        self.verify_rows = verify_rows

    @property
    def kv_bytes(self) -> int:
        return self.runner.cache.nbytes

    def warmup(self) -> None:
        self.runner.warmup()

    def set_rows(self, seqs: list[Sequence]) -> None:
        self.runner.set_rows(seqs)

    def prefill(self, chunks: list[Chunk]) -> None:
        """The target's prompt chunks, computed by the draft too (its logits are not needed), each from where the
        draft's keys of its sequence end: the chunk's start, or earlier where it continues shared blocks the draft
        does not hold."""
        chunks = [(seq, min(start, max(seq.draft_cached, self.pool.mirrored_prefix(seq.chain))), end)
                  for seq, start, end in chunks]
        if chunks:
            self.runner.prefill(chunks)
        for seq, _, end in chunks:
            seq.draft_cached = end
            self.pool.mirror(seq.chain, end)

    def propose(self, rows: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Up to k greedy draft tokens for each (sequence, k): the draft's continuation of everything it knows."""
        known = [seq.known() for seq, _ in rows]
        starts = [min(seq.draft_cached, len(ks) - 1) for (seq, _), ks in zip(rows, known)]
        steps = max(k for _, k in rows)
        dev = self.lm.device
        slots = torch.tensor([seq.slot for seq, _ in rows], device=dev)
        with torch.inference_mode():
            if sum(len(ks) - start for ks, start in zip(known, starts)) <= self.verify_rows:
                _, argmax = self.runner.verify([(seq, ks[start:], start) for (seq, _), ks, start in zip(rows, known, starts)])
                ends, at = [], 0
                for ks, start in zip(known, starts):
                    at += len(ks) - start
                    ends.append(at - 1)
                first = argmax[torch.tensor(ends, device=dev)]
            else:  # many unseen tokens (decoded while not speculating): a packed prefill
                seqs, logits = self.runner.prefill([(seq, start, len(ks)) for (seq, _), ks, start in zip(rows, known, starts)])
                assert len(seqs) == len(rows)
                first = logits.argmax(dim=-1)
            self.runner.last_tokens.index_copy_(0, slots, first)
            drafts = [first]
            seqs = [seq for seq, _ in rows]
            for j in range(1, steps):  # draft j + 1 from draft j, on the device
                _, argmax = self.runner._decode_step(seqs, at=[len(ks) - 1 + j for ks in known])
                drafts.append(argmax.index_select(0, slots))
            tokens = torch.stack(drafts, dim=1).tolist()  # the one wait
        for seq, ks in zip(seqs, known):
            seq.draft_cached = len(ks) + steps - 1  # (past ``ks``: the drafts' keys, kept or not after the check)
            self.pool.mirror(seq.chain, len(ks))
        return [t[:k] for t, (_, k) in zip(tokens, rows)]

    @staticmethod
    def kept(seq: Sequence, known: int, accepted: int) -> None:
        """After a check: of the draft's keys past the ``known`` tokens it drafted from, those of rejected drafts are
        not the sequence's."""
        seq.draft_cached = min(seq.draft_cached, known + accepted)
