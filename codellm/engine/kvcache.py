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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "codellm"
_CTX: contextvars.ContextVar["StepContext | None"] = contextvars.ContextVar("codellm_step", default=None)


class SlotCache:
    def __init__(self, *, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.max_len = slots, max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class StepContext:
    """What every attention layer of one forward pass needs: which slots, at which positions."""

    cache: SlotCache
    slots: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B, T] long: absolute position of each query token
    kv_len: int  # keys to attend over: max(position) + 1
    mask: torch.Tensor  # [B, 1, T, kv_len] bool
    single: bool  # one sequence whose keys are a contiguous prefix: attend with is_causal-free views


def step_context(cache: SlotCache, slots: torch.Tensor, positions: torch.Tensor) -> StepContext:
    kv_len = int(positions.max().item()) + 1
    keys = torch.arange(kv_len, device=positions.device)
    mask = (keys.view(1, 1, 1, -1) <= positions[:, None, :, None])
    return StepContext(cache, slots, positions, kv_len, mask, single=slots.numel() == 1)


@contextmanager
def use(ctx: StepContext):
    token = _CTX.set(ctx)
    try:
        yield ctx
    finally:
        _CTX.reset(token)


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ctx = _CTX.get()
    if ctx is None:  # not inside an engine step: behave like transformers' sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = module.layer_idx
    kc, vc = ctx.cache.k[layer], ctx.cache.v[layer]
    if ctx.single:
        slot = int(ctx.slots[0])
        start = int(ctx.positions[0, 0])
        t = key.shape[2]
        kc[slot, :, start:start + t] = key[0]
        vc[slot, :, start:start + t] = value[0]
        k = kc[slot:slot + 1, :, :ctx.kv_len]
        v = vc[slot:slot + 1, :, :ctx.kv_len]
    else:
        rows = ctx.slots[:, None].expand_as(ctx.positions)
        kc[rows, :, ctx.positions] = key.transpose(1, 2)
        vc[rows, :, ctx.positions] = value.transpose(1, 2)
        k = kc[ctx.slots, :, :ctx.kv_len]
        v = vc[ctx.slots, :, :ctx.kv_len]
    out = F.scaled_dot_product_attention(
        query, k.to(query.dtype), v.to(query.dtype), attn_mask=ctx.mask, scale=scaling,
        enable_gqa=query.shape[1] != k.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, slot_attention)
    return ATTN_IMPLEMENTATION
