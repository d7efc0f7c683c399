"""A leaner forward for PEFT's LoRA layers during training: ``base(x) + scale * B(A(dropout(x)))`` as one
``addmm`` onto the base output.

PEFT writes the low-rank product out, scales it, adds it (and its 4-bit layer clones the base output
first): three to four extra passes over an activation-sized tensor per adapted layer, each way. ``addmm``
accumulates ``A(x) @ B^T * scale`` into the base output in the GEMM itself, and its backward passes the
output gradient straight through. Same parameters, same dropout draws, same result (tests compare losses
and gradients with PEFT's own forward); anything unusual (several active adapters, DoRA and other
variants, merged or disabled adapters, per-row adapter names) takes PEFT's path.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    names = [a for a in self.active_adapters if a in self.lora_A]
    if (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(names) != 1
            or names[0] in self.lora_variant):
        return type(self).forward(self, x, *args, **kwargs)
    name = names[0]
    result = self.base_layer(x, *args, **kwargs)
    a_weight, b_weight = self.lora_A[name].weight, self.lora_B[name].weight
    dtype = result.dtype if not torch.is_autocast_enabled(result.device.type) else torch.get_autocast_dtype(result.device.type)
    low = F.linear(self.lora_dropout[name](x).to(dtype), a_weight.to(dtype))
    n = result.shape[-1]
    out = torch.addmm(result.reshape(-1, n).to(dtype), low.reshape(-1, low.shape[-1]), b_weight.to(dtype).t(),
                      alpha=self.scaling[name])
    return out.view(*result.shape[:-1], n).to(result.dtype)


def install(model: torch.nn.Module) -> int:
    """Give every LoRA layer of ``model`` the fused forward; returns how many layers got it."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer") and isinstance(module.base_layer, torch.nn.Module) \
                and getattr(module, "lora_A", None) is not None and not isinstance(module.base_layer, torch.nn.Embedding):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
