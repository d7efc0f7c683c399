"""Soak run: a bounded load of mixed requests against one server for a while; memory must stay flat and nothing leak.

    python benchmarks/soak.py --minutes 10                 # CPU, the tiny offline model, in a fresh registry

Workers loop over a mix of what clients really send and what they get wrong: OpenAI chat (plain, streamed,
streamed and dropped half way, JSON schema), completions with stop strings, Ollama chat and generate, Anthropic
messages streamed, and bad requests (broken JSON, an unknown model, a context too long, a body too large). Every
answer must be a success or a refusal in its API's shape (4xx, or 429/503 when the queue is full); anything else
is counted as a failure. The server's resident memory (its engine processes' included) is sampled every few
seconds. At the end the server must have no sequence running or queued and no KV block held.

Writes JSON (counts by kind and status, the memory series, the verdict) and a PNG of memory over time under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its children (engine processes), from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(c) for c in children]
    return total


MODEL = "codellm-tiny"
CHAT = [{"role": "user", "content": "write a function that parses a CSV line"}]
SCHEMA = {"type": "json_schema", "json_schema": {"name": "point", "strict": True, "schema": {
    "type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"],
    "additionalProperties": False}}}


def shaped(kind: str, r: httpx.Response) -> bool:
    """An error body in the API's own shape."""
    try:
        body = r.json()
    except ValueError:
        return False
    if kind.startswith("ollama"):
        return isinstance(body.get("error"), str)
    if kind.startswith("anthropic"):
        return body.get("type") == "error" and "message" in body.get("error", {})
    return isinstance(body.get("error"), dict) and "message" in body["error"]


async def one(client: httpx.AsyncClient, kind: str, rng: random.Random) -> tuple[str, str]:
    """Run one request of ``kind``; (kind, outcome) with outcome ok | refused | failed:<why>."""
    n = rng.randint(8, 96)
    if kind == "chat":
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": n})
        good = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    elif kind == "chat_schema":
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 64,
                                                            "response_format": SCHEMA, "temperature": 1.0})
        good = r.status_code == 200
        if good and r.json()["choices"][0]["finish_reason"] == "stop":
            good = set(json.loads(r.json()["choices"][0]["message"]["content"])) == {"x", "y"}
    elif kind in ("chat_stream", "chat_dropped", "anthropic_stream", "ollama_chat"):
        path, body = {
            "chat_stream": ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": n, "stream": True}),
            "chat_dropped": ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 400,
                                                      "stream": True, "ignore_eos": True}),
            "anthropic_stream": ("/v1/messages", {"model": MODEL, "messages": CHAT, "max_tokens": n, "stream": True}),
            "ollama_chat": ("/api/chat", {"model": MODEL, "messages": CHAT, "options": {"num_predict": n}}),
        }[kind]
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return kind, _refusal(kind, r)
            seen, last = 0, b""
            async for line in r.aiter_lines():
                seen += 1
                last = line.encode() or last
                if kind == "chat_dropped" and seen > rng.randint(3, 40):
                    return kind, "ok"  # the client goes away mid-stream: the server must free what it held
        good = seen > 0 and (kind != "chat_stream" or last == b"data: [DONE]")
    elif kind == "completion_stop":
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "def parse(line):\n", "max_tokens": n,
                                                       "stop": ["\n\n", "return"]})
        good = r.status_code == 200 and "return" not in r.json()["choices"][0]["text"]
    elif kind == "ollama_generate":
        r = await client.post("/api/generate", json={"model": MODEL, "prompt": "def f(", "stream": False,
                                                     "options": {"num_predict": n}})
        good = r.status_code == 200 and r.json()["done"]
    elif kind == "bad_json":
        r = await client.post("/v1/chat/completions", content=b'{"model": "x", "messages": [', headers={
            "content-type": "application/json"})
        return kind, "ok" if r.status_code == 400 and shaped(kind, r) else f"failed:{r.status_code}"
    elif kind == "unknown_model":
        r = await client.post("/api/chat", json={"model": "no-such-model", "messages": CHAT, "stream": False})
        return kind, "ok" if r.status_code == 404 and shaped("ollama", r) else f"failed:{r.status_code}"
    elif kind == "too_long":
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
            {"role": "user", "content": "word " * 5000}]})
        return kind, "ok" if r.status_code == 400 and shaped(kind, r) else f"failed:{r.status_code}"
    elif kind == "too_large":
        r = await client.post("/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": [
            {"role": "user", "content": "x" * 600_000}]})
        return kind, "ok" if r.status_code == 413 and shaped("anthropic", r) else f"failed:{r.status_code}"
    else:
        raise ValueError(kind)
    if r.status_code != 200:
        return kind, _refusal(kind, r)
    return kind, "ok" if good else f"failed:{r.status_code}:content"


def _refusal(kind: str, r: httpx.Response) -> str:
    if r.status_code in (429, 503) and shaped(kind, r):
        return "refused"
    return f"failed:{r.status_code}"


KINDS = {"chat": 5, "chat_stream": 5, "chat_dropped": 2, "chat_schema": 1, "completion_stop": 2, "ollama_generate": 2,
         "ollama_chat": 2, "anthropic_stream": 2, "bad_json": 1, "unknown_model": 1, "too_long": 1, "too_large": 1}


async def load(url: str, seconds: float, workers: int, seed: int) -> Counter:
    counts: Counter = Counter()
    stop = time.monotonic() + seconds
    names, weights = zip(*KINDS.items())

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while time.monotonic() < stop:
                kind = rng.choices(names, weights)[0]
                try:
                    outcome = await one(client, kind, rng)
                except httpx.HTTPError as exc:
                    outcome = (kind, f"failed:{type(exc).__name__}")
                counts[outcome] += 1
                if outcome[1] == "refused":  # as clients do, back off (the server says Retry-After: 1)
                    await asyncio.sleep(rng.uniform(0.2, 1.0))
    await asyncio.gather(*(worker(i) for i in range(workers)))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=10)
    ap.add_argument("--placement", default="--engine-thread", choices=["--engine-thread", "--engine-process"])
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between memory samples")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="codellm-soak-"))
    env = {**os.environ, "CODELLM_HOME": str(home)}
    subprocess.run([sys.executable, "-m", "codellm.cli.main", "serve", "--help"], env=env, check=True,
                   capture_output=True)
    from codellm.engine.defaults import build_offline
    from codellm.registry import Registry

    build_offline(Registry(home))
    port = 11500 + os.getpid() % 400
    url = f"http://127.0.0.1:{port}"
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "codellm.cli.main", "serve", "--port", str(port), "--model", MODEL,
                             "--slots", str(args.slots), "--max-queue", str(args.max_queue), "--max-body-size", "512KB",
                             "--log-level", "warning", args.placement], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {(home / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        samples: list[tuple[float, int]] = []
        start = time.monotonic()

        async def run() -> Counter:
            async def sampler() -> None:
                while True:
                    samples.append((time.monotonic() - start, rss_bytes(proc.pid)))
                    await asyncio.sleep(args.sample)
            task = asyncio.create_task(sampler())
            try:
                return await load(url, args.minutes * 60, args.workers, seed=0)
            finally:
                task.cancel()
        counts = asyncio.run(run())
        time.sleep(2)  # dropped streams' cancellations land
        samples.append((time.monotonic() - start, rss_bytes(proc.pid)))
        health = httpx.get(url + "/health", timeout=10).json()["models"][f"{MODEL}:latest"]
    finally:
        proc.terminate()
        proc.wait(60)
    mib = [b / 2**20 for _, b in samples]
    warm = [m for (t, _), m in zip(samples, mib) if t >= min(60.0, args.minutes * 60 / 5)] or mib
    failures = {f"{k} {o}": n for (k, o), n in counts.items() if o.startswith("failed")}
    result = {
        "minutes": args.minutes, "workers": args.workers, "slots": args.slots, "placement": args.placement,
        "requests": sum(counts.values()), "by_kind": {f"{k} {o}": n for (k, o), n in sorted(counts.items())},
        "failures": failures,
        "rss_mib": {"first": round(mib[0], 1), "after_warmup": round(warm[0], 1), "last": round(mib[-1], 1),
                    "max": round(max(mib), 1), "growth_after_warmup": round(mib[-1] - warm[0], 1)},
        "end_state": {k: health[k] for k in ("active", "queued", "kv_blocks_used", "cancelled")},
        "samples": [(round(t, 1), round(m, 1)) for (t, _), m in zip(samples, mib)],
    }
    result["verdict"] = "pass" if not failures and health["active"] == 0 and health["queued"] == 0 \
        and health["kv_blocks_used"] == 0 and result["rss_mib"]["growth_after_warmup"] < 0.1 * warm[0] else "fail"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"soak_cpu{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([t / 60 for t, _ in samples], mib)
    ax.set_xlabel("minutes")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title(f"soak: {result['requests']} requests, {args.workers} clients, {result['verdict']}")
    ax.set_ylim(0, max(mib) * 1.15)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
