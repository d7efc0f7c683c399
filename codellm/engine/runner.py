"""Every tensor of a step: the paged KV cache, the CUDA graphs, the forward passes and sampling.

The runner is told what to compute (sequences and token ranges, from the scheduler's plans) and gives
back logits or token ids; it never decides who runs. Decode steps whose tokens are all the plain argmax
are *launched*: their tokens stay on the device, where the next step reads its inputs, and the host
reads them one step later (``read``) while the device runs the next step.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from codellm.engine import kvcache, multilora
from codellm.engine.loader import LoadedModel
from codellm.engine.sampling import TokenLogprob, greedy_argmax, sample
from codellm.engine.sequence import Chunk, Sequence

log = logging.getLogger("codellm.engine")


class Launched:
    """Tokens the host has not read: its (sequence, row) pairs, the pinned host copy of its tokens and the event
    that says the copy is done; ``decoded``: a decode step's (False: prompts' first tokens, ``launch_first``)."""

    __slots__ = ("rows", "host", "event", "decoded")

    def __init__(self, rows: list[tuple[Sequence, int]], host: torch.Tensor, event, decoded: bool = True):
        self.rows, self.host, self.event, self.decoded = rows, host, event, decoded


def kv_shape(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a transformers model's text stack: what its KV cache is made of."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim


class ModelRunner:
    def __init__(self, lm: LoadedModel, *, blocks: int, block_size: int, rows: int, layers: int, kv_heads: int,
                 head_dim: int, cuda_graphs: bool = True, compile: bool = False, compile_prefill: bool = False,
                 verify_rows: int = 0, verify_run: int = 1, mixed: bool = False, ranks=None):
        self.lm = lm
        self.ranks = ranks  # tensor parallelism (``sharding.Ranks``): every forward is relayed to the other ranks
        cuda = lm.device.type == "cuda"
        self.cache = kvcache.PagedCache(
            layers=layers, blocks=blocks, block_size=block_size, rows=rows, kv_heads=kv_heads,
            head_dim=head_dim, max_len=lm.max_len, dtype=lm.dtype, device=lm.device,
        )
        # each row's last argmax stays on the device, where the next decode step reads its input
        self.last_tokens = torch.zeros(rows, dtype=torch.long, device=lm.device)
        self._host_tokens = [torch.zeros(rows, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._flip = 0
        self.graphs = None
        if cuda_graphs and cuda and ranks is None:  # (graph replays are not relayed: sharded models run eagerly)
            from codellm.engine.cudagraph import GraphRunner

            self.graphs = GraphRunner(lm.model, self.cache, lm.device, self.last_tokens, compile=compile,
                                      compile_prefill=compile_prefill, verify_rows=verify_rows, verify_run=verify_run,
                                      mixed=mixed)

    @property
    def graphs_usable(self) -> bool:
        """Captured graphs run the steps, attached adapters included once they are stacked into the graphs
        (``multilora``); only a kind of LoRA the stacks do not cover leaves the model to PEFT's eager path."""
        return self.graphs is not None and (self.graphs.lora is not None or not self.peft)

    @property
    def peft(self) -> bool:
        return bool(getattr(self.lm.model, "peft_config", None))

    def warmup(self) -> None:
        if self.graphs_usable:
            self.graphs.warmup()

    def set_rows(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.cache.set_row(seq.slot, seq.chain.blocks)

    def use_adapters(self, model, adapter: str) -> None:
        """The weights now carry ``model``'s adapters: stack them into the graphs (captured again), or leave the
        steps to PEFT's eager path when the stacks cannot hold this kind of LoRA."""
        if self.graphs is None or self.graphs.disabled:
            return
        names = list(getattr(model, "peft_config", None) or {})
        rows = multilora.install(model, names, self.lm.dtype)
        if rows is None and names:
            log.warning("adapter %s: this kind of LoRA decodes eagerly (no CUDA graphs)", adapter)
            self.graphs.lora = None
        else:  # no adapters left (rows None): the base graphs, captured again
            self.graphs.use_adapters(rows)
            log.info("adapters %s decode in CUDA graphs (captured again)", ", ".join(names) or "(none)")

    # -- eager forwards --------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, tables: list[list[int]], adapters: list[str | None],
                 all_logits: bool = False) -> torch.Tensor:
        """One eager forward: row i is the sequence with blocks ``tables[i]``, with adapter ``adapters[i]`` (None: base)."""
        extra = {}
        if self.peft:  # rows pick their adapter (PEFT mixed-batch LoRA)
            extra["adapter_names"] = [a or "__base__" for a in adapters]
        if self.ranks is not None:  # the other ranks build the same step from the same rows
            self.ranks.rows(ids, positions, tables)
        return self._logits(kvcache.step_context(self.cache, tables, positions), ids, positions.clamp(min=0),
                            0 if all_logits else 1, **extra)

    def _logits(self, ctx: kvcache.StepContext, ids: torch.Tensor, positions: torch.Tensor, logits_to_keep, **extra) -> torch.Tensor:
        """The model's logits for ``ids`` at ``positions`` (CPU tensors) inside step ``ctx``, launched eagerly."""
        dev = self.lm.device
        if isinstance(logits_to_keep, torch.Tensor):
            logits_to_keep = logits_to_keep.to(dev)
        with kvcache.use(ctx), kvcache.attention_backends(dev), torch.inference_mode():
            return self.lm.model(input_ids=ids.to(dev), position_ids=positions.to(dev), use_cache=False,
                                 logits_to_keep=logits_to_keep, **extra).logits

    # -- prefill ---------------------------------------------------------------------------
    def prefill(self, chunks: list[Chunk]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Compute prompt chunks; the sequences whose prompts they complete, and those sequences' next-token
        logits (still on the device). Chunks are packed end to end in one row, each attending to its cached
        prefix and itself: through captured graphs where they fit, else one eager forward. PEFT's own
        LoRA (when the graphs cannot hold it) picks adapters per row: left-padded rows instead."""
        self.cache.sync()
        if self.peft and not self.graphs_usable:
            return self._prefill_rows(chunks)
        if self.graphs_usable:  # every group launched before the first tokens are read (one wait)
            groups = self.graphs.prefill_groups([end - start for _, start, end in chunks], [end for _, _, end in chunks])
            packed = [self._prefill_packed([chunks[i] for i in group], keep=len(groups) > 1) for group in groups]
        else:
            packed = [self._prefill_packed(chunks)]
        seqs = [seq for group_seqs, _ in packed for seq in group_seqs]
        if not seqs:
            return [], None
        return seqs, torch.cat([logits for group_seqs, logits in packed if group_seqs])

    @property
    def can_ride(self) -> bool:
        """Whether decode rows can ride in a prefill's forward (``prefill_riding``): in captured graphs where they
        were captured, else in eager packed steps (one process, no PEFT rows: a CPU, or a GPU whose graphs are off)."""
        if self.graphs_usable:
            return self.graphs.riding is not None
        return not self.peft and self.ranks is None

    def prefill_riding(self, chunks: list[Chunk], riders: list[Sequence]) -> tuple[list[Sequence], torch.Tensor | None,
                                                                                    Launched | None]:
        """``prefill`` of prompt chunks with decoding sequences riding in the same forward, a one-token row each
        after the chunks (its input the last token, on the device when still in flight): the prompts it completes
        with their logits, as ``prefill`` gives them, and the riders' next tokens launched as ``launch`` does."""
        self.cache.sync()
        if not riders:
            return (*self.prefill(chunks), None)
        packed = [(seq.known()[start:end], start, seq.chain.blocks) for seq, start, end in chunks]
        rows = [(0 if s.inflight else s.generated[-1], len(s.prompt) + len(s.generated) + s.inflight - 1, s.chain.blocks)
                for s in riders]  # each rider's input at its position: the token in flight, or its last one
        dev = self.lm.device
        cuda = dev.type == "cuda"
        slots = torch.tensor([s.slot for s in riders], pin_memory=cuda).to(dev, non_blocking=True)
        with torch.inference_mode():
            if self.graphs_usable:
                lora = self.graphs.lora
                out = self.graphs.ride(
                    packed, [lora.of(seq.adapter) for seq, _, _ in chunks] if lora else None, [t for t, _, _ in rows],
                    [p for _, p, _ in rows], [int(s.inflight > 0) for s in riders],
                    [kvcache.cache_row(blocks, p, self.cache.block_size) for _, p, blocks in rows],
                    [s.slot for s in riders], [lora.of(s.adapter) for s in riders] if lora else None)
                if out is None:  # no captured graph fits: the prefill, then the rows' own decode step
                    seqs, logits = self.prefill(chunks)
                    return seqs, logits, self.launch(riders)
                logits, tokens = out
            else:
                fresh = all(start == 0 for _, start, _ in packed)
                ids, positions, last, ctx = kvcache.riding_step(self.cache, packed, rows, [s.slot for s in riders],
                                                                fresh, dev)
                ids = ids.to(dev)
                take = torch.tensor([s.inflight > 0 for s in riders], device=dev)
                n = ctx.rows_from
                ids[n:] = torch.where(take, self.last_tokens[slots], ids[n:])
                every = self._logits(ctx, ids.view(1, -1), positions.view(1, -1), last)[0]
                logits, tokens = every[:len(chunks)], greedy_argmax(every[len(chunks):])
            self.last_tokens.index_copy_(0, slots, tokens)
        done = self._completing(chunks)
        host = self._host_tokens[self._flip][:len(riders)]
        self._flip ^= 1
        launched = self._in_flight(riders, tokens, host, [(s, i) for i, s in enumerate(riders)])
        if not done:
            return [], None, launched
        return [chunks[r][0] for r in done], logits[done], launched

    @staticmethod
    def _completing(chunks: list[Chunk]) -> list[int]:
        return [row for row, (seq, _, end) in enumerate(chunks) if end >= seq.target]

    def _prefill_rows(self, chunks: list[Chunk]) -> tuple[list[Sequence], torch.Tensor | None]:
        width = max(end - start for _, start, end in chunks)
        ids = torch.zeros((len(chunks), width), dtype=torch.long)
        positions = torch.full((len(chunks), width), -1, dtype=torch.long)
        for row, (seq, start, end) in enumerate(chunks):  # left-padded: every row's last token is last
            ids[row, width - (end - start):] = torch.tensor(seq.known()[start:end])
            positions[row, width - (end - start):] = torch.arange(start, end)
        seqs = [seq for seq, _, _ in chunks]
        logits = self._forward(ids, positions, [s.chain.blocks for s in seqs], [s.adapter for s in seqs])
        done = self._completing(chunks)
        return [chunks[r][0] for r in done], (logits[done, -1] if done else None)

    def _prefill_packed(self, chunks: list[Chunk], keep: bool = False) -> tuple[list[Sequence], torch.Tensor | None]:
        """A captured graph when one fits, else one eager forward. The logits are copied
        out of the graph's buffer when ``keep`` (another replay follows)."""
        packed = [(seq.known()[start:end], start, seq.chain.blocks) for seq, start, end in chunks]
        lora = self.graphs.lora if self.graphs_usable else None
        adapters = [lora.of(seq.adapter) for seq, _, _ in chunks] if lora else None
        fresh = all(start == 0 for _, start, _ in packed)
        logits = self.graphs.prefill(packed, adapters) if self.graphs_usable else None
        if logits is None:
            logits = self._packed_eager(packed, adapters, fresh)
        done = self._completing(chunks)
        if not done:
            return [], None
        if len(done) == len(chunks):  # (a row list indexes through a host-to-device copy: skip it when it can)
            logits = logits[:len(done)].clone() if keep else logits[:len(done)]
        else:
            logits = logits[done]
        return [chunks[r][0] for r in done], logits

    def _packed_eager(self, packed: list[tuple[list[int], int, list[int]]], adapters, fresh: bool,
                      every: bool = False) -> torch.Tensor:
        """One eager forward of packed chunks (tokens, first position, blocks): each chunk's last logits, or with
        ``every`` the logits of all its positions, end to end."""
        dev = self.lm.device
        lora = self.graphs.lora if self.graphs_usable else None
        if self.ranks is not None:  # the other ranks build the same step from the same chunks
            self.ranks.packed(packed, fresh)
        ids, positions, last, ctx = kvcache.packed_step(self.cache, packed, fresh, dev)
        tokens = [t for t, _, _ in packed]
        with lora.active(multilora.token_adapters(tokens, adapters, len(ids)).to(dev).view(1, -1)) if lora \
                else contextlib.nullcontext():
            return self._logits(ctx, ids.view(1, -1), positions.view(1, -1), 0 if every else last)[0]

    def verify(self, runs: list[tuple[Sequence, list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of several sequences at given positions, a row each: (logits [rows, V], argmax [rows]) on the device,
        for runs of (sequence, tokens, first position), end to end. Every token's keys and values are written, and
        each attends to its sequence up to itself: speculative drafts checked in one step (the last token and its
        drafts), or a draft model catching up on the tokens it has not seen. Keys written for drafts that are not
        kept are overwritten later. Through the captured verify lane where it fits, else eagerly."""
        self.cache.sync()
        bs = self.cache.block_size
        ids, positions, write, table_rows, tables, adapters, offsets = [], [], [], [], [], [], []
        for seq, tokens, start in runs:
            blocks, n = seq.chain.blocks, len(tokens)
            ids += tokens
            positions += range(start, start + n)
            offsets += range(n)
            write += kvcache.cache_rows(blocks, start, start + n, bs)
            table_rows += [seq.slot] * n
            tables += [blocks] * n
            adapters += [seq.adapter] * n
        out = None
        if self.graphs_usable:
            lora = self.graphs.lora
            with torch.inference_mode():
                out = self.graphs.run(ids, positions, [0] * len(ids), write,
                                      [lora.of(a) for a in adapters] if lora else None, rows=table_rows, offsets=offsets)
        if out is None:  # eagerly: packed, each run attending to its sequence once (rows would gather it per row)
            with torch.inference_mode():
                if self.peft and not self.graphs_usable:  # PEFT's own LoRA picks adapters by row
                    logits = self._forward(torch.tensor(ids).view(-1, 1), torch.tensor(positions).view(-1, 1), tables,
                                           adapters)[:, -1]
                else:
                    lora = self.graphs.lora if self.graphs_usable else None
                    logits = self._packed_eager([(tokens, start, seq.chain.blocks) for seq, tokens, start in runs],
                                                [lora.of(seq.adapter) for seq, _, _ in runs] if lora else None,
                                                fresh=False, every=True)
                out = (logits, logits.argmax(dim=-1))
        return out

    def prefill_alone(self, chunk: Chunk) -> torch.Tensor | None:
        """One chunk in a forward of its own, keeping every position's logits: the prompt's log-probabilities are
        added to the sequence; its next-token logits when the chunk completes its prompt."""
        seq, start, end = chunk
        self.cache.sync()
        ids = torch.tensor([seq.known()[start:end]])
        positions = torch.arange(start, end).unsqueeze(0)
        logits = self._forward(ids, positions, [seq.chain.blocks], [seq.adapter], all_logits=True)
        with torch.inference_mode():
            lp = torch.log_softmax(logits[0].float(), dim=-1).cpu()
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]
        nxt = seq.prompt[start + 1:end + 1]
        seq.prompt_logprobs += [float(lp[j, t]) for j, t in enumerate(nxt)]
        return logits[:, -1] if end >= seq.target else None

    # -- decode ----------------------------------------------------------------------------
    def decode(self, batch: list[Sequence]) -> torch.Tensor:
        """One decode step, its logits by ``batch`` row (on the device): the host samples."""
        logits, _ = self._decode_step(batch)
        rows = [s.slot for s in batch]
        if rows != list(range(logits.shape[0])):
            logits = logits[torch.tensor(rows, device=logits.device)]
        return logits

    def launch(self, batch: list[Sequence]) -> Launched:
        """One decode step whose tokens (the argmax) stay on the device; ``read`` them later."""
        _, tokens = self._decode_step(batch)
        host = self._host_tokens[self._flip]
        self._flip ^= 1
        return self._in_flight(batch, tokens, host[:tokens.shape[0]], [(s, s.slot) for s in batch])

    def launch_first(self, seqs: list[Sequence], logits: torch.Tensor) -> Launched:
        """The first tokens of prompts just computed, each the plain argmax of its row of ``logits``, left on the
        device where the next decode step reads its inputs, and ``read`` later as a decode step's are: the step after
        a prefill is launched without waiting for the prefill to end."""
        cuda = logits.is_cuda
        with torch.inference_mode():
            tokens = greedy_argmax(logits)
            slots = torch.tensor([s.slot for s in seqs], pin_memory=cuda).to(logits.device, non_blocking=True)
            self.last_tokens.index_copy_(0, slots, tokens)
        host = torch.empty(len(seqs), dtype=torch.long, pin_memory=cuda)
        return self._in_flight(seqs, tokens, host, [(s, i) for i, s in enumerate(seqs)], decoded=False)

    @staticmethod
    def _in_flight(seqs: list[Sequence], tokens: torch.Tensor, host: torch.Tensor, rows: list[tuple[Sequence, int]],
                   decoded: bool = True) -> Launched:
        """``tokens`` (on the device) copied into pinned ``host`` without waiting, and ``seqs`` counted one token
        further on the device than on the host, until ``read``."""
        host.copy_(tokens, non_blocking=True)
        event = None
        if tokens.is_cuda:
            event = torch.cuda.Event()
            event.record()
        for s in seqs:
            s.inflight += 1
        return Launched(rows, host, event, decoded)

    @staticmethod
    def read(step: Launched) -> list[tuple[Sequence, int]]:
        """A launched step's tokens, for the sequences that had not finished meanwhile (a sequence that stopped a
        step ago was decoded once too often: that token is dropped)."""
        if step.event is not None:
            step.event.synchronize()
        tokens = step.host.tolist()
        live = []
        for seq, slot in step.rows:
            seq.inflight -= 1
            if not seq.finished:
                live.append((seq, tokens[slot]))
        return live

    def _decode_step(self, batch: list[Sequence], at: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Launch one decode step; (logits, argmax) by row 0..hi-1, still on the device. With ``at`` (a position for
        each sequence), every row's input is its last argmax on the device, put at that position: a draft model's
        steps, each feeding the next."""
        # one batch row per block-table row 0..hi-1 (rows are handed out lowest first): attention reads each row's
        # blocks through the table; rows of free or still-prefilling sequences write to scratch and are dropped
        self.cache.sync()
        hi = max(s.slot for s in batch) + 1
        ids, positions, take, adapters = [0] * hi, [-1] * hi, [0] * hi, [None] * hi
        write, tables = [self.cache.scratch] * hi, [[] for _ in range(hi)]
        bs = self.cache.block_size
        for i, s in enumerate(batch):
            p = positions[s.slot] = at[i] if at is not None else len(s.prompt) + len(s.generated) + s.inflight - 1
            write[s.slot] = kvcache.cache_row(s.chain.blocks, p, bs)
            tables[s.slot] = s.chain.blocks
            if s.inflight or at is not None:
                take[s.slot] = 1
            else:
                ids[s.slot] = s.generated[-1]
            adapters[s.slot] = s.adapter
        out = None
        if self.graphs_usable:
            lora = self.graphs.lora
            with torch.inference_mode():  # the fast path: one captured graph replay per step
                out = self.graphs.run(ids, positions, take, write, [lora.of(a) for a in adapters] if lora else None)
        if out is None:
            dev = self.lm.device
            with torch.inference_mode():
                inputs = torch.where(torch.tensor(take, dtype=torch.bool).to(dev), self.last_tokens[:hi],
                                     torch.tensor(ids).to(dev))
                logits = self._forward(inputs.unsqueeze(1), torch.tensor(positions).unsqueeze(1), tables, adapters)[:, -1]
                argmax = logits.argmax(dim=-1)
                self.last_tokens[:hi] = argmax
            out = (logits, argmax)
        return out

    @staticmethod
    def sample(batch: list[Sequence], logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        with torch.inference_mode():
            return sample(logits, [s.params for s in batch], [s.generated for s in batch], [s.generator for s in batch])
