"""Unmerged LoRA adapters inside captured CUDA graphs: every row of a step may use a different adapter.

PEFT's mixed-batch path (``adapter_names``) splits the batch per adapter with Python lists and index copies,
which no CUDA graph can hold. Here each PEFT LoRA layer gets its adapters stacked once, at attach time
(Punica/S-LoRA's layout, in its simplest form): A as ``[R, in]`` and B as ``[out, R]`` with each adapter's
scaling folded in, R the sum of their ranks. A step then adds ``((x @ A.T) * mask) @ B.T`` to the base
layer's output, where ``mask[row, j]`` is 1 when rank column j belongs to that row's adapter: two small
GEMMs a layer whatever the mix, and base rows (adapter index 0) get exactly zero. The masks are computed
once per step from one index per row (decode) or per token (packed prefill), inside the graph.

Outside a captured step (``Rows.masks`` is None) the layers run PEFT's own forward unchanged, so eager
steps, prompt logprobs, training and merging see plain PEFT.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn


class Rows:
    """Which adapter each row or token of the step being captured uses, as one 0/1 mask per rank layout
    (layers an adapter does not target have fewer ranks stacked). ``index`` maps adapter names to their
    number; 0 is the base model."""

    def __init__(self, names: list[str], dtype: torch.dtype):
        self.index = {name: i + 1 for i, name in enumerate(names)}
        self.dtype = dtype
        self.layouts: dict[tuple[int, ...], torch.Tensor] = {}  # rank owners -> [R] adapter numbers, on the device
        self.masks: dict[tuple[int, ...], torch.Tensor] | None = None

    def of(self, adapter: str | None) -> int:
        return self.index.get(adapter, 0) if adapter else 0

    @contextlib.contextmanager
    def active(self, ids: torch.Tensor):
        """Within: LoRA layers take each row's adapter from ``ids`` ([rows, 1] adapter numbers for decode, [1, tokens]
        for a packed prefill, on the device); after: PEFT's own path again."""
        self.masks = {key: (ids.unsqueeze(-1) == owner).to(self.dtype) for key, owner in self.layouts.items()}
        try:
            yield
        finally:
            self.masks = None


def token_adapters(prompts: list[list[int]], adapters: list[int] | None, width: int) -> torch.Tensor:
    """Each token's adapter number for a packed prefill of ``prompts`` (0 past them: padding)."""
    per = [a for p, a in zip(prompts, adapters or [0] * len(prompts)) for _ in p]
    return torch.tensor(per + [0] * (width - len(per)), dtype=torch.long)


def _supported(layer: nn.Module, name: str) -> bool:
    """Plain LoRA on a linear layer: no DoRA or other variant, no LoRA bias, not merged."""
    return (isinstance(layer.lora_A[name], nn.Linear) and isinstance(layer.lora_B[name], nn.Linear)
            and layer.lora_B[name].bias is None and name not in getattr(layer, "lora_variant", {})
            and not getattr(layer, "fan_in_fan_out", False) and not layer.merged)


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    rows: Rows | None = self._codellm_rows
    if rows is None or rows.masks is None or kwargs.get("adapter_names") is not None:
        return self._codellm_peft_forward(x, *args, **kwargs)
    a, b, key = self._codellm_stack
    out = self.base_layer(x, *args, **kwargs)
    return out + F.linear(F.linear(x.to(a.dtype), a) * rows.masks[key], b).to(out.dtype)


def install(model: nn.Module, names: list[str], dtype: torch.dtype) -> Rows | None:
    """Stack the adapters ``names`` (in PEFT's order) of every LoRA layer of ``model`` and route captured steps
    through the stacks; None, leaving every layer to PEFT, when some layer holds a kind of LoRA this does not
    cover (DoRA, LoRA on embeddings, ...). Called again after each attach: the stacks are rebuilt."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or not names:  # none left: every layer back to PEFT's forward, which adds nothing
        for layer in layers:
            layer._codellm_rows = None
        return None
    present = [[n for n in names if n in layer.lora_A] for layer in layers]
    if not all(_supported(layer, n) for layer, ns in zip(layers, present) for n in ns):
        for layer in layers:
            if hasattr(layer, "_codellm_rows"):
                layer._codellm_rows = None
        return None
    rows = Rows(names, dtype)
    with torch.no_grad():
        for layer, ns in zip(layers, present):
            if not ns:
                layer._codellm_rows = None
                continue
            a = torch.cat([layer.lora_A[n].weight.to(dtype) for n in ns])
            b = torch.cat([(layer.lora_B[n].weight.float() * layer.scaling[n]).to(dtype) for n in ns], dim=1)
            key = tuple(rows.index[n] for n in ns for _ in range(layer.lora_A[n].out_features))
            if key not in rows.layouts:
                rows.layouts[key] = torch.tensor(key, device=a.device)
            layer._codellm_stack = (a, b, key)
            if not hasattr(layer, "_codellm_peft_forward"):
                layer._codellm_peft_forward = layer.forward
                layer.forward = types.MethodType(_forward, layer)
            layer._codellm_rows = rows
    return rows
