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


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codellm.engine.loader import load  # noqa: E402
from codellm.engine.sampling import SamplingParams  # noqa: E402
from codellm.engine.core import Engine  # noqa: E402
from codellm.registry import Registry  # noqa: E402

PROFILED = 48  # decode steps under the profiler


def run(engine: Engine, batch: int, steps: int) -> tuple[float, float]:
    """(wall seconds per decode step, seconds to the last sequence's first token) for ``batch`` 128-token prompts."""
    done = threading.Event()
    left = [batch]
    lock = threading.Lock()
    first: dict[int, float] = {}

    def sink(out, i):
        first.setdefault(i, time.perf_counter())
        if out.finish_reason:
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    before = engine.stats.steps
    start = time.perf_counter()
    for i in range(batch):
        engine.submit([300 + i] * 128, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True),
                      lambda out, i=i: sink(out, i))
    done.wait(600)
    wall = time.perf_counter() - start
    return wall / max(1, engine.stats.steps - before), max(first.values()) - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--model", default="bench")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--variants", default="graphs,graphs-sync,compile",
                    help="graphs, graphs-sync (no overlap of host work), compile (torch.compile + graphs), eager; "
                         "'-sdpa' after a name decodes with SDPA instead of the split-KV kernel; "
                         "'-unfused' after a name keeps q/k/v and gate/up as separate GEMMs (list those first: "
                         "fusing changes the loaded model in place)")
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    lm = load(Registry(args.home), args.model, num_ctx=512)
    batches = [int(x) for x in args.batch.split(",")]
    results = {}
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        kind = variant.removesuffix("-unfused").removesuffix("-sdpa")
        os.environ["CODELLM_ATTENTION"] = "sdpa" if "-sdpa" in variant else "triton"  # decode_attention's switch
        engine = Engine(lm, slots=args.slots, cuda_graphs=kind != "eager", compile=kind == "compile",
                        overlap=kind != "graphs-sync", fuse=not variant.endswith("-unfused"))
        run(engine, 1, 2)  # load-time work (capture, compile) happens before the first step
        results[f"{variant}/load_s"] = round(time.perf_counter() - t0, 1)
        print(f"{variant}: ready in {results[f'{variant}/load_s']} s", flush=True)
        for b in batches:
            run(engine, b, 8)
            step, ttft = run(engine, b, args.steps)
            ms = step * 1000
            results[f"{variant}/b{b}"] = round(ms, 3)
            results[f"{variant}/b{b}/ttft_ms"] = round(ttft * 1000, 1)
            print(f"{variant} batch {b}: {ms:.2f} ms/step, {b / ms * 1000:.0f} tok/s, last first token after "
                  f"{ttft * 1000:.1f} ms", flush=True)
        for b in (batches[0], batches[-1]):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run(engine, b, PROFILED)
            kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
            busy = sum(e.time_range.elapsed_us() for e in kernels) / PROFILED / 1000  # the device's own time a step (its prefill spread in)
            results[f"{variant}/b{b}/kernels_per_step"] = round(len(kernels) / PROFILED, 1)
            results[f"{variant}/b{b}/kernel_ms_per_step"] = round(busy, 3)
            print(f"--- {variant}, batch {b}: {len(kernels) / PROFILED:.0f} kernels, {busy:.3f} ms of kernels per step "
                  f"(against {results[f'{variant}/b{b}']} ms a step of wall time); GPU kernels by total time")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        engine.shutdown()
        del engine
    print(json.dumps(results, indent=2))
    out = os.environ.get("OUT")
    if out:
        Path(out, "engine_profile.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
