"""Where a decode step's time goes, in-process (no HTTP): per-step wall time at several batch sizes for
attention variants, and a torch.profiler table of the slowest ops.

    python benchmarks/engine_profile.py --home /tmp/b1 --model bench --batch 1,64
(build the model first with serve_bench.py --build llama3.2-1b --home /tmp/b1)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codellm.engine import kvcache  # noqa: E402
from codellm.engine.loader import load  # noqa: E402
from codellm.engine.sampling import SamplingParams  # noqa: E402
from codellm.engine.scheduler import Engine  # noqa: E402
from codellm.registry import Registry  # noqa: E402

ORIGINAL = kvcache.slot_attention


def gqa_variant(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Same cache writes, but SDPA's enable_gqa instead of folding query groups."""
    ctx = kvcache._CTX.get()
    if ctx is None:
        return ORIGINAL(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    layer = module.layer_idx
    kc, vc = ctx.cache.k[layer], ctx.cache.v[layer]
    if ctx.single is not None:
        slot, start = ctx.single
        t = key.shape[2]
        kc[slot, :, start:start + t] = key[0]
        vc[slot, :, start:start + t] = value[0]
        k, v = kc[slot:slot + 1, :, :ctx.kv_len], vc[slot:slot + 1, :, :ctx.kv_len]
    else:
        rows = ctx.slots[:, None].expand_as(ctx.positions)
        kc[rows, :, ctx.positions] = key.transpose(1, 2)
        vc[rows, :, ctx.positions] = value.transpose(1, 2)
        k, v = kc[ctx.slots, :, :ctx.kv_len], vc[ctx.slots, :, :ctx.kv_len]
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=ctx.mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def run(engine: Engine, batch: int, steps: int) -> float:
    done = threading.Event()
    left = [batch]
    lock = threading.Lock()

    def sink(out):
        if out.finish_reason:
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    before = engine.stats.steps
    start = time.perf_counter()
    for i in range(batch):
        engine.submit([300 + i] * 128, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), sink)
    done.wait(600)
    wall = time.perf_counter() - start
    return wall / max(1, engine.stats.steps - before)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--model", default="bench")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--steps", type=int, default=128)
    args = ap.parse_args()
    from transformers import AttentionInterface

    lm = load(Registry(args.home), args.model, num_ctx=512)
    results = {}
    graphs = Engine(lm, slots=64, cuda_graphs=True)
    for b in [int(x) for x in args.batch.split(",")]:
        run(graphs, b, 8)
        ms = run(graphs, b, args.steps) * 1000
        results[f"cuda_graphs/b{b}"] = round(ms, 2)
        print(f"cuda graphs batch {b}: {ms:.2f} ms/step, {b / ms * 1000:.0f} tok/s", flush=True)
    print("graphs captured:", sorted(graphs.graphs.graphs) if graphs.graphs else None, flush=True)
    from torch.profiler import ProfilerActivity, profile

    b = max(int(x) for x in args.batch.split(","))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(graphs, b, 16)
    print(f"--- CUDA graphs, batch {b}: GPU kernels by total time")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    print(f"--- CUDA graphs, batch {b}: CPU by total time")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=60))
    graphs.shutdown()
    if os.environ.get("GRAPHS_ONLY"):
        return
    engine = Engine(lm, slots=64, cuda_graphs=False)
    for variant, fn in (("fold", ORIGINAL), ("enable_gqa", gqa_variant)):
        AttentionInterface.register(kvcache.ATTN_IMPLEMENTATION, fn)
        for b in [int(x) for x in args.batch.split(",")]:
            run(engine, b, 8)
            ms = run(engine, b, args.steps) * 1000
            results[f"{variant}/b{b}"] = round(ms, 2)
            print(f"{variant} batch {b}: {ms:.2f} ms/step, {b / ms * 1000:.0f} tok/s", flush=True)
    AttentionInterface.register(kvcache.ATTN_IMPLEMENTATION, ORIGINAL)
    from torch.profiler import ProfilerActivity, profile

    for b in [int(x) for x in args.batch.split(",")]:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(engine, b, 16)
        print(f"--- batch {b}")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=50))
    out = os.environ.get("OUT")
    if out:
        Path(out, "engine_profile.json").write_text(json.dumps(results, indent=2))
    engine.shutdown()


if __name__ == "__main__":
    main()
