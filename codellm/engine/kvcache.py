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
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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
    slots: torch.Tensor  # [B] long, on the cache's device
    positions: torch.Tensor  # [B, T] long: absolute position of each query token
    kv_len: int  # keys to attend over: max(position) + 1
    mask: torch.Tensor  # [B, 1, T, kv_len] bool, True = may attend
    single: tuple[int, int] | None  # (slot, first position) when one sequence's tokens are contiguous
    grouped_masks: dict = field(default_factory=dict)  # mask repeated per query group, built once a step for all layers
    identity: bool = False  # row i is slot i: read keys as a view of the cache, no per-row gather


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
    if ctx.single is not None:
        slot, start = ctx.single
        t = key.shape[2]
        kc[slot, :, start:start + t] = key[0].to(kc.dtype)
        vc[slot, :, start:start + t] = value[0].to(vc.dtype)
        k = kc[slot:slot + 1, :, :ctx.kv_len]
        v = vc[slot:slot + 1, :, :ctx.kv_len]
    else:
        rows = ctx.slots[:, None].expand_as(ctx.positions)
        kc[rows, :, ctx.positions] = key.transpose(1, 2).to(kc.dtype)
        vc[rows, :, ctx.positions] = value.transpose(1, 2).to(vc.dtype)
        if ctx.identity:  # a strided view: attention reads each row's keys where they are
            b = query.shape[0]
            k, v = kc[:b, :, :ctx.kv_len], vc[:b, :, :ctx.kv_len]
        else:
            k = kc[ctx.slots, :, :ctx.kv_len]
            v = vc[ctx.slots, :, :ctx.kv_len]
    b, hq, t, d = query.shape
    hkv = k.shape[1]
    group = hq // hkv
    if group > 1:
        # GQA without copying keys: fold each KV head's query group into the query-length axis
        q = query.reshape(b, hkv, group * t, d)
        mask = ctx.grouped_masks.get(group)
        if mask is None:
            mask = ctx.grouped_masks[group] = ctx.mask.repeat(1, 1, group, 1)
    else:
        q, mask = query, ctx.mask
    out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scaling)
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
