"""Prompt-reuse benchmark: the traffic of code assistants, where long contexts come back on every request.

    python benchmarks/prefix_bench.py --build llama3.2-1b                      # start codellm on a built model
    python benchmarks/prefix_bench.py --url http://127.0.0.1:8011 --model bench --tokenizer MODEL_DIR --tag _vllm

Two workloads, both through the HTTP server's /v1/completions (token-id prompts, streamed, greedy, EOS
ignored), driven by the same client for every server:

- shared: a 4,096-token prefix that every request shares (an agent's system prompt and tools, a file an
  editor keeps sending), a 128-token tail of its own, 64 new tokens; at concurrency 1 / 16 / 64. The prefix
  is sent once first, as a server that has been running would have seen it.
- agent: 8 sessions of 8 turns at once. The first turn is a 2,048-token system prompt that all sessions
  share plus 512 tokens of the session's own; each later turn re-sends the whole history (every earlier
  turn and answer) plus 512 new tokens; every answer is 64 tokens. The answers are re-sent as the client's
  tokenizer reads their text, as chat clients do (cut to 64 tokens).

Reports TTFT p50/p99 and output tokens/s per level (shared) and TTFT p50 per turn (agent), with the
server's prefix-cache hit rate where /metrics has one; writes JSON and markdown under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve_bench  # noqa: E402


async def stream_one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, text, usage = None, [], {}
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise SystemExit(f"{resp.status_code} from the server: {(await resp.aread())[:500]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            if event.get("choices") and event["choices"][0].get("text"):
                first = first or time.perf_counter()
                text.append(event["choices"][0]["text"])
    end = time.perf_counter()
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft": (first or end) - start, "tokens": usage.get("completion_tokens", 0), "text": "".join(text),
            "end": end, "start": start, "cached": details.get("cached_tokens") or 0}


def prefix_metrics(url: str) -> dict[str, float]:
    """Prefix-cache counters from /metrics (vLLM's names, which codellm also serves), summed over models."""
    return serve_bench.metric_sums(url, ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"))


def hit_rate(before: dict, after: dict) -> float | None:
    q = after.get("vllm:prefix_cache_queries_total", 0) - before.get("vllm:prefix_cache_queries_total", 0)
    h = after.get("vllm:prefix_cache_hits_total", 0) - before.get("vllm:prefix_cache_hits_total", 0)
    return round(h / q, 3) if q > 0 else None


def summary(results: list[dict], wall: float) -> dict:
    ttft = [r["ttft"] * 1000 for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "output_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "ttft_ms_p50": round(serve_bench.percentile(ttft, 50), 1),
            "ttft_ms_p99": round(serve_bench.percentile(ttft, 99), 1),
            "cached_tokens_mean": round(statistics.mean(r["cached"] for r in results), 1)}


async def shared(url: str, model: str, vocab: int, levels: list[int], prefix_len: int, tail_len: int,
                 max_tokens: int, rounds: int) -> list[dict]:
    rng = random.Random(1)
    prefix = [rng.randrange(300, vocab) for _ in range(prefix_len)]
    tail = lambda: [rng.randrange(300, vocab) for _ in range(tail_len)]  # noqa: E731
    out = []
    limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await stream_one(client, url, model, prefix + tail(), 4)  # the prefix, seen once
        for c in levels:
            before = prefix_metrics(url)
            results, wall = [], 0.0
            for _ in range(rounds if c > 1 else 4 * rounds):  # concurrency 1: a few in a row, for a median
                start = time.perf_counter()
                results += await asyncio.gather(*(stream_one(client, url, model, prefix + tail(), max_tokens)
                                                  for _ in range(c)))
                wall += time.perf_counter() - start
            level = {"concurrency": c, **summary(results, wall), "prefix_cache_hit_rate": hit_rate(before, prefix_metrics(url))}
            print("shared", level, flush=True)
            out.append(level)
    return out


async def agent(url: str, model: str, vocab: int, tokenizer, sessions: int, turns: int, system_len: int,
                turn_len: int, max_tokens: int) -> dict:
    rng = random.Random(2)
    system = [rng.randrange(300, vocab) for _ in range(system_len)]
    per_turn: list[list[dict]] = [[] for _ in range(turns)]
    limits = httpx.Limits(max_connections=sessions + 8, max_keepalive_connections=sessions + 8)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await stream_one(client, url, model, system + [rng.randrange(300, vocab) for _ in range(16)], 4)

        async def session(s: int) -> None:
            local = random.Random(100 + s)
            history = list(system)
            for t in range(turns):
                history += [local.randrange(300, vocab) for _ in range(turn_len)]
                r = await stream_one(client, url, model, history, max_tokens)
                r["context"] = len(history)
                per_turn[t].append(r)
                history += read_back(tokenizer, r["text"])[:max_tokens]

        _vocab(tokenizer)
        before = prefix_metrics(url)
        start = time.perf_counter()
        await asyncio.gather(*(session(s) for s in range(sessions)))
        wall = time.perf_counter() - start
    rows = [{"turn": t + 1, "context_tokens": round(statistics.mean(r["context"] for r in rs)),
             "ttft_ms_p50": round(serve_bench.percentile([r["ttft"] * 1000 for r in rs], 50), 1),
             "ttft_ms_p99": round(serve_bench.percentile([r["ttft"] * 1000 for r in rs], 99), 1),
             "cached_tokens_mean": round(statistics.mean(r["cached"] for r in rs), 1)} for t, rs in enumerate(per_turn)]
    every = [r for rs in per_turn for r in rs]
    result = {"sessions": sessions, "turns": rows, **summary(every, wall),
              "turn8_over_turn1": round(rows[-1]["ttft_ms_p50"] / rows[0]["ttft_ms_p50"], 2),
              "prefix_cache_hit_rate": hit_rate(before, prefix_metrics(url))}
    print("agent", json.dumps(result), flush=True)
    return result


@functools.cache
def _vocab(tokenizer) -> dict[str, int]:
    return tokenizer.get_vocab()  # built anew on every call: tens of ms at 128k tokens, which would stall the client


def read_back(tokenizer, text: str) -> list[int]:
    """The answer's text as the client's tokenizer reads it. The benchmark's synthetic vocabulary has no merges, so
    its encoder would read every word letter by letter: its words are looked up whole, as a real BPE's merges read
    them back. Random weights also write odd bytes, which read back as more tokens; callers cut the result to the
    answer's length, to keep every turn's context as designed."""
    vocab = _vocab(tokenizer)
    words = ["\u0120" + w for w in text.split(" ")[1:]] if text.startswith(" ") else []
    if words and all(w in vocab for w in words):
        return [vocab[w] for w in words]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def table(results: dict) -> str:
    lines = [f"# Prompt reuse: {results['shape']} ({results['server']}, {results['env'].get('device')})", "",
             f"shared prefix ({results['prefix_len']:,} + 128 tokens, 64 out):", "",
             "| streams | tok/s | TTFT p50 ms | TTFT p99 ms | cached tokens | hit rate |", "|---|---|---|---|---|---|"]
    for r in results.get("shared", []):
        lines.append(f"| {r['concurrency']} | {r['tokens_per_s']} | {r['ttft_ms_p50']} | {r['ttft_ms_p99']} | "
                     f"{r['cached_tokens_mean']} | {r['prefix_cache_hit_rate']} |")
    a = results.get("agent")
    if a:
        lines += ["", f"agent sessions ({a['sessions']} at once): {a['tokens_per_s']} tok/s, turn 8 / turn 1 TTFT = "
                  f"{a['turn8_over_turn1']}, hit rate {a['prefix_cache_hit_rate']}", "",
                  "| turn | context | TTFT p50 ms | TTFT p99 ms | cached tokens |", "|---|---|---|---|---|"]
        for r in a["turns"]:
            lines.append(f"| {r['turn']} | {r['context_tokens']} | {r['ttft_ms_p50']} | {r['ttft_ms_p99']} | "
                         f"{r['cached_tokens_mean']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="A running server (default: start codellm on --home).")
    ap.add_argument("--model", default="bench")
    ap.add_argument("--build", choices=sorted(serve_bench.SHAPES), help="Build a random-weight model of this shape first.")
    ap.add_argument("--home", type=Path, help="Registry to use (default: a temporary one); with --build, built there.")
    ap.add_argument("--shape", choices=sorted(serve_bench.SHAPES), help="The shape of the model (--build sets it).")
    ap.add_argument("--tokenizer", type=Path, help="The model's directory, for its tokenizer (default: HOME/src).")
    ap.add_argument("--workloads", default="shared,agent")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--rounds", type=int, default=2, help="Rounds of each shared level.")
    ap.add_argument("--prefix-len", type=int, default=4096, help="shared: the prefix every request shares.")
    ap.add_argument("--system-len", type=int, default=2048, help="agent: the system prompt every session shares.")
    ap.add_argument("--turn-len", type=int, default=512, help="agent: new tokens a turn adds.")
    ap.add_argument("--num-ctx", type=int, default=8192)
    ap.add_argument("--server-args", default="", help="Extra `codellm serve` options.")
    ap.add_argument("--codellm-root", type=Path, default=ROOT, help="The checkout whose codellm serves (another "
                    "version's, for a before/after run).")
    ap.add_argument("--server", default="codellm", help="The server's name in the results.")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    home = args.home or Path(tempfile.mkdtemp(prefix="codellm-prefix-"))
    if args.build and not (home / "src" / "config.json").exists():
        print(f"building {args.build} in {home}", flush=True)
        serve_bench.build_model(args.build, home, args.model)
    shape = args.build or args.shape
    vocab = serve_bench.SHAPES[shape]["vocab_size"] if shape else 400
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or home / "src")
    results = {"env": serve_bench.environment(), "shape": shape or args.model, "server": args.server + args.tag,
               "prefix_len": args.prefix_len}
    proc, url = None, args.url
    if not url:
        port = 11900 + random.randrange(400)
        t0 = time.perf_counter()
        proc = serve_bench.start_server(home, args.model, port, 256, args.num_ctx, args.server_args.split(),
                                        root=args.codellm_root)
        url = f"http://127.0.0.1:{port}"
        results["server_ready_s"] = round(time.perf_counter() - t0, 1)
    try:
        work = args.workloads.split(",")
        if "shared" in work:
            levels = [int(c) for c in args.concurrency.split(",")]
            results["shared"] = asyncio.run(shared(url, args.model, vocab, levels, args.prefix_len, 128, 64, args.rounds))
        if "agent" in work:
            results["agent"] = asyncio.run(agent(url, args.model, vocab, tokenizer, 8, 8, args.system_len, args.turn_len, 64))
    finally:
        if proc:
            proc.terminate()
            proc.wait(60)
    serve_bench.write_results(args.out, f"prefix_{results['shape']}_{results['server']}", results, table(results))


if __name__ == "__main__":
    main()
