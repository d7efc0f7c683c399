"""Capacity: how many 2k-token streams one KV budget serves at once, the paged cache against the slot cache it
replaced, through the same client in the same run.

    git worktree add /tmp/slot-cache 989d30f^            # the engine before the paged cache, for the baseline
    python benchmarks/capacity_bench.py --slot-checkout /tmp/slot-cache

The slot cache gave every sequence a whole context: ``--slots S --num-ctx 32768`` took (S + 1) x 32,769 tokens of
KV (one scratch slot) and decoded at most S streams. The paged cache gets exactly those bytes
(``--kv-cache-memory``) at the same ``--num-ctx``, and as many rows as there are streams. N streams of about 2k
tokens each (random prompts, nothing shared, so prefix caching cannot help; greedy, EOS ignored) start together;
the figure is the engine's largest decode batch (``/health``'s ``max_batch``: streams that each got a token in one
step), beside the most streams open between their first token and their last by the client's clock (which counts a
preempted stream, waiting to be computed again, too). Also: wall time, TTFT p50 / p99 and the paged server's
preemptions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve_bench  # noqa: E402


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    """The most (start, end) spans open at one instant."""
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    open_, peak = 0, 0
    for _, step in edges:
        open_ += step
        peak = max(peak, open_)
    return peak


async def _streams(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        return await asyncio.gather(*(serve_bench.one_request(client, url, model, p, max_tokens) for p in prompts))


def measure(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> dict:
    httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompts[0][:16], "max_tokens": 2}, timeout=900)
    t0 = time.perf_counter()
    rows = asyncio.run(_streams(url, model, prompts, max_tokens))
    wall = time.perf_counter() - t0
    spans = [(r["end"] - r["latency"] + r["ttft"], r["end"]) for r in rows]
    batch = max(m.get("max_batch", 0) for m in httpx.get(url + "/health", timeout=10).json()["models"].values())
    ttft = [r["ttft"] * 1e3 for r in rows]
    tokens = sum(r["tokens"] for r in rows)
    return {"streams": len(rows), "decode_batch": batch, "peak_open": peak_overlap(spans), "wall_s": round(wall, 2),
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(serve_bench.percentile(ttft, 50), 1), "ttft_p99_ms": round(serve_bench.percentile(ttft, 99), 1),
            "preemptions": serve_bench.metric_sums(url, ["vllm:num_preemptions_total"]).get("vllm:num_preemptions_total")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slot-checkout", type=Path, required=True, help="a checkout of the slot-cache engine (989d30f^)")
    ap.add_argument("--shape", default="tiny", choices=sorted(serve_bench.SHAPES))
    ap.add_argument("--slots", type=int, default=4, help="the slot cache's slots: its KV budget")
    ap.add_argument("--num-ctx", type=int, default=32768)
    ap.add_argument("--streams", type=int, default=96)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--home", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import torch

    home = args.home or Path(tempfile.mkdtemp(prefix="codellm-capacity-"))
    shape = {**serve_bench.SHAPES[args.shape], "max_position_embeddings": max(args.num_ctx, 2048)}
    if not (home / "manifests").exists():
        serve_bench.build_model(args.shape, home, "bench", max_position_embeddings=shape["max_position_embeddings"])
    itemsize = 2 if torch.cuda.is_available() else 4  # the dtype both engines serve in: bf16 on GPUs, fp32 on CPU
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    per_token = shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * head_dim * itemsize
    budget = (args.slots + 1) * (args.num_ctx + 1) * per_token
    rng = random.Random(0)
    vocab = shape["vocab_size"]
    prompts = [[rng.randrange(300, vocab) for _ in range(args.prompt_len)] for _ in range(args.streams)]
    results = {"shape": args.shape, "num_ctx": args.num_ctx, "kv_bytes": budget, "kv_bytes_per_token": per_token,
               "stream_tokens": args.prompt_len + args.max_tokens, "runs": {}}
    ways = {"slot cache": (args.slot_checkout, args.slots, []),
            "paged": (ROOT, args.streams, ["--kv-cache-memory", str(budget)])}
    for name, (root, slots, extra) in ways.items():
        port = 12100 + random.randint(0, 300)
        proc = serve_bench.start_server(home, "bench", port, slots=slots, num_ctx=args.num_ctx, extra=extra, root=root)
        try:
            results["runs"][name] = measure(f"http://127.0.0.1:{port}", "bench", prompts, args.max_tokens)
        finally:
            proc.terminate()
            proc.wait(60)
        print(name, json.dumps(results["runs"][name]), flush=True)
    slot, paged = results["runs"]["slot cache"], results["runs"]["paged"]
    results["ratio"] = round(paged["decode_batch"] / max(1, slot["decode_batch"]), 2)
    lines = [f"KV budget {budget / 2**20:.1f} MiB ({args.slots} slots x {args.num_ctx} tokens, {per_token} bytes a token); "
             f"{args.streams} streams of {args.prompt_len} + {args.max_tokens} tokens; shape {args.shape}.", "",
             "| cache | largest decode batch | streams open at once | wall s | tokens/s | TTFT p50 ms | TTFT p99 ms | preemptions |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        pre = "-" if r["preemptions"] is None else int(r["preemptions"])
        lines.append(f"| {name} | {r['decode_batch']} | {r['peak_open']} | {r['wall_s']} | {r['tokens_per_s']:,} | {r['ttft_p50_ms']:,} | "
                     f"{r['ttft_p99_ms']:,} | {pre} |")
    lines += ["", f"paged / slot cache: **{results['ratio']}x** the streams decoded together"]
    serve_bench.write_results(args.out, f"capacity{args.tag}", results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
