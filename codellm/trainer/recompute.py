"""Selective activation checkpointing: which results a checkpointed decoder layer keeps for backward and
which it recomputes.

Full checkpointing reruns a layer's whole forward in backward, 4-bit dequantization and GEMMs included.
The selective policy keeps what is expensive to recompute and cheap to store per token (the outputs of
the large frozen matmuls and of attention) and recomputes the element-wise rest: norms, rotary, SiLU and
product, dropout (replayed from the saved RNG state), LoRA's low-rank matmuls. PyTorch's
``create_selective_checkpoint_contexts`` applies the policy op by op; outputs of matmuls with a LoRA rank
dimension (at most ``rank_max``) are recomputed, not stored.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

aten = torch.ops.aten
_ATTENTION = {
    getattr(aten, name).default for name in (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward",
        "_scaled_dot_product_flash_attention_for_cpu",
    ) if hasattr(aten, name)
}
_MATMULS = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2)}


def _policy(rank_max: int, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _ATTENTION:
        return CheckpointPolicy.MUST_SAVE
    if op in _MATMULS:
        a, b = (args[i] for i in _MATMULS[op])
        if min(a.shape[-1], b.shape[-1]) > rank_max:  # neither the inner nor the output width is a LoRA rank
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(rank_max: int):
    """A drop-in for ``torch.utils.checkpoint.checkpoint`` (non-reentrant) that applies the policy."""
    return partial(checkpoint, use_reentrant=False,
                   context_fn=partial(create_selective_checkpoint_contexts, partial(_policy, rank_max)))
