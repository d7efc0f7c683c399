"""Fold a LoRA adapter into its base and store the result as a full model.

The base loads in 16-bit on a GPU (fp32 on CPU), never from 4-bit weights; the merge happens in
PEFT with ``safe_merge`` (checks for NaN/inf). Before storing, the merged model's logits on a probe
batch are compared with base + unmerged adapter and the largest difference is reported. The new
model shares every unchanged blob (tokenizer, template, license) with its base.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch

from codellm.errors import InvalidRequest
from codellm.registry import Registry
from codellm.registry import manifest as mt

PROBE = ["def fibonacci(n):\n    ", "Write a function that parses a CSV file.", "class Stack:\n    def push(self, item):"]


def merge(registry: Registry, name: str, as_name: str | None = None, *, dtype: str | None = None,
          device: str | None = None, status: Callable[[str], None] = lambda s: None):
    """Returns (new registry entry, max |logits difference| between merged and base + adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codellm.engine.loader import pick_device, resolve, weights_identity
    from codellm.registry import describe
    from codellm.registry.create import import_dir
    from codellm.registry.names import ModelName

    entry, weights = resolve(registry, name)
    if not entry.manifest.layers_of(mt.ADAPTER):
        raise InvalidRequest(f"{entry.name.short} has no adapter to merge", param="model")
    target = ModelName.parse(as_name) if as_name else ModelName(entry.name.namespace, f"{entry.name.model}-merged", entry.name.tag)
    dev, torch_dtype = pick_device(device, dtype)
    base_dir = registry.files_dir(weights, mt.FILE_LAYERS - {mt.ADAPTER}, key=f"w{weights_identity(weights)}")
    adapter_dir = registry.files_dir(entry.manifest, frozenset({mt.ADAPTER}), key=f"{entry.id}-adapter")
    status(f"loading {entry.manifest.config.base or 'base'} in {str(torch_dtype).removeprefix('torch.')} on {dev}")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype, attn_implementation="sdpa").to(dev)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    probe = tokenizer(PROBE, return_tensors="pt", padding=tokenizer.pad_token is not None) if tokenizer.pad_token else None
    batches = [probe] if probe is not None else [tokenizer(p, return_tensors="pt") for p in PROBE]
    with torch.no_grad():
        reference = [model(**{k: v.to(dev) for k, v in b.items()}).logits.float() for b in batches]
        status("merging adapter into the weights")
        merged = model.merge_and_unload(safe_merge=True)
        after = [merged(**{k: v.to(dev) for k, v in b.items()}).logits.float() for b in batches]
    max_diff = max(float((a - r).abs().max()) for a, r in zip(after, reference))
    status(f"merged logits vs base + adapter on {len(PROBE)} probes: max |difference| = {max_diff:.3g}")
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        layers, files = import_dir(registry, Path(tmp))
        layers = [l for l in layers if l.media_type in (mt.WEIGHTS, mt.CONFIG, mt.GENERATION_CONFIG)]
        config = describe.describe(files, source=weights.config.source or "merged")
    keep = {mt.TOKENIZER, mt.TEMPLATE, mt.PARAMS, mt.SYSTEM, mt.MESSAGES, mt.LICENSE, mt.README}
    for source in (weights, entry.manifest):  # the adapter model's own template/params win over its base's
        for layer in source.layers:
            if layer.media_type in keep:
                layers = [l for l in layers if not (l.media_type == layer.media_type and
                                                    (l.filename == layer.filename or layer.media_type in mt.SINGLE_LAYERS))]
                layers.append(layer)
    config.family, config.fim = weights.config.family, weights.config.fim
    config.chat_template = weights.config.chat_template or entry.manifest.config.chat_template
    config.source = "merged"
    saved = registry.save(target, mt.Manifest(config=config, layers=layers))
    return saved, max_diff
