"""Will a model fit? Estimates of weights + KV cache bytes, and what the device has free; and the Python heap
kept out of the garbage collector's way once a model is loaded."""

from __future__ import annotations

import gc
import json
import logging
import re
from typing import NamedTuple

import torch

from codellm.registry import manifest as mt

log = logging.getLogger("codellm.engine")

_STORED = {"float32": 4, "bfloat16": 2, "float16": 2}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def parse_size(text: str | None) -> int | None:
    """'8GB', '512MiB', '1.5GiB', '1000000' -> bytes."""
    if text is None or str(text).strip() == "":
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", str(text).lower())
    if not m:
        from codellm.errors import InvalidRequest

        raise InvalidRequest(f"invalid size {text!r} (e.g. 8GB, 512MiB)")
    unit = (m.group(2) or "b").rstrip("b") or ""
    base = 1024 if unit.endswith("i") else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.rstrip("i")]
    return int(float(m.group(1)) * base ** power)


class Footprint(NamedTuple):
    weights: int  # bytes the weights take once loaded (a rank's share, split over several)
    kv: int  # bytes of the paged KV pool (a rank's share)
    fitted: bool  # the default pool was cut to what fits beside the weights (``KV_SHARE``)
    copies: int = 1  # shares in the memory ``available`` measures: the ranks on CPU (one host), 1 on GPUs (one each)

    @property
    def total(self) -> int:
        return (self.weights + self.kv) * self.copies


KV_SHARE = 0.9  # of what codellm may use, the most weights and a default KV pool take together (vLLM's 0.9 default)


def footprint(registry, weights: mt.Manifest, options, kv_cache: bool = True, capacity: int | None = None) -> Footprint:
    """What a model takes once loaded, in the dtype asked for: its weights, and the engine's KV pool. A default pool
    (no --kv-cache-memory) larger than ``KV_SHARE`` of ``capacity`` less the weights is cut to that, down to one
    whole context: a serve of many sequences on a big model then starts with the cache the device holds, as
    vLLM's does, instead of refusing for want of one it never asked for. Split over tensor-parallel ranks, each
    holds the embeddings and LM head whole and 1/N of the rest and of the KV heads (``sharding``)."""
    from codellm.engine.loader import DEFAULT_NUM_CTX, pick_device

    device, dtype = pick_device(options.device, options.dtype)
    cuda = device.type == "cuda"
    target = torch.finfo(dtype).bits // 8
    stored = _STORED.get(weights.config.dtype or "", target)
    raw = sum(layer.size for layer in weights.layers_of(mt.WEIGHTS) if (layer.filename or "").endswith(".safetensors"))
    nbytes = int(raw * (0.3 if options.quantize == "nf4" else target / stored))
    world = getattr(options, "tensor_parallel", 1) or 1
    cfg = text_config(registry, weights) if kv_cache or world > 1 else None
    copies = 1 if cuda else world
    if world > 1 and cfg is not None:
        whole = cfg.get("vocab_size", 0) * cfg.get("hidden_size", 0) * target
        whole *= 1 if cfg.get("tie_word_embeddings", False) else 2
        nbytes = min(nbytes, whole) + max(0, nbytes - whole) // world
    if cfg is None or not kv_cache:
        return Footprint(nbytes, 0, False, copies)
    heads = cfg.get("num_attention_heads") or 1
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads)
    kv = cfg.get("num_key_value_heads") or heads
    max_len = min(options.num_ctx or DEFAULT_NUM_CTX, weights.config.context_length or DEFAULT_NUM_CTX)
    per_token = kv_bytes_per_token(cfg.get("num_hidden_layers", 0), max(1, kv // world), head_dim, target)
    pool = per_token * kv_tokens(cuda, max_len, options.kv_cache_memory, per_token, slots=options.slots)
    room = int(KV_SHARE * capacity) // copies - nbytes if capacity is not None else None
    if options.kv_cache_memory or room is None or pool <= room:
        return Footprint(nbytes, pool, False, copies)
    return Footprint(nbytes, per_token * kv_tokens(cuda, max_len, max(room, 1), per_token), True, copies)


def text_config(registry, weights: mt.Manifest) -> dict | None:
    """The weights' config.json as a dict (its text model's, for a model of several), None when it has none."""
    layer = weights.layer(mt.CONFIG)
    if not layer:
        return None
    cfg = json.loads(registry.read_layer(layer))
    return cfg.get("text_config", cfg)


def fit_on_device(device: torch.device, tokens: int, per_token: int, max_len: int, block_size: int = 16) -> int:
    """A default pool of ``tokens``, cut where it would leave less than ``1 - KV_SHARE`` of the device free
    (activations, CUDA graphs, cuBLAS workspaces), down to one whole context. The server's ``footprint`` sized it from
    what was free before the engine loaded; this measures, in the engine, what its weights, its CUDA context and
    anything else running there left."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    reserve = int((1 - KV_SHARE) * total)
    if tokens * per_token <= free - reserve:
        return tokens
    fitted = kv_tokens(True, max_len, max(free - reserve, 1), per_token, block_size)
    log.info("a KV cache of %s, what the device has free beside %s held back (%s free of %s)",
             human(fitted * per_token), human(reserve), human(free), human(total))
    return min(tokens, fitted)


def estimate(registry, weights: mt.Manifest, options, kv_cache: bool = True) -> int:
    """Bytes the weights take once loaded plus the engine's default KV pool (``footprint``, uncut), over all ranks."""
    return footprint(registry, weights, options, kv_cache).total


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    return 2 * layers * kv_heads * head_dim * itemsize


DEFAULT_KV_CONTEXTS = {True: 64, False: 8}  # whole contexts of KV memory by default (GPU, CPU)


def kv_tokens(cuda: bool, max_len: int, kv_cache_memory: int | None, per_token: int, block_size: int = 16,
              slots: int | None = None) -> int:
    """Tokens the paged KV pool holds: ``kv_cache_memory`` bytes; by default a whole context for each of ``slots``
    sequences when that is set (what a slot cache of that many would take), else 64 whole contexts (8 on CPU).
    At least one whole context and a block, so that any prompt the context allows can run."""
    if kv_cache_memory:
        tokens = kv_cache_memory // max(1, per_token)
    else:
        tokens = (slots or DEFAULT_KV_CONTEXTS[cuda]) * (max_len + 1)
    least = -(-(max_len + 1) // block_size) * block_size + block_size
    return max(least, tokens // block_size * block_size)


def available(options, used: int) -> int:
    """Bytes free for one more model: the device's free memory, capped by --memory-limit."""
    from codellm.engine.loader import pick_device

    device, _ = pick_device(options.device, options.dtype)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = _meminfo_available()
    if options.memory_limit is not None:
        free = min(free, options.memory_limit - used)
    return int(free)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def freeze_heap() -> None:
    """Collect once, then put everything alive (modules, the model's Python objects, tokenizer tables: a few hundred
    thousand objects) out of the garbage collector's reach. Otherwise every full collection walks all of it: 100-160
    ms during which the event loop, or the engine thread, stands still, a few times a minute under load (NOTES run
    21). vLLM freezes its heap after start-up the same way. Called after each load."""
    gc.collect()
    gc.freeze()
