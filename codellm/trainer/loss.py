"""The training loss: next-token cross-entropy summed over labelled positions, computed without ever
holding [tokens x vocab] logits.

A plain ``model(...).logits`` with a 128k vocabulary materializes 4 GB of fp32 logits for 8k tokens (and
as much again for their gradient). Here the decoder's hidden states of labelled positions only go
through the output layer one chunk at a time, and each chunk's logits are recomputed in backward
instead of kept (TRL's chunked NLL, Liger's fused linear cross-entropy, in plain PyTorch). Models whose
head does more than a linear layer (soft-capping, logit scaling) take the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from codellm.trainer.prompts import IGNORE

_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def collate(items: list[tuple], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(ids, labels, attention mask, position ids) of a micro-batch; packed rows carry positions and no mask."""
    width = max(len(item[0]) for item in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    packed = len(items[0]) == 3
    positions = torch.zeros((len(items), width), dtype=torch.long) if packed else None
    for row, item in enumerate(items):
        i, lab = item[0], item[1]
        ids[row, :len(i)] = torch.tensor(i)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(i)] = 1
        if packed:  # padding continues as one more "sample" of its own
            positions[row, :len(i)] = torch.tensor(item[2])
            positions[row, len(i):] = torch.arange(width - len(i))
    return ids, labels, (None if packed else mask), positions


def labelled_tokens(items: list[tuple]) -> int:
    """How many next-token targets a batch of (ids, labels, ...) items has: the loss's denominator."""
    return sum(sum(1 for t in item[1][1:] if t != IGNORE) for item in items)


def _chunk_loss(hidden: torch.Tensor, target: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), target, reduction="sum")


class CausalLMLoss(torch.nn.Module):
    """Wraps a causal LM (or a PEFT model of one) so that ``forward`` returns the summed token loss: this
    module is what DistributedDataParallel wraps, so gradients sync through its forward, and the root that FSDP
    shards: the decoder and the output layer are both called inside its forward. ``device``: where it will run,
    when the model is still elsewhere (on the CPU, to be sharded)."""

    def __init__(self, model: torch.nn.Module, chunk_elements: int = 2 ** 27, device: torch.device | None = None):
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        # parts of ``model``, not submodules of this one: each weight keeps one name in the state dict (a
        # sharded model loads it by name, and a second name would be a second, unsharded copy)
        object.__setattr__(self, "head", base.get_output_embeddings())
        object.__setattr__(self, "decoder", base.get_decoder() if hasattr(base, "get_decoder") else None)
        self.chunked = (self.head is not None and self.decoder is not None
                        and not any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _HEAD_EXTRAS))
        self.chunk = max(128, chunk_elements // max(1, cfg.vocab_size))
        # 16-bit models compute under autocast: PEFT keeps LoRA weights in fp32 and, outside autocast, casts
        # every layer's input to fp32 and back (two activation-sized copies per adapted layer, each way)
        ref = next((p for p in model.parameters() if p.is_floating_point() and not p.requires_grad), None)
        self.autocast = ref.dtype if ref is not None and ref.dtype in (torch.bfloat16, torch.float16) else None
        self.device_type = device.type if device is not None else ref.device.type if ref is not None else "cpu"

    def forward(self, ids, labels, mask=None, positions=None) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            return self._loss(ids, labels, mask, positions)

    def _loss(self, ids, labels, mask, positions) -> torch.Tensor:
        target = labels[:, 1:]
        if not self.chunked:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            logits = logits[:, :-1].float()
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                                   reduction="sum")
        hidden = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
        keep = target != IGNORE  # unlabelled positions never reach the output layer
        hidden, target = hidden[:, :-1][keep], target[keep]
        if target.numel() == 0:  # nothing to learn here, but keep the graph connected for backward and DDP
            return hidden.sum().float() * 0.0
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, target.shape[0], self.chunk):
            h, t = hidden[start:start + self.chunk], target[start:start + self.chunk]
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_loss, h, t, self.head, use_reentrant=False)
            else:
                total = total + _chunk_loss(h, t, self.head)
        return total
