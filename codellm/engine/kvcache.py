"""A static, slot-indexed KV cache with per-sequence positions, and the attention that uses it.

Every sequence owns one slot (a row of a preallocated ``[slots, kv_heads, max_len, head_dim]``
tensor per layer) and writes its keys/values at its own positions, so sequences of any lengths
decode in one batch. The same layout is what a CUDA-graph fast path captures: nothing here
allocates per step except the gathered keys.

transformers models call attention through ``AttentionInterface``; registering ``codellm`` there
(with no mask function) makes them hand us rotary-embedded queries/keys with no cache of their
own. Outside a batch context the function falls back to plain SDPA, so the same model object
still trains or runs ``generate``.
"""

from __future__ import annotations

import contextvars
import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from codellm.engine import decode_attention

ATTN_IMPLEMENTATION = "codellm"
_CTX: contextvars.ContextVar["StepContext | None"] = contextvars.ContextVar("codellm_step", default=None)


class SlotCache:
    def __init__(self, *, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        # one scratch slot (index ``slots``) and one scratch position (``max_len``) take padding writes
        shape = (slots + 1, kv_heads, max_len + 1, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.max_len = slots, max_len

    @property
    def scratch_slot(self) -> int:
        return self.slots

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class StepContext:
    """What every attention layer of one forward pass needs: which slots, at which positions."""

    cache: SlotCache
    slots: torch.Tensor  # [B] long, on the cache's device ([1, N]: each token's slot, when packed)
    positions: torch.Tensor  # [B, T] long: absolute position of each query token (the write position)
    kv_len: int  # keys to attend over: max(position) + 1
    mask: torch.Tensor | None  # [B, 1, T, kv_len] bool, True = may attend (None: the attention needs none)
    single: tuple[int, int] | None  # (slot, first position) when one sequence's tokens are contiguous
    memo: dict = field(default_factory=dict)  # built once a step for all layers: grouped masks, decode lengths
    identity: bool = False  # row i is slot i: read keys as a view of the cache, no per-row gather
    # a packed prefill (fresh prompts end to end in one row, each attending only to itself, causally): cumulative
    # lengths [0, l1, l1+l2, ..., N], int32 on the device; padding is a last sequence of its own and repeated Ns are
    # empty ones; kv_len then bounds every prompt's length
    cu: torch.Tensor | None = None


def step_context(cache: SlotCache, slots: list[int], positions: torch.Tensor) -> StepContext:
    """``positions`` is a CPU tensor in which -1 marks padding; what the layers index with is moved to
    the cache's device once per step. Padding writes go to a scratch position no sequence reads.
    When ``slots`` is ``0..B-1`` (a decode step laid out by slot) keys are read in place."""
    device = cache.k[0].device
    kv_len = int(positions.max()) + 1
    padded = bool((positions < 0).any())
    single = (slots[0], int(positions[0, 0])) if len(slots) == 1 and not padded else None
    identity = slots == list(range(len(slots)))
    write = torch.where(positions < 0, cache.max_len, positions) if padded else positions
    pos = write.to(device, non_blocking=True)
    attend = positions.clamp(min=0).to(device, non_blocking=True) if padded else pos
    keys = torch.arange(kv_len, device=device)
    mask = keys.view(1, 1, 1, -1) <= attend[:, None, :, None]
    return StepContext(cache, torch.tensor(slots, device=device), pos, kv_len, mask, single, {}, identity)


def packed_context(cache: SlotCache, slots: torch.Tensor, positions: torch.Tensor, cu: torch.Tensor,
                   longest: int) -> StepContext:
    """A packed prefill over device tensors ``slots`` and ``positions`` ([N]; -1 marks padding, which writes
    to the scratch slot's scratch position). Only tensor ops on the device: a CUDA graph can capture it."""
    pad = positions < 0
    write = torch.where(pad, cache.max_len, positions).view(1, -1)
    rows = torch.where(pad, cache.scratch_slot, slots).view(1, -1)
    return StepContext(cache, rows, write, longest, None, None, cu=cu)


def pack_prompts(prompts: list[list[int]], slots: list[int], width: int | None = None, rows: int | None = None):
    """CPU tensors for a packed prefill of fresh ``prompts`` (each from position 0) into ``slots``:
    ids, positions and slot per token (``width`` of them; padding has position -1), cumulative lengths
    (``rows + 2``: padding and unused rows are empty sequences at the end) and each prompt's last index
    (``rows`` of them), which is where its next-token logits are read."""
    lengths = [len(p) for p in prompts]
    total = sum(lengths)
    width, rows = width or total, rows or len(prompts)
    pad = width - total  # built as lists: torch's small CPU ops (repeat_interleave) start a thread pool per call
    ids = torch.tensor([t for p in prompts for t in p] + [0] * pad, dtype=torch.long)
    positions = torch.tensor([i for n in lengths for i in range(n)] + [-1] * pad, dtype=torch.long)
    token_slots = torch.tensor([s for s, n in zip(slots, lengths) for _ in range(n)] + [0] * pad, dtype=torch.long)
    ends = list(itertools.accumulate(lengths))
    cu = torch.tensor([0, *ends] + [width] * (rows + 1 - len(ends)), dtype=torch.long)
    last = torch.tensor([e - 1 for e in ends] + [0] * (rows - len(ends)), dtype=torch.long)
    return ids, positions, token_slots, cu, last


def _packed_attention(ctx: StepContext, query, key, value, scale) -> torch.Tensor:
    """[1, N, Hq, D]: every packed prompt attends causally to itself. On GPUs in half precision this is
    FlashAttention's variable-length kernel (GQA native, no mask); elsewhere one SDPA with a block-diagonal
    causal mask, built once a step."""
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, heads, D]
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, ctx.cu, ctx.cu, ctx.kv_len, ctx.kv_len, 0.0, True, False, scale=scale)[0]
        return out.unsqueeze(0)
    mask = ctx.memo.get("packed")
    if mask is None:
        n = query.shape[2]
        tokens = torch.arange(n, device=query.device)
        seg = torch.searchsorted(ctx.cu, tokens, right=True)  # a prompt's tokens lie in position order
        mask = ctx.memo["packed"] = ((seg[:, None] == seg[None, :]) & (tokens[None, :] <= tokens[:, None]))[None, None]
    group = query.shape[1] // key.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (key, value))
    out = F.scaled_dot_product_attention(query, k.to(query.dtype), v.to(query.dtype), attn_mask=mask, scale=scale)
    return out.transpose(1, 2).contiguous()


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
    if ctx.single is not None:
        slot, start = ctx.single
        t = key.shape[2]
        kc[slot, :, start:start + t] = key[0].to(kc.dtype)
        vc[slot, :, start:start + t] = value[0].to(vc.dtype)
        k = kc[slot:slot + 1, :, :ctx.kv_len]
        v = vc[slot:slot + 1, :, :ctx.kv_len]
    else:
        rows = ctx.slots if ctx.cu is not None else ctx.slots[:, None].expand_as(ctx.positions)
        kc[rows, :, ctx.positions] = key.transpose(1, 2).to(kc.dtype)
        vc[rows, :, ctx.positions] = value.transpose(1, 2).to(vc.dtype)
        if ctx.cu is not None:
            return _packed_attention(ctx, query, key, value, scale), None
        if ctx.identity:  # a strided view: attention reads each row's keys where they are
            b = query.shape[0]
            k, v = kc[:b, :, :ctx.kv_len], vc[:b, :, :ctx.kv_len]
        else:
            k = kc[ctx.slots, :, :ctx.kv_len]
            v = vc[ctx.slots, :, :ctx.kv_len]
    b, hq, t, d = query.shape
    if ctx.identity and decode_attention.usable(query):  # a decode step: split-KV kernel over each row's own length
        lens = ctx.memo.get("lens")
        if lens is None:
            pos = ctx.positions[:, 0]
            lens = ctx.memo["lens"] = torch.where(pos >= ctx.cache.max_len, 1, pos + 1).to(torch.int32)
        out = decode_attention.decode_attention(query[:, :, 0], kc, vc, lens, scale)
        return out.reshape(b, 1, hq, d), None
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
