"""The paged KV cache, and the attention that reads it.

Keys and values live in blocks of one pool (``PagedCache``); which blocks a sequence holds is the block
pool's business (``blocks``). Every token of a step is told where its keys go (a cache row each) and what
it attends to: a decode row reads its sequence's blocks through the block table (the split-KV kernel on
GPUs, a gather and SDPA elsewhere), and a packed prefill of prompt chunks attends to each chunk's own keys
or, for a chunk that continues a cached prefix, to its whole sequence gathered from the pool. Nothing here
allocates per step except gathered keys, so the same steps are what CUDA graphs capture.

transformers models call attention through ``AttentionInterface``; registering ``codellm`` there
(with no mask function) makes them hand us rotary-embedded queries/keys with no cache of their
own. Outside a batch context the function falls back to plain SDPA, so the same model object
still trains or runs ``generate``.
"""

from __future__ import annotations

import contextvars
import itertools
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from codellm.engine import decode_attention

ATTN_IMPLEMENTATION = "codellm"
_CTX: contextvars.ContextVar["StepContext | None"] = contextvars.ContextVar("codellm_step", default=None)


SYNC_BUFFERS = 4  # host buffers ``PagedCache.sync`` takes in turn


class PagedCache:
    """Keys and values of every sequence, in fixed-size blocks of one pool (``blocks.BlockPool`` says which
    block holds what), and a block table: row r lists the blocks of the sequence decoding in batch row r.

    Each layer's pool is token-major, ``[(blocks + 1) * block_size, kv_heads, head_dim]``: token t of block b
    is row ``b * block_size + t``. The last block is scratch: padding writes go there and no sequence reads it.
    Table entries past a sequence's blocks point at it too, so a kernel that overreads stays in bounds."""

    def __init__(self, *, layers: int, blocks: int, block_size: int, rows: int, kv_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = ((blocks + 1) * block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.blocks, self.block_size, self.slots, self.max_len = blocks, block_size, rows, max_len
        self.width = -(-(max_len + 1) // block_size)  # table entries a row needs for a whole context
        self.table = torch.full((rows + 1, self.width), blocks, dtype=torch.int32, device=device)
        self._dirty: dict[int, list[int]] = {}
        self._scratch_row = array("i", [blocks] * self.width)
        # ``sync``'s host buffers, used in turn (pinned on a GPU), each with the event its last copy recorded, and the
        # device buffer they are copied to; each grows to the most rows one sync has written
        self._host: list[torch.Tensor | None] = [None] * SYNC_BUFFERS
        self._copied: list = [None] * SYNC_BUFFERS
        self._turn = 0
        self._staged = torch.empty(0, dtype=torch.int32, device=device)

    @property
    def scratch(self) -> int:
        """A token index that takes padding writes and is never read."""
        return self.blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def set_row(self, row: int, blocks: list[int]) -> None:
        """Row ``row`` of the table is now ``blocks`` (written to the device by the next ``sync``)."""
        self._dirty[row] = blocks

    def sync(self) -> None:
        """Copy the rows changed since the last call to the device table, in stream order with the steps: the row
        numbers and the rows go in one host-to-device copy from a reused buffer (pinned on a GPU: a copy from
        pageable memory would wait for the steps still running; a new pinned buffer each call cost more than the
        copy), then one ``index_copy_``."""
        if not self._dirty:
            return
        rows = sorted(self._dirty)
        n, width = len(rows), self.width
        flat = array("i", rows)  # the row numbers, then the rows end to end, scratch past each one's blocks
        for r in rows:
            blocks = self._dirty[r][:width]
            flat.extend(blocks)
            flat.extend(self._scratch_row[:width - len(blocks)])
        self._dirty.clear()
        cuda = self.table.is_cuda
        turn, self._turn = self._turn, (self._turn + 1) % SYNC_BUFFERS
        host, copied = self._host[turn], self._copied[turn]
        if host is None or host.numel() < len(flat) or (copied is not None and not copied.query()):
            # (a buffer a copy may still be reading is left to the pinned allocator, which frees it once that is done)
            room = max(len(flat), 4 * (width + 1))  # (at least four rows: most syncs write one to a few)
            host = self._host[turn] = torch.empty(room, dtype=torch.int32, pin_memory=cuda)
        host = host[:len(flat)]
        host.copy_(torch.frombuffer(flat, dtype=torch.int32))
        if self._staged.numel() < len(flat):
            self._staged = torch.empty(max(len(flat), 2 * self._staged.numel()), dtype=torch.int32,
                                       device=self.table.device)
        staged = self._staged[:len(flat)]
        staged.copy_(host, non_blocking=True)
        if cuda:
            self._copied[turn] = copied = copied or torch.cuda.Event()
            copied.record()
        self.table.index_copy_(0, staged[:n].long(), staged[n:].view(n, width))

    def index(self, tables: list[list[int]], length: int) -> torch.Tensor:
        """[len(tables), length] CPU token indices of positions 0..length-1 of each block list (scratch past its end)."""
        width = max(1, -(-length // self.block_size))
        tab = torch.full((len(tables), width), self.blocks, dtype=torch.long)
        for i, blocks in enumerate(tables):
            blocks = blocks[:width]
            if blocks:
                tab[i, :len(blocks)] = torch.tensor(blocks)
        return table_rows(tab, length, self.block_size)


@dataclass
class StepContext:
    """What every attention layer of one forward pass needs: where each token's keys go, what it attends to."""

    cache: PagedCache
    write: torch.Tensor  # [B, T] (packed: [1, N]) long: the cache row each token's keys and values go to
    positions: torch.Tensor  # [B, T] long: each query token's position (padding: 0 in a decode row)
    kv_len: int  # keys a row attends over (packed: the longest query run)
    mask: torch.Tensor | None = None  # [B, 1, T, kv_len] bool, True = may attend (None: the attention needs none)
    kv_index: torch.Tensor | None = None  # [B, kv_len] (packed: [Nk]) cache rows of the keys attended to
    memo: dict = field(default_factory=dict)  # built once a step for all layers: grouped masks, decode lengths
    # a decode step laid out by table row (row i of the batch is table row i): the split-KV kernel reads the
    # table and each row's length on the device
    table: torch.Tensor | None = None
    # a check of speculative drafts (a token a row): each row's place in its sequence's run of consecutive rows, and
    # the rows one kernel program takes together, reading their keys once
    offsets: torch.Tensor | None = None
    run: int = 1
    # a packed prefill (prompt chunks end to end in one row): cumulative query lengths [0, l1, l1+l2, ..., N], int32
    # on the device; padding is a last sequence of its own and repeated Ns are empty ones. Chunks that continue a
    # cached prefix attend to ``kv_index``, cut by ``cu_k`` (longest ``max_k``); fresh prompts attend to themselves.
    cu: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    max_k: int = 0
    # a packed prefill with decoding sequences riding in it: its tokens from ``rows_from`` on are one-token rows, each
    # attending to its sequence's first ``lens`` keys through its ``table`` row (the split-KV kernel's layout)
    rows_from: int = 0
    lens: torch.Tensor | None = None


def cache_row(blocks: list[int], position: int, block_size: int) -> int:
    """The pool row that holds ``position`` of the sequence with ``blocks``."""
    return blocks[position // block_size] * block_size + position % block_size


def cache_rows(blocks: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The pool rows of positions ``start`` to ``end`` (exclusive): a range per block, not a call per position."""
    rows: list[int] = []
    while start < end:
        block, offset = divmod(start, block_size)
        n = min(block_size - offset, end - start)
        base = blocks[block] * block_size + offset
        rows.extend(range(base, base + n))
        start += n
    return rows


def table_rows(table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """The pool rows of each table row's first ``length`` keys ([R, length]), on the table's device: tensor ops only,
    which a captured graph can hold."""
    keys = torch.arange(length, device=table.device)
    return table[:, keys // block_size].long() * block_size + keys % block_size


def step_context(cache: PagedCache, tables: list[list[int]], positions: torch.Tensor) -> StepContext:
    """An eager step over rows of tokens: row i holds the sequence with blocks ``tables[i]``, at ``positions``
    (a CPU tensor in which -1 marks padding). Keys are gathered from the pool for each row."""
    device = cache.k[0].device
    kv_len = int(positions.max()) + 1
    padded = positions < 0
    index = cache.index(tables, kv_len)
    write = index.gather(1, positions.clamp(min=0))
    write = torch.where(padded, cache.scratch, write) if bool(padded.any()) else write
    attend = positions.clamp(min=0).to(device, non_blocking=True)
    keys = torch.arange(kv_len, device=device)
    mask = keys.view(1, 1, 1, -1) <= attend[:, None, :, None]
    return StepContext(cache, write.to(device, non_blocking=True), attend, kv_len, mask, index.to(device, non_blocking=True))


def packed_context(cache: PagedCache, write: torch.Tensor, positions: torch.Tensor, cu: torch.Tensor, longest: int,
                   kv_index: torch.Tensor | None = None, cu_k: torch.Tensor | None = None, max_k: int = 0) -> StepContext:
    """A packed prefill over device tensors ([N] each). Only tensor ops on the device: a CUDA graph can capture it."""
    return StepContext(cache, write.view(1, -1), positions.view(1, -1), longest, kv_index=kv_index, cu=cu, cu_k=cu_k,
                       max_k=max_k)


def pack_prompts(chunks: list[tuple[list[int], int, list[int]]], block_size: int, scratch: int,
                 width: int | None = None, rows: int | None = None):
    """CPU tensors for a packed prefill of prompt ``chunks`` (tokens, first position, the sequence's blocks):
    ids, positions and cache row per token (``width`` of them; padding goes to ``scratch``), cumulative lengths
    (``rows + 2``: padding and unused rows are empty sequences at the end) and each chunk's last index (``rows``
    of them), which is where its next-token logits are read."""
    lengths = [len(t) for t, _, _ in chunks]
    total = sum(lengths)
    width, rows = width or total, rows or len(chunks)
    pad = width - total  # built as lists: torch's small CPU ops (repeat_interleave) start a thread pool per call
    ids = torch.tensor([t for p, _, _ in chunks for t in p] + [0] * pad, dtype=torch.long)
    pos = [start + i for (_, start, _), n in zip(chunks, lengths) for i in range(n)]
    positions = torch.tensor(pos + [0] * pad, dtype=torch.long)
    write = torch.tensor([r for (_, start, blocks), n in zip(chunks, lengths)
                          for r in cache_rows(blocks, start, start + n, block_size)] + [scratch] * pad, dtype=torch.long)
    ends = list(itertools.accumulate(lengths))
    cu = torch.tensor([0, *ends] + [width] * (rows + 1 - len(ends)), dtype=torch.long)
    last = torch.tensor([e - 1 for e in ends] + [0] * (rows - len(ends)), dtype=torch.long)
    return ids, positions, write, cu, last


def pack_keys(chunks: list[tuple[list[int], int, list[int]]], block_size: int, scratch: int = 0,
              width: int | None = None, rows: int | None = None):
    """For packed chunks that continue cached prefixes: the cache rows of every key each chunk attends to
    (positions 0 to its end; ``width`` of them, padding from ``scratch``), their cumulative counts (laid out as
    ``pack_prompts`` lays out the queries': the padding queries' sequence gets one padding key, so that it costs
    nothing) and the longest count (``width`` when padded: an upper bound is all attention needs)."""
    ends = [start + len(t) for t, start, _ in chunks]
    index = [r for (_, _, blocks), end in zip(chunks, ends) for r in cache_rows(blocks, 0, end, block_size)]
    total = sum(ends)
    width, rows = width or total, rows or len(chunks)
    cu_k = torch.tensor([0, *itertools.accumulate(ends)] + [min(total + 1, width)] * (rows + 1 - len(ends)),
                        dtype=torch.long)
    return torch.tensor(index + [scratch] * (width - total), dtype=torch.long), cu_k, max(ends) if width == total else width


def packed_step(cache: PagedCache, packed: list[tuple[list[int], int, list[int]]], fresh: bool, device):
    """What one eager forward of packed chunks (tokens, first position, blocks) needs: CPU ids and positions [N],
    each chunk's last index (CPU), and the step context on ``device``. Chunks that continue cached prefixes
    (not ``fresh``) attend to their whole sequences. Every tensor-parallel rank builds its step with this, from the
    same chunks."""
    ids, positions, write, cu, last = pack_prompts(packed, cache.block_size, cache.scratch)
    keys = {}
    if not fresh:
        index, cu_k, max_k = pack_keys(packed, cache.block_size)
        keys = dict(kv_index=index.to(device), cu_k=cu_k.to(device, torch.int32), max_k=max_k)
    ctx = packed_context(cache, write.to(device), positions.to(device), cu.to(device, torch.int32),
                         max(len(t) for t, _, _ in packed), **keys)
    return ids, positions, last, ctx


def riding_step(cache: PagedCache, packed: list[tuple[list[int], int, list[int]]], rows: list[tuple[int, int, list[int]]],
                slots: list[int], fresh: bool, device):
    """``packed_step`` with one-token rows after the chunks: (token, position, blocks) each, its sequence's table
    row in ``slots``. The rows' last indices follow the chunks' (one each); they attend by ``_rows_attention``."""
    ids, positions, last, ctx = packed_step(cache, packed, fresh, device)
    n, bs = ids.shape[0], cache.block_size
    ids = torch.cat([ids, torch.tensor([t for t, _, _ in rows], dtype=torch.long)])
    at = torch.tensor([p for _, p, _ in rows], dtype=torch.long)
    positions = torch.cat([positions, at])
    write = torch.tensor([cache_row(blocks, p, bs) for _, p, blocks in rows], dtype=torch.long)
    ctx.write = torch.cat([ctx.write, write.to(device).view(1, -1)], dim=1)
    ctx.positions = positions.to(device).view(1, -1)
    ctx.rows_from = n
    ctx.table = cache.table.index_select(0, torch.tensor(slots, device=cache.table.device))
    ctx.lens = (at + 1).to(device, torch.int32)
    return ids, positions, torch.cat([last, n + torch.arange(len(rows))]), ctx


def _packed_attention(ctx: StepContext, layer: int, query, key, value, scale) -> torch.Tensor:
    """[1, N, Hq, D]: every packed chunk attends causally to its sequence's keys (its own, when fresh). On GPUs in
    half precision this is FlashAttention's variable-length kernel (GQA native, no mask; a query run shorter than
    its keys is aligned to their end, which is causal order here); elsewhere one SDPA, over the sequences side by
    side where they are alike in length (``segments``), else with one block-diagonal causal mask; either is built
    once a step."""
    cu_k = ctx.cu_k if ctx.kv_index is not None else ctx.cu
    if not query.is_cuda:  # (a CUDA graph cannot capture the host reads that lay sequences out side by side)
        layout = ctx.memo.get("segments")
        if layout is None:
            nk = ctx.kv_index.shape[0] if ctx.kv_index is not None else key.shape[2]
            layout = ctx.memo["segments"] = segments(ctx.cu.tolist(), cu_k.tolist(), query.shape[2], nk)
        if layout:
            k_index = layout[1]
            if ctx.kv_index is not None:  # each sequence's keys straight from the pool, side by side
                rows = ctx.memo.get("segment_rows")
                if rows is None:
                    rows = ctx.memo["segment_rows"] = ctx.kv_index[k_index.to(ctx.kv_index.device)]
                keys, values = (pool[layer][rows].permute(0, 2, 1, 3) for pool in (ctx.cache.k, ctx.cache.v))
            else:
                keys, values = (t[0][:, k_index].transpose(0, 1) for t in (key, value))
            return _segment_attention(layout, query, keys, values, scale).transpose(1, 2).contiguous()
    if ctx.kv_index is not None:
        key = ctx.cache.k[layer][ctx.kv_index].transpose(0, 1).unsqueeze(0)  # [1, Hkv, Nk, D]
        value = ctx.cache.v[layer][ctx.kv_index].transpose(0, 1).unsqueeze(0)
    max_k = ctx.max_k if ctx.kv_index is not None else ctx.kv_len
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, heads, D]
        out = torch.ops.aten._flash_attention_forward(
            q, k.to(q.dtype), v.to(q.dtype), ctx.cu, cu_k, ctx.kv_len, max_k, 0.0, True, False, scale=scale)[0]
        return out.unsqueeze(0)
    mask = ctx.memo.get("packed")
    if mask is None:
        n, nk = query.shape[2], key.shape[2]
        seg_q = torch.searchsorted(ctx.cu, torch.arange(n, device=query.device), right=True)
        seg_k = torch.searchsorted(cu_k, torch.arange(nk, device=query.device), right=True)
        # a query run sits at the end of its keys: key j of a segment may be seen by query i when j's offset from
        # its segment's end is at least i's
        q_back = ctx.cu[seg_q.clamp(max=len(ctx.cu) - 1)] - torch.arange(n, device=query.device)
        k_back = cu_k[seg_k.clamp(max=len(cu_k) - 1)] - torch.arange(nk, device=query.device)
        mask = ctx.memo["packed"] = ((seg_q[:, None] == seg_k[None, :]) & (k_back[None, :] >= q_back[:, None]))[None, None]
    group = query.shape[1] // key.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (key, value))
    out = F.scaled_dot_product_attention(query, k.to(query.dtype), v.to(query.dtype), attn_mask=mask, scale=scale)
    return out.transpose(1, 2).contiguous()


def _rows_attention(ctx: StepContext, layer: int, query: torch.Tensor, scale: float) -> torch.Tensor:
    """[R, Hq, D]: one-token rows (``query`` [R, Hq, D]), row b over the first ``lens[b]`` keys of its ``table`` row:
    the split-KV kernel where it runs, else SDPA over each row's keys gathered from the pool (padded and masked)."""
    kc, vc, bs = ctx.cache.k[layer], ctx.cache.v[layer], ctx.cache.block_size
    if decode_attention.available(query.device, query.shape[-1]):
        return decode_attention.decode_attention(query, kc, vc, ctx.table, ctx.lens, scale, bs)
    index = table_rows(ctx.table, ctx.table.shape[1] * bs, bs)  # [R, longest]
    keys = torch.arange(index.shape[1], device=query.device)
    mask = (keys[None] < ctx.lens[:, None])[:, None, None]  # [R, 1, 1, longest]
    k, v = (pool[index].permute(0, 2, 1, 3).to(query.dtype) for pool in (kc, vc))  # [R, Hkv, longest, D]
    group = query.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(query[:, :, None], k, v, attn_mask=mask, scale=scale)[:, :, 0]


def segments(cu: list[int], cu_k: list[int], n: int, nk: int) -> tuple[torch.Tensor, ...] | None:
    """Packed sequences laid side by side, padded to the longest (query index, key index and mask, [S, Q], [S, K],
    [S, 1, Q, K]), where that is much less attention than one block-diagonal mask over all of them (None where it is
    not: a long prompt beside short ones pads every short one to its length). Many short checks beside each other
    cost a pass each over their own keys instead of everyone's."""
    spans = [(q0, q1, k0, k1) for q0, q1, k0, k1 in zip(cu, cu[1:], cu_k, cu_k[1:]) if q1 > q0]
    if len(spans) < 2:
        return None
    longest_q = max(q1 - q0 for q0, q1, _, _ in spans)
    longest_k = max(k1 - k0 for _, _, k0, k1 in spans)
    if 2 * len(spans) * longest_q * longest_k > n * nk:
        return None
    start = torch.tensor([[q0, k0] for q0, _, k0, _ in spans])
    size = torch.tensor([[q1 - q0, k1 - k0] for q0, q1, k0, k1 in spans])
    i, j = torch.arange(longest_q), torch.arange(longest_k)
    q_index = start[:, :1] + torch.minimum(i[None], size[:, :1] - 1)
    k_index = (start[:, 1:] + torch.minimum(j[None], (size[:, 1:] - 1).clamp(min=0))).clamp(max=max(nk - 1, 0))
    # a run of Q queries sits at the end of its K keys: query i sees key j up to its own, j <= K - Q + i
    q_valid = i[None] < size[:, :1]
    mask = (j[None, None] < size[:, None, 1:]) & (j[None, None] + size[:, None, :1] <= i[None, :, None] + size[:, None, 1:])
    mask = mask | ~q_valid[:, :, None]  # padding queries see their keys: no empty row, and they are dropped after
    return q_index, k_index, mask[:, None], q_valid.flatten().nonzero().squeeze(1)


def _segment_attention(layout, query, keys, values, scale) -> torch.Tensor:
    """[1, Hq, N, D] as the block-diagonal mask gives it, one padded row of sequences (``segments``); ``keys`` and
    ``values`` [S, Hkv, K, D]: each sequence's, laid out by the layout's key index."""
    q_index, _, mask, keep = layout
    q = query[0][:, q_index].transpose(0, 1)  # [S, Hq, Q, D]
    k, v = keys.to(query.dtype), values.to(query.dtype)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.device), scale=scale)  # [S, Hq, Q, D]
    return out.transpose(0, 1).flatten(1, 2)[:, keep.to(q.device)].unsqueeze(0)


@contextmanager
def use(ctx: StepContext):
    token = _CTX.set(ctx)
    try:
        yield ctx
    finally:
        _CTX.reset(token)


def current() -> StepContext | None:
    """The engine step being run on this thread (eager path), if any."""
    return _CTX.get()


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ctx = kwargs.pop("codellm_step", None) or _CTX.get()
    if ctx is None:  # not inside an engine step: behave like transformers' sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = module.layer_idx
    kc, vc = ctx.cache.k[layer], ctx.cache.v[layer]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    kc[ctx.write] = key.transpose(1, 2).to(kc.dtype)  # [B, T, Hkv, D] into the rows of the pool
    vc[ctx.write] = value.transpose(1, 2).to(vc.dtype)
    if ctx.cu is not None:
        if ctx.rows_from:  # the prompt chunks as a packed prefill, then the riding rows as a decode step
            n = ctx.rows_from
            head = _packed_attention(ctx, layer, query[:, :, :n], key[:, :, :n], value[:, :, :n], scale)
            rows = _rows_attention(ctx, layer, query[0, :, n:].transpose(0, 1), scale)
            return torch.cat([head[0], rows.to(head.dtype)]).unsqueeze(0), None
        return _packed_attention(ctx, layer, query, key, value, scale), None
    b, hq, t, d = query.shape
    if ctx.table is not None and decode_attention.usable(query):  # a decode step: split-KV over each row's own length
        lens = ctx.memo.get("lens")
        if lens is None:
            lens = ctx.memo["lens"] = (ctx.positions[:, 0] + 1).to(torch.int32)
        out = decode_attention.decode_attention(query[:, :, 0], kc, vc, ctx.table, lens, scale, ctx.cache.block_size,
                                                ctx.offsets, ctx.run)
        return out.reshape(b, 1, hq, d), None
    index = ctx.kv_index
    if index is None:  # a captured decode step on SDPA: the rows' keys from the device table
        index = ctx.memo.get("index")
        if index is None:
            index = ctx.memo["index"] = table_rows(ctx.table[:b], ctx.kv_len, ctx.cache.block_size)
    k = kc[index].permute(0, 2, 1, 3)  # [B, Hkv, kv_len, D]
    v = vc[index].permute(0, 2, 1, 3)
    hkv = k.shape[1]
    group = hq // hkv
    if group > 1:
        # GQA without copying keys: fold each KV head's query group into the query-length axis
        q = query.reshape(b, hkv, group * t, d)
        mask = ctx.memo.get(group)
        if mask is None:
            mask = ctx.memo[group] = ctx.mask.repeat(1, 1, group, 1)
    else:
        q, mask = query, ctx.mask
    out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)
    return out.reshape(b, hq, t, d).transpose(1, 2).contiguous(), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, slot_attention)
    return ATTN_IMPLEMENTATION


def attention_backends(device: torch.device):
    """Keep torch's cuDNN SDPA off the decode path: it rebuilds its plan for every new KV length."""
    if device.type != "cuda":
        import contextlib

        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
