"""How long one captured packed-prefill replay takes, in-process (no HTTP), for a few packings of fresh prompts,
with the prefill graphs captured over the model's own pointwise ops (eager), over the engine's fused pointwise
kernels (fused: ``fusion.POINTWISE`` with the Triton gate and rotary of ``pointwise``, the default), over the fused
norm with the rotary embedding compiled for any shape and the gate eager (fused-compiled: ``fusion.KERNELS`` off, the
GPU path where Triton does not run), over that compiled shape by shape with the gated activation compiled too
(fused-auto: ``fusion.AUTO_DYNAMIC``) or compiled whole (``GraphRunner(compile_prefill=True)``: many minutes for an 8B
model), and which kernels fill each packing's replay (torch.profiler). A packing that takes a prefill graph of a smaller
attention grid (``cudagraph.layout``) is timed in the general layout too.

    python benchmarks/prefill_bench.py --home /root/h8 --packings 16x128,1x2048,4x128 --variants eager,fused
(build the model first with serve_bench.py --build llama3-8b --home /root/h8)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from codellm.engine import cudagraph, fusion, kvcache  # noqa: E402
from codellm.engine.core import Engine  # noqa: E402
from codellm.engine.loader import load  # noqa: E402
from codellm.registry import Registry  # noqa: E402


def packing(text: str, block_size: int) -> list[tuple[list[int], int, list[int]]]:
    """'16x128': 16 fresh prompts of 128 tokens, each on blocks of its own (what they write is never read);
    '4x512+2048': 4 chunks of 512 tokens, each continuing a cached prefix of 2048 (an agent's next turn)."""
    shape, _, cached = text.partition("+")
    count, length = (int(x) for x in shape.split("x"))
    start = int(cached or 0)
    per = -(-(start + length) // block_size)
    return [([1000 + i] * length, start, list(range(i * per, (i + 1) * per))) for i in range(count)]


def replay_ms(graphs, chunks, reps: int, general: bool = False) -> float:
    for _ in range(3):
        graphs.prefill(chunks, general=general)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        graphs.prefill(chunks, general=general)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / reps


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / reps


def riding_ms(graphs, cache, chunks, rows: int, reps: int, at: int = 200) -> dict:
    """One replay of ``chunks`` with ``rows`` decode rows riding in it (each at position ``at`` of a sequence of its
    own), against the prefill replay followed by the rows' own decode replay: ms each."""
    bs = cache.block_size
    per = -(-(at + 1) // bs)
    first = cache.scratch // bs - rows * per  # the pool's last blocks: the chunks take its first ones
    tables = [list(range(first + i * per, first + (i + 1) * per)) for i in range(rows)]
    for i, blocks in enumerate(tables):
        cache.set_row(i, blocks)
    cache.sync()
    ids, positions, take = [1] * rows, [at] * rows, [0] * rows
    write = [kvcache.cache_row(blocks, at, bs) for blocks in tables]
    assert graphs.ride(chunks, None, ids, positions, take, write, list(range(rows)), None) is not None
    mixed = timed(lambda: graphs.ride(chunks, None, ids, positions, take, write, list(range(rows)), None), reps)
    apart = timed(lambda: (graphs.prefill(chunks), graphs.run(ids, positions, take, write)), reps)
    return {"riding": round(mixed, 3), "apart": round(apart, 3)}


def kernels(graphs, chunks, top: int) -> list[dict]:
    """The kernels of three replays, by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graphs.prefill(chunks)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if t > 0 and e.device_type.name == "CUDA":
            rows.append({"kernel": e.key[:110], "ms_per_replay": round(t / 3000, 3), "count": e.count // 3})
    rows.sort(key=lambda r: -r["ms_per_replay"])
    return rows[:top]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--model", default="bench")
    ap.add_argument("--packings", default="16x128,1x2048,4x128")
    ap.add_argument("--variants", default="eager,fused",
                    help="in order: eager (the model's pointwise ops), fused (the engine's pointwise kernels), "
                         "fused-compiled (fused norm, compiled rotary, eager gate), fused-auto (compiled shape by "
                         "shape, the gate too), compiled (the step through torch.compile)")
    ap.add_argument("--rows", default="",
                    help="decode rows riding in each fresh packing's replay (--mixed-steps), e.g. 64,256: one replay "
                         "against the prefill replay and a decode replay")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("prefill_bench times captured CUDA graphs: it needs a GPU")
    lm = load(Registry(args.home), args.model, device="cuda", num_ctx=4096)
    rows = [int(r) for r in args.rows.split(",") if r]
    engine = Engine(lm, slots=max([8, *rows]), compile=False, mixed=bool(rows))
    graphs = engine.runner.graphs
    size = engine.runner.cache.block_size
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model, "variants": {}}
    for variant in args.variants.split(","):
        fusion.POINTWISE = variant != "eager"
        fusion.KERNELS = variant == "fused"
        if fusion.AUTO_DYNAMIC != (variant == "fused-auto"):
            fusion.AUTO_DYNAMIC = variant == "fused-auto"
            fusion.recompile()
        if variant == "compiled":
            graphs.prefill_forward = torch.compile(graphs._prefill_forward, dynamic=True)
        graphs.prefill_graphs.clear()
        start = time.perf_counter()
        graphs.capture_prefill()
        entry = {"capture_s": round(time.perf_counter() - start, 1), "graphs": len(graphs.prefill_graphs), "ms": {}}
        entry["general_ms"] = {}  # the same packings in the general layout, where they have another
        for text in args.packings.split(","):
            chunks = packing(text, size)
            entry["ms"][text] = round(replay_ms(graphs, chunks, args.reps), 3)
            n = next(b for b in graphs.prefill_buckets if b >= sum(len(t) for t, _, _ in chunks))
            if cudagraph.layout([len(t) for t, _, _ in chunks], n) != cudagraph.GENERAL:
                entry["general_ms"][text] = round(replay_ms(graphs, chunks, args.reps, general=True), 3)
        if rows:
            entry["riding_ms"] = {f"{text}+{r}": riding_ms(graphs, engine.runner.cache, packing(text, size), r, args.reps)
                                  for text in args.packings.split(",") if "+" not in text for r in rows}
        entry["kernels"] = {text: kernels(graphs, packing(text, size), args.top) for text in args.packings.split(",")}
        results["variants"][variant] = entry
        print(variant, json.dumps({k: v for k, v in entry.items() if k != "kernels"}), flush=True)
        for text, table in entry["kernels"].items():
            print(f"  {text}:")
            for row in table:
                print(f"   {row['ms_per_replay']:8.3f} ms  x{row['count']:<4d} {row['kernel']}")
    engine.shutdown()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
