"""Split-KV attention for decode steps (one query token per row), as a Triton kernel.

torch's SDPA kernels are built for long query blocks: for a decode step they launch one program per
(row, head) that walks the whole key range, and they need a mask for per-row lengths, so every row reads
as many keys as the longest one (or the graph's key bucket). At batch 1 that is 8 programs on a GPU of
132 SMs, ~16 us a layer for a few hundred keys. Here every (row, KV head) is cut into ``splits`` pieces
of its *own* length (flash-decoding), each program reads only real keys, the query heads that share a KV
head are handled together (GQA without copying keys), and a second small kernel merges the pieces.

Keys are read through the block table of the paged cache, so a row's keys may lie anywhere in the pool.
Because lengths and tables are read on the device, one captured graph per batch size serves every context
length: no key-length buckets. Runs on CUDA with Triton; elsewhere (CPU, tests) the caller keeps SDPA.

A speculative check has a row per token: a sequence's last token and its k drafts, consecutive rows with one table
row. Read a row at a time, those k + 1 rows read the sequence's keys k + 1 times, and at 32 streams that made the
check's attention several times a decode step's. With ``offsets`` the rows of a sequence are taken together, up to
``run`` by one program, each query masked to its own position: the keys are read once.
``CODELLM_ATTENTION=sdpa`` turns it off (a benchmarking switch).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from codellm.engine import pointwise

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the kernel is GPU-only
    triton = None

log = logging.getLogger("codellm.engine")
BLOCK_N = 64


_BROKEN: set[tuple[str, bool]] = set()  # (device type, with runs) where a trial launch failed (see ``probe``)


def available(device: torch.device, head_dim: int) -> bool:
    """Whether decode steps on ``device`` with this head size run the kernel. Plain checks only: this runs
    inside the compiled decode step too."""
    return (pointwise.runs_on(device) and os.environ.get("CODELLM_ATTENTION", "triton") != "sdpa"
            and (device.type, False) not in _BROKEN and head_dim >= 16 and head_dim & (head_dim - 1) == 0)


def probe(device: torch.device, head_dim: int, run: int = 1) -> bool:
    """``available``, after one trial launch (at load, before any graph is captured): a Triton that cannot build
    the kernel on this device leaves decoding on SDPA instead of failing every step. ``run`` > 1 tries the kernel
    that takes a sequence's consecutive rows together (a speculative check's), which checks can do without."""
    if not available(device, head_dim) or (device.type, run > 1) in _BROKEN:
        return False
    try:
        k = torch.zeros(32, 1, head_dim, device=device)
        one = torch.ones(2, dtype=torch.int32, device=device)
        offsets = torch.arange(2, device=device) if run > 1 else None  # (long, as the verify lane's input)
        decode_attention(torch.zeros(2, 2, head_dim, device=device), k, k, one.view(2, 1) * 0, one, 1.0, 16,
                         offsets, run)
        return True
    except Exception:
        log.warning("the split-KV decode kernel%s does not run on %s; %s", " for checks" if run > 1 else "", device,
                    "checking drafts a row at a time" if run > 1 else "decoding with SDPA", exc_info=True)
        _BROKEN.add((device.type, run > 1))
        return False


def usable(query: torch.Tensor) -> bool:
    """Whether attention for this query ([B, Hq, T, D]) can use the kernel: one token per row."""
    return query.shape[2] == 1 and available(query.device, query.shape[-1])


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


PROGRAMS_PER_SM = 2  # measured on an H100 (NOTES run 20): more pieces per row cost more in merging than they win


def splits_for(rows: int, kv_heads: int, device: torch.device) -> int:
    """Enough pieces per (row, KV head) to give every SM ``PROGRAMS_PER_SM`` programs; at large batches, one."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 8
    want = -(-PROGRAMS_PER_SM * sms // max(1, rows * kv_heads))
    return max(1, min(32, want))


if triton is not None:
    @triton.jit
    def _partial(Q, K, V, Table, Lens, Offsets, Acc, ML,
                 sq_b, sq_h, sk_n, sk_h, sv_n, sv_h, st_b, sa_b, sa_h, sa_s, sm_b, sm_h, sm_s,
                 scale, splits, rows,
                 GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                 PAGE: tl.constexpr, IEEE: tl.constexpr, RUN: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        r = tl.arange(0, GROUP_P)  # query rows of this program: RUN tokens' query heads, token-major
        d = tl.arange(0, D)
        t = r // GROUP
        heads = h * GROUP + r % GROUP
        if RUN == 1:
            live = r < GROUP
            mine = tl.load(Lens + b)
            n = mine
        else:  # a program takes up to RUN consecutive rows of one sequence (they share its table row) and reads its
            # keys once for all of them; rows that continue a run another program leads do nothing
            first = tl.load(Offsets + b)
            first = tl.where(first % RUN == 0, first, -RUN - 1)  # (-RUN - 1 + t matches no offset)
            at = b + t
            inside = (t < RUN) & (at < rows)
            offset = tl.load(Offsets + at, mask=inside, other=-1)
            live = inside & (offset == first + t)
            mine = tl.load(Lens + at, mask=live, other=0)  # each token sees keys up to its own position
            n = tl.max(mine, 0)
        chunk = tl.cdiv(tl.cdiv(n, splits), 16) * 16  # the keys, cut evenly
        start = s * chunk
        end = tl.minimum(start + chunk, n)
        q = tl.load(Q + (b + t[:, None]) * sq_b + heads[:, None] * sq_h + d[None, :], mask=live[:, None], other=0.0)
        m = tl.full([GROUP_P], float("-inf"), tl.float32)
        lsum = tl.zeros([GROUP_P], tl.float32)
        acc = tl.zeros([GROUP_P, D], tl.float32)
        kbase = K + h * sk_h
        vbase = V + h * sv_h
        for off in range(start, end, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            valid = cols < end
            page = tl.load(Table + b * st_b + cols // PAGE, mask=valid, other=0)  # the pool rows of these keys
            rows_k = page.to(tl.int64) * PAGE + cols % PAGE
            k = tl.load(kbase + rows_k[:, None] * sk_n + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            if RUN == 1:
                scores = tl.where(valid[None, :], scores * scale, float("-inf"))
            else:
                scores = tl.where(valid[None, :] & (cols[None, :] < mine[:, None]), scores * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            if RUN != 1:  # a token whose keys all lie before this piece sees none of it
                m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m - m_new)
            lsum = lsum * alpha + tl.sum(p, 1)
            v = tl.load(vbase + rows_k[:, None] * sv_n + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if RUN != 1:
            m = tl.where(lsum > 0, m, float("-inf"))  # no key seen: the merge weighs this piece 0
        out_at = (b + t) * sa_b + heads * sa_h + s * sa_s
        tl.store(Acc + out_at[:, None] + d[None, :], acc, mask=live[:, None])
        ml_at = (b + t) * sm_b + heads * sm_h + s * sm_s
        tl.store(ML + ml_at, m, mask=live)
        tl.store(ML + ml_at + 1, lsum, mask=live)

    @triton.jit
    def _merge(Acc, ML, Out, sa_b, sa_h, sa_s, sm_b, sm_h, sm_s, so_b, so_h, splits,
               S_P: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, S_P)
        d = tl.arange(0, D)
        live = s < splits
        m = tl.load(ML + b * sm_b + h * sm_h + s * sm_s, mask=live, other=float("-inf"))
        lsum = tl.load(ML + b * sm_b + h * sm_h + s * sm_s + 1, mask=live, other=0.0)
        top = tl.max(m, 0)
        w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
        acc = tl.load(Acc + b * sa_b + h * sa_h + s[:, None] * sa_s + d[None, :], mask=live[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
        tl.store(Out + b * so_b + h * so_h + d, out.to(Out.dtype.element_ty))


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, lens: torch.Tensor, scale: float,
            page: int, offsets: torch.Tensor | None = None, run: int = 1) -> torch.Tensor:
    rows, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    run = run if offsets is not None else 1
    splits = splits_for(max(1, rows // run), hkv, q.device)  # programs that work: at least one a run
    acc = torch.empty((rows, hq, splits, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((rows, hq, splits, 2), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    _partial[(rows, hkv, splits)](
        q, k, v, table, lens, offsets if offsets is not None else lens, acc, ml,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), table.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2), ml.stride(0), ml.stride(1), ml.stride(2),
        scale, splits, rows,
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group * run)), D=d, BLOCK=BLOCK_N, PAGE=page,
        IEEE=q.dtype == torch.float32, RUN=run,
    )
    _merge[(rows, hq)](acc, ml, out, acc.stride(0), acc.stride(1), acc.stride(2), ml.stride(0), ml.stride(1),
                       ml.stride(2), out.stride(0), out.stride(1), splits,
                       S_P=max(2, triton.next_power_of_2(splits)), D=d)
    return out


@torch.library.custom_op("codellm::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
                     scale: float, page: int, offsets: torch.Tensor | None = None, run: int = 1) -> torch.Tensor:
    """Attention of ``q`` ([B, Hq, D], one token per row) over row b's first ``lens[b]`` keys in the paged pools
    ``k``/``v`` ([tokens, Hkv, D]): key j of row b is pool row ``table[b, j // page] * page + j % page``. With
    ``offsets`` (each row's place in its run: consecutive rows of one sequence, one table row, counted from 0), the
    rows of a run are taken ``run`` at a time by one program, which reads their keys once: a speculative check's
    k + 1 tokens cost about one row's reads instead of k + 1. An opaque op to ``torch.compile``, so the compiled
    and graph-captured step launches it as is."""
    return _launch(q, k, v, table, lens, scale, page, offsets, run)


@decode_attention.register_fake
def _(q, k, v, table, lens, scale, page, offsets=None, run=1):
    return torch.empty_like(q)
