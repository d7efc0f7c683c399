"""Fused projections for decode: q, k and v in one GEMM, gate and up in another; fused pointwise kernels on GPUs.

At batch 1 a decode step is a chain of matrix-vector products; k and v (a few hundred rows each with
grouped-query attention) are too small to reach the GPU's memory bandwidth, and every GEMM is one more
kernel. Concatenating the weights gives 4 GEMMs a layer instead of 7, with no extra memory: the fused
weight is one tensor and each original ``nn.Linear`` keeps a view into it, so PEFT can still wrap the
layers, training and ``generate`` on the same model object see the usual modules, and a LoRA adapter
attached later simply takes the unfused path (the fused forward runs only while every projection is a
plain ``nn.Linear``). Quantized layers (bitsandbytes) are left alone.

Attention is fused only inside an engine step, where the attention function is ours (the paged cache);
outside one the model's own forward runs unchanged.

On a GPU the pointwise work between the GEMMs is done by fused kernels: RMSNorm as torch's ``rms_norm`` (one
kernel for the model's six: upcast, square, mean, rsqrt, scale, downcast), and the SiLU gate and the rotary embedding
of q and k as Triton kernels of ours (``pointwise``), where Triton runs; without it the rotary embedding is compiled
(a kernel each for the eager ten) and the gate stays two eager kernels. A packed prefill is GEMM-bound, and its eager
pointwise ops cost two-thirds again of its GEMM time; the norm and the compiled rotary took a fifth off a 2048-token
replay (Llama-3-8B shape on an H100: NOTES run 37). Inside a ``torch.compile`` trace (the compiled decode step) the
model's own ops run, which inductor fuses with their neighbours.
"""

from __future__ import annotations

import logging
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

from codellm.engine import kvcache, pointwise

log = logging.getLogger("codellm.engine")
# attention classes whose forward is q/k/v projections, rotary embedding, attention, o_proj (nothing else)
_ATTENTION = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}
_MLP = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
# norms whose forward is Llama's: weight * (x in fp32 scaled by rsqrt(mean(x^2) + eps)) in x's dtype
_NORM = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
_ATTENTION_ARGS = {"position_embeddings", "attention_mask", "cache", "past_key_values", "scaling", "dropout"}


def _fast(x: torch.Tensor) -> bool:
    """Whether the fused pointwise kernels run for ``x``: on a GPU, outside a compile trace."""
    return x.is_cuda and POINTWISE and not torch.compiler.is_compiling()


# switches for benchmarks/prefill_bench.py: the fused kernels at all; the Triton kernels of ``pointwise`` for the
# gate and the rotary embedding (else compiled rotary, eager gate); compiling for each new shape first and for the
# dimensions that changed after (torch.compile's default) instead of for any shape, with the gate compiled too
POINTWISE = True
KERNELS = True
AUTO_DYNAMIC = False


def _kernels(x: torch.Tensor) -> bool:
    """Whether ``pointwise``'s Triton kernels run for ``x``: they have no backward, so never where autograd records."""
    return KERNELS and _fast(x) and not x.requires_grad and pointwise.available(x)


class _Compiled:
    """A pointwise function compiled on its first GPU call (for any shape: one compile serves every graph bucket),
    where eager torch launches a kernel per op; the plain function wherever ``_fast`` says no, and from then on if
    compiling or running it fails once."""

    def __init__(self, fn):
        self.fn, self.compiled, self.broken = fn, None, False

    def __call__(self, *args):
        if self.broken or not _fast(args[0]):
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=None if AUTO_DYNAMIC else True)
        try:
            return self.compiled(*args)
        except Exception:
            log.warning("compiling %s failed; running it op by op", self.fn.__name__, exc_info=True)
            self.broken = True
            return self.fn(*args)


def _silu_gate(both: torch.Tensor) -> torch.Tensor:
    gate, up = both.chunk(2, dim=-1)
    return F.silu(gate) * up


_SILU_GATE = _Compiled(_silu_gate)
_ROTARY: dict = {}  # a model family's apply_rotary_pos_emb -> its compiled form


def recompile() -> None:
    """Compile the pointwise kernels again on their next call (after a switch changed)."""
    for fn in (_SILU_GATE, *_ROTARY.values()):
        fn.compiled, fn.broken = None, False


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
    family = sys.modules[type(module).__module__].apply_rotary_pos_emb
    rotary = _ROTARY.setdefault(family, _Compiled(family))
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
        if _kernels(q) and pointwise.rotary_fits(q, cos, sin) and pointwise.rotary_matches(family, q.device):
            q, k = pointwise.rotary(q, cos, sin), pointwise.rotary(k, cos, sin)
        else:
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
    silu = type(module.act_fn).__name__ in ("SiLU", "SiLUActivation") and split == module.up_proj.out_features
    original = module.forward

    def forward(self, x):
        if not _plain(self.gate_proj, self.up_proj):  # an adapter wraps them: PEFT's path
            return original(x)
        both = F.linear(x, weight, bias)
        if silu and AUTO_DYNAMIC:
            return self.down_proj(_SILU_GATE(both))
        if silu and _kernels(both):
            return self.down_proj(pointwise.silu_and_mul(both))
        return self.down_proj(self.act_fn(both[..., :split]) * both[..., split:])

    module.forward = types.MethodType(forward, module)
    return True


def _fuse_norm(module: nn.Module) -> bool:
    original = module.forward

    def forward(self, x):
        if _fast(x) and x.dtype == self.weight.dtype and not self.training:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.variance_epsilon)
        return original(x)

    module.forward = types.MethodType(forward, module)
    return True


def fuse(model: nn.Module) -> int:
    """Fuse the projections of every known attention and MLP block of ``model`` in place, and give its known norms
    the fused kernel; returns how many blocks were fused (0 for unknown architectures and quantized weights)."""
    done = 0
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "_codellm_fused", False) or hasattr(module, "_hf_hook"):  # accelerate wraps forward
                continue
            name = type(module).__name__
            if name in _NORM:
                module._codellm_fused = _fuse_norm(module)
            elif (name in _ATTENTION and _fuse_attention(module)) or (name in _MLP and _fuse_mlp(module)):
                module._codellm_fused = True
                done += 1
    return done
