"""The GPU fast path for decode: each step replays a captured CUDA graph instead of launching the
model's ~600 kernels one by one from Python (the eager step is launch-bound: see benchmarks/NOTES.md).

Graphs are captured at load, one per (batch bucket, key-length bucket), over the same slot KV cache
and attention function as the eager path. Row i of a step is slot i, so attention reads keys in place
(no per-row gather); everything a step changes (token ids, positions) lives in one static device
buffer filled by a single host-to-device copy. Rows without a sequence write to the cache's scratch
position. The mask is computed inside the graph from the positions.

With ``compile=True`` the step is first compiled by ``torch.compile`` (inductor fuses the norms,
rotary embedding and activations of every layer into a few kernels) and the compiled step is what the
graphs capture: at batch 1 the step is made of hundreds of tiny kernels, so fewer of them is the win.

The step ends with the argmax of every row, written to a per-slot buffer on the device: a greedy
sequence's next step takes its input from there (``take``), so consecutive steps need no host round trip.
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
    def __init__(self, model, cache: kvcache.SlotCache, device: torch.device, tokens: torch.Tensor, *, min_kv: int = 128,
                 compile: bool = False):
        self.model, self.cache, self.device = model, cache, device
        self.tokens = tokens  # [slots] each slot's last argmax, on the device: the next step can read its input there
        self.batch_buckets = _buckets(cache.slots, 1)
        self.kv_buckets = _buckets(cache.max_len + 1, min(min_kv, cache.max_len + 1))
        bmax = self.batch_buckets[-1]
        # ids, positions, take (1: this row's input is ``tokens[row]``); two host buffers, so a step's inputs are
        # written while the previous step's copy may still be pending
        self.staging = torch.zeros((2, 3, bmax), dtype=torch.long, pin_memory=True)
        self._flip = 0
        self.packed = torch.zeros((3, bmax), dtype=torch.long, device=device)
        self.rows = torch.arange(bmax, device=device)
        self.keys = torch.arange(cache.max_len + 1, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.disabled = False
        self.forward = self._forward
        if compile:
            self.forward = torch.compile(self._forward, dynamic=True)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, take: torch.Tensor,
                 ctx: kvcache.StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        b = ids.shape[0]
        ids = torch.where(take.bool(), self.tokens[:b].view(b, 1), ids)
        logits = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1, codellm_step=ctx).logits[:, -1]
        nxt = logits.argmax(dim=-1)
        self.tokens[:b].copy_(nxt)
        return logits, nxt

    def _step(self, b: int, kv: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, pos, take = (self.packed[i, :b].view(b, 1) for i in range(3))
        keys = self.keys[:kv]
        mask = keys.view(1, 1, 1, -1) <= pos[:, None, :, None]
        ctx = kvcache.StepContext(self.cache, self.rows[:b], pos, kv, mask, None, {}, True)
        with kvcache.attention_backends(self.device):  # chosen at capture: never cuDNN (see attention_backends)
            return self.forward(ids, pos, take, ctx)

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
        """Capture every bucket now (seconds at load) rather than stalling streams mid-generation. A compiled
        step that fails to capture falls back to the plain one; a plain one that fails leaves decoding eager."""
        self.packed.zero_()
        self.packed[1].fill_(self.cache.max_len)  # capture-time writes land in the scratch position
        for b in self.batch_buckets:
            for kv in self.kv_buckets:
                while (b, kv) not in self.graphs and not self.disabled:
                    try:
                        self.graphs[(b, kv)] = self._capture(b, kv)
                    except Exception:
                        if self.forward is self._forward:
                            log.exception("CUDA graph capture failed; decoding eagerly")
                            self.disabled = True
                        else:
                            log.exception("capturing the compiled decode step failed; capturing it uncompiled")
                            self.forward = self._forward
                            self.graphs.clear()

    def run(self, ids: list[int], positions: list[int], take: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits [n, V], argmax [n]) on the device for one decode step whose row i is slot i (position -1: no
        sequence there; take 1: the input is the slot's last argmax, still on the device), or None when the graph
        path cannot run it. Nothing here waits for the device."""
        if self.disabled:
            return None
        n = len(ids)
        b = next((x for x in self.batch_buckets if x >= n), None)
        kv = next((x for x in self.kv_buckets if x >= max(positions) + 1), None)
        if b is None or kv is None:
            return None
        scratch = self.cache.max_len
        staging = self.staging[self._flip]
        self._flip ^= 1
        pad = [0] * (b - n)
        staging[:, :b] = torch.tensor([ids + pad, [p if p >= 0 else scratch for p in positions] + [scratch] * (b - n),
                                       take + pad])
        self.packed[:, :b].copy_(staging[:, :b], non_blocking=True)
        key = (b, kv)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(b, kv)
            except Exception:  # a model or kernel that cannot be captured: stay eager
                log.exception("CUDA graph capture failed; decoding eagerly from now on")
                self.disabled = True
                return None
        graph, (logits, tokens) = self.graphs[key]
        graph.replay()
        return logits[:n], tokens[:n]
