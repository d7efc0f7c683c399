"""The GPU fast path for decode: each step replays a captured CUDA graph instead of launching the
model's ~600 kernels one by one from Python (the eager step is launch-bound: see benchmarks/NOTES.md).

Graphs are captured lazily, one per (batch bucket, key-length bucket), over the same slot KV cache
and attention function as the eager path; everything a step changes (token ids, slots, positions)
lives in one static device buffer filled by a single host-to-device copy. Rows beyond the real batch
write into the cache's scratch slot. The mask is computed inside the graph from the positions.
"""

from __future__ import annotations

import logging

import torch

from codellm.engine import kvcache

log = logging.getLogger("codellm.engine")


def _buckets(limit: int, start: int) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


class GraphRunner:
    def __init__(self, model, cache: kvcache.SlotCache, device: torch.device, *, min_kv: int = 128):
        self.model, self.cache, self.device = model, cache, device
        self.batch_buckets = _buckets(cache.slots, 1)
        self.kv_buckets = _buckets(cache.max_len + 1, min(min_kv, cache.max_len + 1))
        bmax = self.batch_buckets[-1]
        self.staging = torch.zeros((3, bmax), dtype=torch.long, pin_memory=True)
        self.packed = torch.zeros((3, bmax), dtype=torch.long, device=device)  # ids, slots, positions
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.disabled = False

    def _step(self, b: int, kv: int) -> torch.Tensor:
        ids = self.packed[0, :b].view(b, 1)
        slots = self.packed[1, :b]
        pos = self.packed[2, :b].view(b, 1)
        keys = torch.arange(kv, device=self.device)
        mask = keys.view(1, 1, 1, -1) <= pos[:, None, :, None]
        ctx = kvcache.StepContext(self.cache, slots, pos, kv, mask, None, {})
        with kvcache.use(ctx):
            return self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1).logits[:, -1]

    def _capture(self, b: int, kv: int):
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm up kernels and allocator outside the graph
                self._step(b, kv)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            out = self._step(b, kv)
        log.info("captured decode graph for batch %d, keys %d", b, kv)
        return graph, out

    def warmup(self) -> None:
        """Capture every bucket now (a few seconds at load) rather than stalling streams mid-generation."""
        self.packed.zero_()
        self.packed[1].fill_(self.cache.scratch_slot)  # capture-time writes land in the scratch slot
        for b in self.batch_buckets:
            for kv in self.kv_buckets:
                if (b, kv) not in self.graphs and not self.disabled:
                    try:
                        self.graphs[(b, kv)] = self._capture(b, kv)
                    except Exception:
                        log.exception("CUDA graph capture failed; decoding eagerly")
                        self.disabled = True

    def run(self, ids: list[int], slots: list[int], positions: list[int]) -> torch.Tensor | None:
        """Logits [len(ids), V] for one decode step, or None when the graph path cannot run it."""
        if self.disabled:
            return None
        n = len(ids)
        b = next((x for x in self.batch_buckets if x >= n), None)
        kv = next((x for x in self.kv_buckets if x >= max(positions) + 1), None)
        if b is None or kv is None:
            return None
        pad = b - n
        self.staging[0, :b] = torch.tensor(ids + [0] * pad)
        self.staging[1, :b] = torch.tensor(slots + [self.cache.scratch_slot] * pad)
        self.staging[2, :b] = torch.tensor(positions + [0] * pad)
        self.packed[:, :b].copy_(self.staging[:, :b], non_blocking=True)
        key = (b, kv)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(b, kv)
            except Exception:  # a model or kernel that cannot be captured: stay eager
                log.exception("CUDA graph capture failed; decoding eagerly from now on")
                self.disabled = True
                return None
        graph, out = self.graphs[key]
        graph.replay()
        return out[:n]
