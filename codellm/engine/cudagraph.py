"""The GPU fast path: each step replays a captured CUDA graph instead of launching the model's
~600 kernels one by one from Python (an eager step is launch-bound: see benchmarks/NOTES.md).

Decode graphs are captured at load, one per batch bucket (and per key-length bucket when attention is
SDPA; the split-KV kernel of ``decode_attention`` reads each row's length on the device, so one graph
serves every length), over the same paged KV cache and attention function as the eager path. Row i of a
step is block-table row i; everything a step changes (token ids, positions, where each row's keys go)
lives in one static device buffer filled by a single host-to-device copy, and the block table is a static
buffer the scheduler updates between steps. Rows without a sequence write to the cache's scratch block.

Prefill graphs run packed prefills (``kvcache.packed_context``): up to ``PREFILL_ROWS`` prompt chunks end to
end in one row, so a lone 128-token prompt costs one replay instead of an eager forward launched from
Python (tens of ms, most of a c=1 time to first token). There is one graph per token-count bucket for
fresh prompts, which attend to themselves, and one per (tokens, keys) bucket pair for chunks that continue
a cached prefix: their keys are gathered from the pool through a static index buffer, padded with the
scratch block, so a prompt that hits the prefix cache is as cheap to launch as a fresh one. Buckets past
``SHORT_CHUNK`` tokens have each graph in three layouts (``layout``), which size FlashAttention's grid to the
chunks: many short ones, a few of any length, or anything. Every prefill graph writes its logits to one
shared buffer, so that none keeps [PREFILL_ROWS, V] of its own.

With ``mixed`` (``--mixed-steps``) a prefill of fresh prompts also carries the running streams' decode rows, one
token each after the prompts, in one replay (``ride``): the forward reads the weights once for both, where a
prefilling step otherwise runs a decode step of its own beside it. There is one such graph per (prompt tokens, rows)
bucket pair; the prompt tokens attend as a packed prefill, the rows through the split-KV kernel and their table rows.

With ``compile=True`` the decode step is first compiled by ``torch.compile`` (inductor fuses the norms,
rotary embedding and activations of every layer into a few kernels) and the compiled step is what the
graphs capture: at batch 1 the step is made of hundreds of tiny kernels, so fewer of them is the win.
Prefill graphs are not compiled: compiling prompt shapes made loading minutes slower (NOTES run 19).

The decode step ends with the argmax of every row, written to a per-slot buffer on the device: a greedy
sequence's next step takes its input from there (``take``), so consecutive steps need no host round trip.

Speculative drafts are checked by the same captured step, in a lane of its own (``Lane``): each draft position is
a row, with its sequence's block-table row gathered on the device, so a sequence's k drafts and its last token are
k + 1 rows that write their keys before any row attends (attention writes a layer's keys first): row j sees the
drafts before it. Checking four drafts of one stream is a replay of the batch-8 step, about a decode step's cost.
A sequence's rows are consecutive, and the split-KV kernel takes them together (each row's place among them is an
input): its keys are read once for all of them.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from array import array

import torch

from codellm.engine import decode_attention, kvcache, multilora, sampling

log = logging.getLogger("codellm.engine")

PREFILL_ROWS = 64  # prompts one prefill replay takes
# A bucket's graphs in three layouts, because FlashAttention's variable-length kernel launches (longest chunk / 128)
# x (rows + 1) x heads programs, and most of them find no query and stop: with a 2048-token bucket's 64 rows that
# is 33k programs a layer (about 80 us on an H100, more than 16 chunks of 128 tokens need). Layout GENERAL takes any
# chunks; SHORT as many, none longer than SHORT_CHUNK tokens; FEW at most FEW_ROWS chunks of any length.
GENERAL, SHORT, FEW = 0, 1, 2
SHORT_CHUNK, FEW_ROWS = 256, 4
# its token counts; larger prefills run eagerly (GPU-bound there). Past 512 a step of 1.5x the one before: an agent's
# turn of 600 tokens or a 1,100-token file would otherwise pay for nearly twice its tokens
PREFILL_BUCKETS = (64, 128, 256, 512, 768, 1024, 1536, 2048)
INPUTS = 7  # a lane's input rows (``step_inputs``)
KEY_BUCKETS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)  # keys a prefill over cached prefixes attends to, all chunks together


class Lane:
    """One family of captured decode steps: its batch buckets, input buffers (ids, positions, take, adapter number,
    cache row of the keys, block-table row, place in its sequence's run of rows), the per-row argmax it writes, and
    its graphs. The decode lane's row i is table row i; the verify lane reads each row's table row from its inputs."""

    def __init__(self, rows: int, device: torch.device, tokens: torch.Tensor, gather: bool):
        self.buckets = _buckets(rows, 1)
        bmax = self.buckets[-1]
        self.tokens, self.gather = tokens, gather
        self.staging = torch.zeros((2, INPUTS, bmax), dtype=torch.long, pin_memory=True)  # two: one may still be copying
        self.flip = 0
        self.packed = torch.zeros((INPUTS, bmax), dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}

    def stage(self, b: int, inputs: torch.Tensor) -> None:
        """A step's input rows ([INPUTS, b], ``step_inputs``) into the device buffer, by one copy from the pinned
        block the step before did not use."""
        staging = self.staging[self.flip]
        self.flip ^= 1
        staging[:, :b] = inputs
        self.packed[:, :b].copy_(staging[:, :b], non_blocking=True)


def _buckets(limit: int, start: int) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def step_inputs(b: int, ids: list[int], positions: list[int], take: list[int], adapters: list[int] | None,
                write: list[int], rows: list[int] | None, scratch: int, slots: int,
                offsets: list[int] | None = None) -> torch.Tensor:
    """A lane's input rows for a graph of ``b`` rows ([INPUTS, b] long, on the CPU): ids, positions (-1 becomes 0),
    take, adapters, cache rows, table rows, each row's place in its sequence's run of rows (a check's); rows past the
    batch pad to nothing (scratch writes, the spare table row, runs of their own). Built through one flat buffer:
    converting a nested list costs four times as much at 256 rows."""
    n = len(ids)
    pad, zeros = [0] * (b - n), [0] * n
    flat = array("q")
    for part, filler in ((ids, pad), ([p if p > 0 else 0 for p in positions], pad), (take, pad),
                         (adapters or zeros, pad), (write, [scratch] * (b - n)), (rows or zeros, [slots] * (b - n)),
                         (offsets or zeros, pad)):
        flat.extend(part)
        flat.extend(filler)
    return torch.frombuffer(flat, dtype=torch.long).view(INPUTS, b)


def layout(lengths: list[int], n: int) -> int:
    """The prefill layout for chunks of these lengths in an ``n``-token bucket whose attention grid is smallest (a
    bucket no larger than ``SHORT_CHUNK`` has only the general one, already small)."""
    if n <= SHORT_CHUNK:
        return GENERAL
    if max(lengths) <= SHORT_CHUNK:
        return SHORT
    return FEW if len(lengths) <= FEW_ROWS else GENERAL


def _shape(layout: int, n: int) -> tuple[int, int]:
    """A layout's chunk rows and longest chunk, in an ``n``-token bucket."""
    return (FEW_ROWS if layout == FEW else PREFILL_ROWS), (SHORT_CHUNK if layout == SHORT else n)


def _layouts(n: int) -> list[int]:
    return [GENERAL] if n <= SHORT_CHUNK else [GENERAL, SHORT, FEW]


def _capture_lengths(cu: torch.Tensor, n: int, layout: int) -> None:
    """Capture-time chunk bounds in ``cu`` for an ``n``-token bucket: padding chunks as long as the layout allows."""
    cu.copy_((torch.arange(cu.shape[0], device=cu.device) * _shape(layout, n)[1]).clamp(max=n))


class GraphRunner:
    def __init__(self, model, cache: kvcache.PagedCache, device: torch.device, tokens: torch.Tensor, *, min_kv: int = 128,
                 compile: bool = False, compile_prefill: bool = False, verify_rows: int = 0, verify_run: int = 1,
                 mixed: bool = False):
        self.model, self.cache, self.device = model, cache, device
        # tokens: [slots] each slot's last argmax, on the device: the next step can read its input there
        self.lanes = {"decode": Lane(cache.slots, device, tokens, gather=False)}
        if verify_rows:  # speculative drafts, a row each (``verify``)
            self.lanes["verify"] = Lane(verify_rows, device, torch.zeros(verify_rows, dtype=torch.long, device=device),
                                        gather=True)
        self.kernel = decode_attention.probe(device, cache.k[0].shape[-1])
        # a sequence's rows in a check, read in one pass over its keys (1: a row at a time)
        self.verify_run = verify_run if verify_rows and verify_run > 1 and self.kernel and \
            decode_attention.probe(device, cache.k[0].shape[-1], verify_run) else 1
        kv_all = cache.max_len + 1
        self.kv_buckets = [kv_all] if self.kernel else _buckets(kv_all, min(min_kv, kv_all))
        # a prefill graph packs many prompts, so its size is not bounded by the context: with buckets capped at a
        # 400-token context, a burst of 128-token prompts went two prompts a replay, each replay reading every weight
        self.prefill_buckets = list(PREFILL_BUCKETS)
        # one device buffer for a packed prefill, filled by one copy (its parts: ``_pf_parts``)
        self.pf_width = width = PREFILL_BUCKETS[-1]
        self.pf = torch.zeros(4 * width + 2 * PREFILL_ROWS + 2, dtype=torch.long, device=device)
        # cached-prefix prefills: the pool rows of every key each chunk attends to, then their cumulative counts
        self.key_buckets = list(KEY_BUCKETS)
        self.pk_width = KEY_BUCKETS[-1]
        self.pk = torch.zeros(self.pk_width + PREFILL_ROWS + 2, dtype=torch.long, device=device)
        # by (tokens, keys, layout); keys 0: fresh prompts, attending to themselves
        self.prefill_graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # the chunks' logits, which every prefill and riding graph writes to (they replay one at a time, and each read
        # is queued before the next replay): made by the first capture's warm-up, [PREFILL_ROWS, V]
        self.pf_logits: torch.Tensor | None = None
        self.prefill_replays: collections.Counter = collections.Counter()  # "fresh" and "cached" prefills replayed
        self.keys = torch.arange(cache.max_len + 1, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        # where every capture warms up: the caching allocator keeps a stream's freed blocks for that stream alone, so
        # each capture warming up on a stream of its own would strand its activations' memory there
        self._side = torch.cuda.Stream(device)
        self.disabled = False
        self.lora: multilora.Rows | None = None  # unmerged adapters in the graphs (``use_adapters``)
        # prefills of fresh prompts with decode rows riding (``riding``): their inputs as a lane's, one graph per
        # (prompt tokens, rows) bucket pair; the rows attend by the split-KV kernel, so it is needed
        self.riding = Lane(cache.slots, device, tokens, gather=True) if mixed and self.kernel else None
        self.riding_graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.compiled = compile
        self.forward = torch.compile(self._forward, dynamic=True) if compile else self._forward
        self.prefill_forward = torch.compile(self._prefill_forward, dynamic=True) if compile_prefill \
            else self._prefill_forward

    def use_adapters(self, rows: multilora.Rows) -> None:
        """Adapters were attached (and stacked into ``rows``): capture every graph again with them in. The step
        is no longer compiled: a model with new modules would recompile for tens of seconds, and plain captured
        graphs already take away the launch overhead that eager decoding pays."""
        self.lora = rows
        self._uncompiled()
        self.warmup()

    def _uncompiled(self) -> None:
        """Drop every graph; later captures are of the plain step, into a new memory pool (the old graphs' pool
        goes with them, and capturing into it again fails an allocator assertion)."""
        self.forward, self.prefill_forward, self.compiled = self._forward, self._prefill_forward, False
        for lane in self.lanes.values():
            lane.graphs.clear()
        self.prefill_graphs.clear()
        self.riding_graphs.clear()
        self.pool = torch.cuda.graph_pool_handle()

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, take: torch.Tensor, ctx: kvcache.StepContext,
                 tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = ids.shape[0]
        ids = torch.where(take.bool(), tokens[:b].view(b, 1), ids)
        logits = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1, codellm_step=ctx).logits[:, -1]
        nxt = sampling.greedy_argmax(logits)
        tokens[:b].copy_(nxt)
        return logits, nxt

    def _step(self, b: int, kv: int, lane: str = "decode") -> tuple[torch.Tensor, torch.Tensor]:
        ln = self.lanes[lane]
        ids, pos, take, adapters, write, row, offsets = (ln.packed[i, :b].view(b, 1) for i in range(INPUTS))
        mask = None if self.kernel else self.keys[:kv].view(1, 1, 1, -1) <= pos[:, None, :, None]
        if ln.gather:  # the verify lane: a sequence's rows are consecutive, with its table row
            table = self.cache.table.index_select(0, row.view(b))
            runs = dict(offsets=offsets.view(b), run=self.verify_run) if self.verify_run > 1 else {}
        else:
            table, runs = self.cache.table[:b], {}
        ctx = kvcache.StepContext(self.cache, write, pos, kv, mask, table=table, **runs)
        with kvcache.attention_backends(self.device), self._adapters(adapters):  # never cuDNN (see attention_backends)
            return self.forward(ids, pos, take, ctx, ln.tokens)

    def _adapters(self, ids: torch.Tensor):
        """LoRA layers read each row's (token's) adapter number from ``ids`` while a step is captured."""
        return self.lora.active(ids) if self.lora is not None else contextlib.nullcontext()

    def _pf_parts(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of a packed-prefill buffer (the device one, or the pinned host block copied into it): ids,
        positions, cache rows (``pf_width`` each), cu (rows + 2), last (rows), each token's adapter number (``pf_width``)."""
        w, r = self.pf_width, PREFILL_ROWS
        return buf[:w], buf[w:2 * w], buf[2 * w:3 * w], buf[3 * w:3 * w + r + 2], buf[3 * w + r + 2:3 * w + 2 * r + 2], \
            buf[3 * w + 2 * r + 2:]

    def _prefill_step(self, n: int, k: int, layout: int) -> torch.Tensor:
        ids, pos, write, cu, last, adapters = self._pf_parts(self.pf)
        rows, longest = _shape(layout, n)
        kv_index, cu_k = (self.pk[:k], self.pk[self.pk_width:self.pk_width + rows + 2]) if k else (None, None)
        with kvcache.attention_backends(self.device), self._adapters(adapters[:n].view(1, n)):
            logits = self.prefill_forward(ids[:n], pos[:n], write[:n], cu[:rows + 2], last[:rows], kv_index, cu_k,
                                          longest)
        return self._chunk_logits(logits)

    def _prefill_forward(self, ids: torch.Tensor, pos: torch.Tensor, write: torch.Tensor, cu: torch.Tensor,
                         last: torch.Tensor, kv_index: torch.Tensor | None, cu_k: torch.Tensor | None,
                         longest: int) -> torch.Tensor:
        """A packed prefill's logits at ``last`` (no chunk longer than ``longest``). Its sizes come from the tensors'
        shapes, so that one compiled graph (``compile_prefill``) serves every bucket."""
        n = ids.shape[0]
        keys = {} if kv_index is None else dict(kv_index=kv_index, cu_k=cu_k.to(torch.int32), max_k=kv_index.shape[0])
        ctx = kvcache.packed_context(self.cache, write, pos, cu.to(torch.int32), longest, **keys)
        return self.model(input_ids=ids.view(1, n), position_ids=pos.view(1, n), use_cache=False, logits_to_keep=last,
                          codellm_step=ctx).logits[0]

    def _chunk_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The chunks' logits ([rows, V]) copied into the buffer every prefill graph shares (``pf_logits``, made
        outside any capture), so that no graph keeps [PREFILL_ROWS, V] of output of its own."""
        if self.pf_logits is None or self.pf_logits.shape[1:] != logits.shape[1:] or self.pf_logits.dtype != logits.dtype:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the prefill graphs' logit buffer is made by a warm-up, before any capture")
            self.pf_logits = torch.empty((PREFILL_ROWS, *logits.shape[1:]), dtype=logits.dtype, device=logits.device)
        out = self.pf_logits[:logits.shape[0]]
        out.copy_(logits)
        return out

    def _riding_step(self, n: int, r: int, layout: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, pos, write, cu, last, adapters = self._pf_parts(self.pf)
        rows, longest = _shape(layout, n)
        r_ids, r_pos, r_take, r_adapters, r_write, r_row, _ = (self.riding.packed[i, :r] for i in range(INPUTS))
        with kvcache.attention_backends(self.device), self._adapters(torch.cat([adapters[:n], r_adapters]).view(1, -1)):
            return self._riding_forward(ids[:n], pos[:n], write[:n], cu[:rows + 2], last[:rows], longest, r_ids, r_pos,
                                        r_take, r_write, r_row)

    def _riding_forward(self, ids, pos, write, cu, last, longest, r_ids, r_pos, r_take, r_write, r_row):
        """A packed prefill of fresh prompts with ``r`` one-token rows after it, a decoding sequence each (its input
        taken from its slot's last argmax where ``r_take``): the chunks' logits at ``last``, and the rows' argmax."""
        n, tokens, rows = ids.shape[0], self.riding.tokens, last.shape[0]
        r_ids = torch.where(r_take.bool(), tokens[r_row.clamp(max=tokens.shape[0] - 1)], r_ids)
        ctx = kvcache.packed_context(self.cache, torch.cat([write, r_write]), torch.cat([pos, r_pos]),
                                     cu.to(torch.int32), longest)
        ctx.rows_from, ctx.table, ctx.lens = n, self.cache.table.index_select(0, r_row), (r_pos + 1).to(torch.int32)
        keep = torch.cat([last, n + torch.arange(r_ids.shape[0], device=last.device)])
        logits = self.model(input_ids=torch.cat([ids, r_ids]).view(1, -1), position_ids=torch.cat([pos, r_pos]).view(1, -1),
                            use_cache=False, logits_to_keep=keep, codellm_step=ctx).logits[0]
        # the chunks' rows into the shared buffer; of the rows' logits only their argmax is kept
        return self._chunk_logits(logits[:rows]), sampling.greedy_argmax(logits[rows:])

    def _capture(self, step, *args):
        stream = self._side
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm up kernels and allocator outside the graph
                step(*args)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            out = step(*args)
        log.info("captured %s graph for %s", step.__name__.strip("_"), args)
        return graph, out

    def warmup(self) -> None:
        """Capture every bucket now (seconds at load) rather than stalling streams mid-generation. A compiled
        step that fails to capture falls back to the plain one; a plain one that fails leaves decoding eager."""
        for name, lane in self.lanes.items():
            lane.packed.zero_()
            lane.packed[4].fill_(self.cache.scratch)  # capture-time writes land in the scratch block
            lane.packed[5].fill_(self.cache.slots)  # and the table row they read is the all-scratch one
            for b in lane.buckets:
                for kv in self.kv_buckets:
                    while (b, kv) not in lane.graphs and not self.disabled:
                        try:
                            lane.graphs[(b, kv)] = self._capture(self._step, b, kv, name)
                        except Exception:
                            torch.cuda.empty_cache()  # what the failed capture held: the retry, or eager steps, need it
                            if not self.compiled:
                                log.exception("CUDA graph capture failed; decoding eagerly")
                                self.disabled = True
                            else:
                                log.exception("capturing the compiled decode step failed; capturing it uncompiled")
                                self._uncompiled()
                                return self.warmup()
        self.capture_prefill()

    def capture_prefill(self) -> None:
        """Capture a prefill graph for every (tokens, keys) bucket pair; one that fails leaves prompts eager."""
        # the prefill buffer still holds the last real prefill's ids, positions and logit rows when graphs are captured
        # again (an adapter attached while serving): its values past that prompt are not valid for a larger bucket
        self.pf.zero_()
        _, _, write, cu, _, _ = self._pf_parts(self.pf)
        write.fill_(self.cache.scratch)  # prefill graphs: capture-time writes go to the scratch block
        self.pk[:self.pk_width].fill_(self.cache.scratch)  # and capture-time keys are read from it
        cu_k = self.pk[self.pk_width:]

        def lengths(n: int, k: int, shape: int) -> None:
            _capture_lengths(cu, n, shape)
            # k // n keys a query (k >= n), no more than k in all: lengths past the bucket's would read out of bounds
            cu_k.copy_(cu * (k // n) if k else cu)

        keys = [(n, k, shape) for n in self.prefill_buckets for k in [0] + [k for k in self.key_buckets if k >= n]
                for shape in _layouts(n)]
        if self.disabled or not self._capture_all(self.prefill_graphs, keys, self._prefill_step, lengths,
                                                  "prompts prefill eagerly"):
            return
        self.capture_riding()
        # the warmups' blocks, cached and unused now, go back to the device: memory outside torch's allocator (cuBLAS
        # handles of other threads and streams, NCCL) is taken from the device, and cannot reclaim them
        torch.cuda.empty_cache()

    def capture_riding(self) -> None:
        """Capture a graph for every (prompt tokens, decode rows) bucket pair; one that fails leaves rows decoding
        apart from prefills. Capture-time rows write to the scratch block and read the spare, all-scratch table row."""
        if self.riding is None:
            return
        lane = self.riding
        lane.packed.zero_()
        lane.packed[4].fill_(self.cache.scratch)
        lane.packed[5].fill_(self.cache.slots)
        _, _, _, cu, _, _ = self._pf_parts(self.pf)

        keys = [(n, r, shape) for n in self.prefill_buckets for r in lane.buckets for shape in _layouts(n)]
        if not self._capture_all(self.riding_graphs, keys, self._riding_step, lambda n, r, shape: _capture_lengths(
                cu, n, shape), "decode rows run apart from prefills"):
            self.riding = None

    def _capture_all(self, graphs: dict, keys: list[tuple[int, ...]], step, prepare, fallback: str) -> bool:
        """Capture ``step(*key)`` into ``graphs`` for every key, each after ``prepare(*key)`` has set the buffers its
        capture reads; at the first that fails, none are kept (what they held goes back to the device) and the engine
        does without them: ``fallback`` says how."""
        for key in keys:
            try:
                prepare(*key)
                graphs[key] = self._capture(step, *key)
            except Exception:
                log.exception("capturing a %s graph failed; %s", step.__name__.strip("_"), fallback)
                graphs.clear()
                torch.cuda.empty_cache()
                return False
        return True

    def run(self, ids: list[int], positions: list[int], take: list[int], write: list[int],
            adapters: list[int] | None = None, rows: list[int] | None = None,
            offsets: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits [n, V], argmax [n]) on the device for one decode step whose row i is block-table row i (position
        -1: no sequence there; take 1: the input is the row's last argmax, still on the device; ``write``: the cache
        row of each row's new keys; ``adapters``: each row's adapter number, see ``use_adapters``), or None when the
        graph path cannot run it. With ``rows`` (each row's block-table row), the verify lane runs it instead: a
        speculative draft a row, a sequence's rows consecutive, ``offsets`` each one's place among them. Nothing here
        waits for the device."""
        if self.disabled or (rows is not None and "verify" not in self.lanes):
            return None
        name = "decode" if rows is None else "verify"
        lane = self.lanes[name]
        n = len(ids)
        b = next((x for x in lane.buckets if x >= n), None)
        kv = next((x for x in self.kv_buckets if x >= max(positions) + 1), None)
        if b is None or kv is None:
            return None
        scratch = self.cache.scratch
        lane.stage(b, step_inputs(b, ids, positions, take, adapters, write, rows, scratch, self.cache.slots, offsets))
        key = (b, kv)
        if key not in lane.graphs:
            try:
                lane.graphs[key] = self._capture(self._step, b, kv, name)
            except Exception:  # a model or kernel that cannot be captured: stay eager
                log.exception("CUDA graph capture failed; decoding eagerly from now on")
                self.disabled = True
                return None
        graph, (logits, tokens) = lane.graphs[key]
        graph.replay()
        return logits[:n], tokens[:n]

    def ride(self, chunks: list[tuple[list[int], int, list[int]]], adapters: list[int] | None, ids: list[int],
             positions: list[int], take: list[int], write: list[int], rows: list[int],
             row_adapters: list[int] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A packed prefill of fresh prompt ``chunks`` with decode rows riding in its replay (their ids, positions,
        take flags, cache rows of their keys, table rows and adapter numbers, as ``run`` takes a verify lane's): the
        chunks' next-token logits [len(chunks), V] and the rows' argmax [len(ids)], on the device; None where no
        captured graph fits (cached prefixes, too many tokens or chunks)."""
        if self.riding is None or self.disabled or len(chunks) > PREFILL_ROWS or any(start for _, start, _ in chunks):
            return None
        total = sum(len(t) for t, _, _ in chunks)
        n = next((b for b in self.prefill_buckets if b >= total), None)
        lane = self.riding
        r = next((b for b in lane.buckets if b >= len(ids)), None)
        key = (n, r, layout([len(t) for t, _, _ in chunks], n or 0))
        if key not in self.riding_graphs:
            return None
        self._load_prompts(chunks, adapters, n, key[2])
        lane.stage(r, step_inputs(r, ids, positions, take, row_adapters, write, rows, self.cache.scratch,
                                  self.cache.slots))
        graph, (logits, tokens) = self.riding_graphs[key]
        graph.replay()
        self.prefill_replays["riding"] += 1
        return logits[:len(chunks)], tokens[:len(ids)]

    def _load_prompts(self, chunks: list[tuple[list[int], int, list[int]]], adapters: list[int] | None, n: int,
                      layout: int) -> None:
        """Packed prompt chunks (``kvcache.pack_prompts``, ``n`` tokens wide, as many rows as ``layout`` has) and their
        tokens' adapter numbers into the prefill buffer, by one copy."""
        host = torch.empty(self.pf.shape[0], dtype=torch.long, pin_memory=True)  # cached pinned block, freed once copied
        h_ids, h_pos, h_write, h_cu, h_last, h_adapters = self._pf_parts(host)
        rows = _shape(layout, n)[0]
        h_ids[:n], h_pos[:n], h_write[:n], h_cu[:rows + 2], h_last[:rows] = kvcache.pack_prompts(
            chunks, self.cache.block_size, self.cache.scratch, width=n, rows=rows)
        if self.lora is not None:
            h_adapters[:n] = multilora.token_adapters([t for t, _, _ in chunks], adapters, n)
        self.pf.copy_(host, non_blocking=True)

    def prefill_groups(self, lengths: list[int], keys: list[int]) -> list[list[int]]:
        """Chunks of these lengths, attending to this many keys each, (in order) cut into groups that each fit one
        captured prefill graph, as index lists; a chunk larger than every graph goes alone (and prefills eagerly)."""
        if not self.prefill_graphs:
            return [list(range(len(lengths)))]
        groups: list[list[int]] = []
        size = attended = 0
        for i, (n, k) in enumerate(zip(lengths, keys)):
            if not groups or size + n > self.pf_width or attended + k > self.pk_width or len(groups[-1]) == PREFILL_ROWS:
                groups.append([])
                size = attended = 0
            groups[-1].append(i)
            size += n
            attended += k
        return groups

    def prefill(self, chunks: list[tuple[list[int], int, list[int]]], adapters: list[int] | None = None,
                general: bool = False) -> torch.Tensor | None:
        """Next-token logits ([len(chunks), V], on the device) of a packed prefill (``chunks`` as
        ``kvcache.pack_prompts`` takes them, with each chunk's adapter number) by one graph replay, or None when no
        captured graph fits (too many tokens, keys or chunks). ``general``: in the general layout whatever the
        chunks (for benchmarks)."""
        prompts = [tokens for tokens, _, _ in chunks]
        total = sum(len(p) for p in prompts)
        n = next((b for b in self.prefill_buckets if b >= total), None)
        k = 0
        if any(start for _, start, _ in chunks):  # continuing cached prefixes: their keys come from the pool
            attended = sum(start + len(t) for t, start, _ in chunks)
            k = next((b for b in self.key_buckets if b >= max(attended, n or 0)), None)
        if n is None or k is None or len(prompts) > PREFILL_ROWS or self.disabled:
            return None
        key = (n, k, GENERAL if general else layout([len(p) for p in prompts], n))
        if key not in self.prefill_graphs:
            return None
        rows = _shape(key[2], n)[0]
        if k:
            host_k = torch.empty(self.pk.shape[0], dtype=torch.long, pin_memory=True)
            index, cu_k, _ = kvcache.pack_keys(chunks, self.cache.block_size, self.cache.scratch, width=k, rows=rows)
            host_k[:k], host_k[self.pk_width:self.pk_width + rows + 2] = index, cu_k
            self.pk[:k].copy_(host_k[:k], non_blocking=True)
            self.pk[self.pk_width:].copy_(host_k[self.pk_width:], non_blocking=True)
        self._load_prompts(chunks, adapters, n, key[2])
        graph, logits = self.prefill_graphs[key]
        graph.replay()
        self.prefill_replays["cached" if k else "fresh"] += 1
        return logits[:len(prompts)]
