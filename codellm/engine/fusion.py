"""Fused projections for decode: q, k and v in one GEMM, gate and up in another.

At batch 1 a decode step is a chain of matrix-vector products; k and v (a few hundred rows each with
grouped-query attention) are too small to reach the GPU's memory bandwidth, and every GEMM is one more
kernel. Concatenating the weights gives 4 GEMMs a layer instead of 7, with no extra memory: the fused
weight is one tensor and each original ``nn.Linear`` keeps a view into it, so PEFT can still wrap the
layers, training and ``generate`` on the same model object see the usual modules, and a LoRA adapter
attached later simply takes the unfused path (the fused forward runs only while every projection is a
plain ``nn.Linear``). Quantized layers (bitsandbytes) are left alone.

Attention is fused only inside an engine step, where the attention function is ours (the paged cache);
outside one the model's own forward runs unchanged.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

from codellm.engine import kvcache

# attention classes whose forward is q/k/v projections, rotary embedding, attention, o_proj (nothing else)
_ATTENTION = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}
_MLP = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}
_ATTENTION_ARGS = {"position_embeddings", "attention_mask", "cache", "past_key_values", "scaling", "dropout"}


def _plain(*layers) -> bool:
    return all(type(layer) is nn.Linear for layer in layers)


def _concat(layers: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One weight (and bias) for ``layers``; each layer's parameters become views of it."""
    if not _plain(*layers) or any(layer.weight.device.type == "meta" for layer in layers):
        return None
    biases = [layer.bias is not None for layer in layers]
    if any(biases) and not all(biases):
        return None
    weight = torch.cat([layer.weight.data for layer in layers])
    bias = torch.cat([layer.bias.data for layer in layers]) if all(biases) else None
    sizes = [layer.out_features for layer in layers]
    for layer, w in zip(layers, weight.split(sizes)):
        layer.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)
    if bias is not None:
        for layer, b in zip(layers, bias.split(sizes)):
            layer.bias = nn.Parameter(b, requires_grad=layer.bias.requires_grad)
    return weight, bias


def _fuse_attention(module: nn.Module) -> bool:
    layers = [module.q_proj, module.k_proj, module.v_proj]
    fused = _concat(layers)
    if fused is None:
        return False
    weight, bias = fused
    sizes = [layer.out_features for layer in layers]
    rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb
    original = module.forward

    def forward(self, hidden_states, *args, **kwargs):
        # (position_embeddings, attention_mask, cache) by position or name; the cache argument's name changed
        # across transformers releases (past_key_values -> cache), so it is looked up under both
        named = dict(zip(("position_embeddings", "attention_mask", "cache"), args))
        named.update(kwargs)
        step = named.get("codellm_step") or kvcache.current()
        cached = named.get("cache") is not None or named.get("past_key_values") is not None
        if step is None or cached or self.training or not _plain(self.q_proj, self.k_proj, self.v_proj):
            return original(hidden_states, *args, **kwargs)
        rest = {k: v for k, v in named.items() if k not in _ATTENTION_ARGS}
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in F.linear(hidden_states, weight, bias).split(sizes, dim=-1))
        cos, sin = named["position_embeddings"]
        q, k = rotary(q, k, cos, sin)
        out, _ = kvcache.slot_attention(self, q, k, v, named.get("attention_mask"), scaling=self.scaling, **rest)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), None

    module.forward = types.MethodType(forward, module)
    return True


def _fuse_mlp(module: nn.Module) -> bool:
    fused = _concat([module.gate_proj, module.up_proj])
    if fused is None:
        return False
    weight, bias = fused
    split = module.gate_proj.out_features
    original = module.forward

    def forward(self, x):
        if not _plain(self.gate_proj, self.up_proj):  # an adapter wraps them: PEFT's path
            return original(x)
        both = F.linear(x, weight, bias)
        return self.down_proj(self.act_fn(both[..., :split]) * both[..., split:])

    module.forward = types.MethodType(forward, module)
    return True


def fuse(model: nn.Module) -> int:
    """Fuse the projections of every known attention and MLP block of ``model`` in place; returns how many
    blocks were fused (0 for unknown architectures and quantized weights)."""
    done = 0
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "_codellm_fused", False) or hasattr(module, "_hf_hook"):  # accelerate wraps forward
                continue
            name = type(module).__name__
            if (name in _ATTENTION and _fuse_attention(module)) or (name in _MLP and _fuse_mlp(module)):
                module._codellm_fused = True
                done += 1
    return done
