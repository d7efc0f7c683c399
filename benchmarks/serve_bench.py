"""Serving benchmark: N concurrent streaming clients against a running `codellm serve`, and plain HF
`generate` on the same model and prompts in the same run, so the ratio is measured side by side.

    python benchmarks/serve_bench.py --build llama3.2-1b --concurrency 1,16,64 --hf-baseline

--build makes a random-weight model of a known shape in a scratch registry (speed does not depend on
weight values) with a synthetic tokenizer whose every id decodes to text; EOS is ignored, so every
request generates exactly --max-tokens. Prompts are --prompt-len random token ids. Reports output
tokens/s, time to first token p50/p99 and inter-token latency; writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                        rope_theta=500000.0, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      tie_word_embeddings=False),
    # larger than one GPU: written tensor by tensor (``write_random_checkpoint``), served with --tensor-parallel
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True),
}


def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of exactly ``vocab_size`` ids, each decoding to a short word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    i = 0
    while len(vocab) < vocab_size:
        word, n = "", i
        while True:
            word = chr(ord("a") + n % 26) + word
            n //= 26
            if n == 0:
                break
        vocab.setdefault("Ġ" + word, len(vocab))
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return fast


def build_model(shape: str, home: Path, name: str = "bench", **overrides) -> str:
    """A random-weight model of ``shape`` (its config fields replaced by ``overrides``) registered as ``name``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    cfg = LlamaConfig(**{**SHAPES[shape], **overrides}, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    directory = home / "src"
    if shape in STREAMED:
        write_random_checkpoint(cfg, directory, device)
    else:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32)
        model.save_pretrained(directory, safe_serialization=True)
        del model
    synthetic_tokenizer(cfg.vocab_size).save_pretrained(directory)
    create(Registry(home), name, Modelfile(from_=str(directory)))
    return name


STREAMED = {"llama3-70b"}  # shapes whose whole model would not fit in host memory in fp32


def write_random_checkpoint(cfg, directory: Path, device: str = "cpu", shard_bytes: int = 4 << 30) -> None:
    """A random bf16 checkpoint of ``cfg``'s Llama, written a tensor at a time in shards of about ``shard_bytes``
    with their index, as save_pretrained writes one: the names and shapes come from a model built empty (meta),
    so no more than one shard is ever in memory. Linear weights are N(0, 0.02), norms ones."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlamaForCausalLM(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    index, shard, size, files = {}, {}, 0, []

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            files.append(name)
            index.update({k: name for k in shard})
            shard, size = {}, 0
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
        shard[name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    total = sum(shapes[k].numel() * 2 for k in index)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": index}, indent=2))
    cfg.torch_dtype = "bfloat16"
    cfg.save_pretrained(directory)


def build_adapter(home: Path, base: str, name: str = "bench-lora", rank: int = 16) -> str:
    """A random LoRA adapter (every projection, non-zero B) over the model built by ``build_model``, registered as
    ``name``: served unmerged on top of ``base``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(home / "src", torch_dtype=torch.bfloat16), LoraConfig(
        r=rank, lora_alpha=2 * rank, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.normal_(0, 0.01)
    model.save_pretrained(home / "adapter")
    del model
    create(Registry(home), name, Modelfile(from_=base, adapters=[str(home / "adapter")]))
    return name


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, stamps, tokens = None, [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event.get("choices") and event["choices"][0].get("text"):
                now = time.perf_counter()
                first = first or now
                stamps.append(now)
    end = time.perf_counter()
    itl = [(b - a) for a, b in zip(stamps, stamps[1:])]
    return {"ttft": (first or end) - start, "tokens": tokens, "latency": end - start, "itl": itl, "end": end}


async def _client(url: str, model: str, prompts: list[list[int]], max_tokens: int, start_at: float) -> list[dict]:
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await one_request(client, url, model, WARMUP, 8)
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        return await asyncio.gather(*(one_request(client, url, model, p, max_tokens) for p in prompts))


def _client_process(args) -> list[dict]:
    return asyncio.run(_client(*args))


def metric_sums(url: str, names) -> dict[str, float]:
    """Each of ``names`` (Prometheus series from a server's /metrics, vLLM's names) summed over its labels; a name
    the server does not serve, or a server without /metrics, is left out."""
    found: dict[str, float] = {}
    try:
        body = httpx.get(url + "/metrics", timeout=30).text
    except httpx.HTTPError:
        return found
    for line in body.splitlines():
        for name in names:
            if line.startswith(name):
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def engine_ttft(url: str) -> dict[str, float]:
    """The server's engine-side time-to-first-token histogram (cumulative buckets, sum, count), summed over models."""
    found: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm:time_to_first_token_seconds"):
            key, value = line.rsplit(" ", 1)
            name = key.split("{")[0].rsplit("_", 1)[-1]
            le = key.split('le="')[1].split('"')[0] if 'le="' in key else ""
            found[f"{name}{le}"] = found.get(f"{name}{le}", 0.0) + float(value)
    return found


def _engine_ttft_between(before: dict[str, float], after: dict[str, float]) -> dict:
    """Mean and p99 (the bucket bound it falls under) of the engine-side TTFT of one level's requests."""
    count = after.get("count", 0) - before.get("count", 0)
    if count <= 0:
        return {}
    buckets = sorted(((float(k[6:]), after[k] - before.get(k, 0)) for k in after if k.startswith("bucket")))
    p99 = next(bound for bound, n in buckets if n >= 0.99 * count)
    return {"engine_ttft_ms_mean": round(1000 * (after["sum"] - before.get("sum", 0)) / count, 1),
            "engine_ttft_ms_p99_le": round(1000 * p99, 1)}


WARMUP = [299] * 16  # a warm-up request's prompt: no level's prompt starts like it (their tokens are 300 and up)
_levels = itertools.count()


def fresh(prompts: list[list[int]]) -> list[list[int]]:
    """``prompts`` with a first token of their own for this level (0-298, by the levels run so far in this process):
    a level's prompts share no cached block with an earlier level's (the first 64 of 256 prompts were the 64-stream
    level's, prefilled but for their last block), and a repeated level measures fresh prompts again."""
    first = next(_levels) % 299
    return [[first, *p[1:]] for p in prompts]


def run_level(url: str, model: str, prompts: list[list[int]], max_tokens: int, streams_per_client: int = 32) -> dict:
    """All streams start together, spread over enough client processes that parsing SSE in Python is not
    what gets measured (one asyncio client tops out near 10k events/s). Every level's prompts are fresh (``fresh``):
    with prefix caching, a server would otherwise find the earlier levels' prompts in its cache."""
    import multiprocessing

    httpx.post(url + "/v1/completions", json={"model": model, "prompt": WARMUP, "max_tokens": 4}, timeout=900)
    prompts = fresh(prompts)
    procs = max(1, -(-len(prompts) // streams_per_client))
    shares = [prompts[i::procs] for i in range(procs)]
    before = engine_ttft(url)
    start = time.perf_counter() + 3.0 + 0.1 * procs  # CLOCK_MONOTONIC: the same clock in every process
    if procs == 1:
        results = _client_process((url, model, shares[0], max_tokens, start))
    else:
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            results = [r for part in pool.map(_client_process, [(url, model, sh, max_tokens, start) for sh in shares])
                       for r in part]
    wall = max(r["end"] for r in results) - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] * 1000 for r in results]
    itl = [x * 1000 for r in results for x in r["itl"]]
    return {"concurrency": len(prompts), "client_processes": procs, "output_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "ttft_ms_p50": round(percentile(ttft, 50), 1),
            "ttft_ms_p99": round(percentile(ttft, 99), 1), "itl_ms_p50": round(percentile(itl, 50), 2),
            "itl_ms_p99": round(percentile(itl, 99), 2), **_engine_ttft_between(before, engine_ttft(url))}


def _load_hf(home: Path, model: str, quantize: str | None):
    """The registry model as a plain transformers model (sdpa, cuDNN attention off as in ../shared/perf)."""
    import torch
    from transformers import AutoModelForCausalLM

    from codellm.registry import Registry

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
    directory = Registry(home).model_dir(model)
    kwargs = {"dtype": torch.bfloat16 if torch.cuda.is_available() else torch.float32, "attn_implementation": "sdpa"}
    if quantize == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if not quantize:
        m.to(device)
    return m.eval(), device


def _timed(device: str, fn, *args, **kwargs):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def hf_generate(home: Path, model: str, prompts: list[list[int]], max_tokens: int, quantize: str | None) -> dict:
    """Plain transformers generate on the same prompts: one padded batch (all prompts have one length)."""
    import torch

    m, device = _load_hf(home, model, quantize)
    ids = torch.tensor(prompts, device=device)
    gen = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    m.generate(ids[:, :16], attention_mask=torch.ones_like(ids[:, :16]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    out, wall = _timed(device, m.generate, ids, attention_mask=torch.ones_like(ids), **gen)
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    del m
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"concurrency": len(prompts), "output_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1)}


def hf_continuous_batching(home: Path, model: str, prompts: list[list[int]], max_tokens: int,
                           quantize: str | None) -> dict:
    """transformers' own continuous batching (``generate_batch``) on the same prompts, as ../shared/perf runs it."""
    import torch
    from transformers import GenerationConfig

    m, device = _load_hf(home, model, quantize)
    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    m.generate_batch(inputs=prompts[:min(8, len(prompts))], generation_config=cfg, max_new_tokens=8)  # warm-up
    res, wall = _timed(device, m.generate_batch, inputs=prompts, generation_config=cfg,
                       max_new_tokens=max_tokens)
    tokens = sum(len(r.generated_tokens) for r in res.values())
    del m
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"concurrency": len(prompts), "output_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1)}


def start_server(home: Path, model: str, port: int, slots: int, num_ctx: int, extra: list[str],
                 root: Path = ROOT) -> subprocess.Popen:
    """`codellm serve` from checkout ``root`` on ``home``'s registry, once /health answers."""
    cmd = [sys.executable, "-m", "codellm.cli.main", "serve", "--port", str(port), "--model", model,
           "--slots", str(slots), "--num-ctx", str(num_ctx), "--max-queue", str(max(256, slots * 2)),
           "--log-level", "warning", *extra]
    env = {**os.environ, "CODELLM_HOME": str(home), "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, env=env, cwd=root)  # `-m` imports from the working directory first
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("server exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit("server did not start")


def write_results(out: Path, stem: str, results: dict, markdown: str) -> None:
    """``stem``.json and ``stem``.md under ``out``; the table is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)


def environment() -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"}
    from importlib.util import find_spec

    # what uvicorn serves with: uvloop and httptools (litestar[standard]) when installed, else asyncio and h11
    info["server_io"] = "+".join(m for m in ("uvloop", "httptools") if find_spec(m)) or "asyncio+h11"
    return info


def table(results: dict) -> str:
    lines = [f"Device: {results['env']['device']}; torch {results['env']['torch']}, transformers "
             f"{results['env']['transformers']}; shape {results['shape']}, prompt {results['prompt_len']} tokens, "
             f"{results['max_tokens']} new tokens, greedy, EOS ignored.", "",
             "| path | concurrency | tokens/s | TTFT p50 ms | TTFT p99 ms | engine TTFT mean / p99 ms | ITL p50 ms "
             "| vs HF generate |",
             "|---|---|---|---|---|---|---|---|"]
    hf = {r["concurrency"]: r["tokens_per_s"] for r in results.get("hf_generate", [])}
    for r in results["codellm"]:
        ratio = f"{r['tokens_per_s'] / hf[r['concurrency']]:.2f}x" if r["concurrency"] in hf else "-"
        engine = f"{r['engine_ttft_ms_mean']} / <={r['engine_ttft_ms_p99_le']}" if "engine_ttft_ms_mean" in r else "-"
        lines.append(f"| codellm serve ({results['variant']}) | {r['concurrency']} | {r['tokens_per_s']} | {r['ttft_ms_p50']} | "
                     f"{r['ttft_ms_p99']} | {engine} | {r['itl_ms_p50']} | {ratio} |")
    for r in results.get("hf_generate", []):
        lines.append(f"| HF generate{' (padded batch)' if r['concurrency'] > 1 else ''} | {r['concurrency']} | "
                     f"{r['tokens_per_s']} | - | - | - | - | 1.00x |")
    for r in results.get("hf_continuous_batching", []):
        ratio = f"{r['tokens_per_s'] / hf[r['concurrency']]:.2f}x" if r["concurrency"] in hf else "-"
        lines.append(f"| transformers continuous batching | {r['concurrency']} | {r['tokens_per_s']} | - | - | - | - | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="A running server (default: start one on a scratch registry).")
    ap.add_argument("--model", default="bench")
    ap.add_argument("--build", choices=sorted(SHAPES), help="Build a random-weight model of this shape first.")
    ap.add_argument("--home", type=Path, help="Registry to use (default: a temporary one).")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="The shape of a model already built (--build sets it).")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--streams-per-client", type=int, default=32,
                    help="Streams each client process drives (one asyncio loop parses ~10k SSE events/s).")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--hf-baseline", action="store_true", help="Also time HF generate on the same prompts.")
    ap.add_argument("--cb-baseline", action="store_true",
                    help="Also time transformers' continuous batching (generate_batch) on the same prompts.")
    ap.add_argument("--quantize", choices=["nf4"], help="Serve (and baseline) 4-bit.")
    ap.add_argument("--adapter", action="store_true",
                    help="With --build: also build a random rank-16 LoRA adapter and serve it unmerged (no baselines).")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--server-args", default="", help="Extra `codellm serve` options, e.g. '--no-compile'.")
    args = ap.parse_args()

    levels = [int(c) for c in args.concurrency.split(",")]
    home = args.home or Path(tempfile.mkdtemp(prefix="codellm-bench-"))
    t0 = time.perf_counter()
    if args.build:
        print(f"building {args.build} random-weight model in {home}", flush=True)
        build_model(args.build, home, args.model)
        if args.adapter:
            args.model = build_adapter(home, args.model)
        print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    rng = random.Random(0)
    vocab = SHAPES.get(args.build or args.shape or "", {}).get("vocab_size", 400)
    prompts = [[rng.randrange(300, vocab) for _ in range(args.prompt_len)] for _ in range(max(levels))]
    results = {"env": environment(), "shape": args.build or args.shape or args.model, "prompt_len": args.prompt_len,
               "max_tokens": args.max_tokens, "variant": " ".join([args.quantize or "bf16", *(["lora"] if args.adapter else []), *args.server_args.split()]), "codellm": [], "hf_generate": []}
    proc = None
    url = args.url
    if not url:
        port = 11500 + rng.randrange(400)
        extra = (["--quantize", args.quantize] if args.quantize else []) + args.server_args.split()
        t0 = time.perf_counter()
        proc = start_server(home, args.model, port, max(levels), args.prompt_len + args.max_tokens + 16, extra)
        url = f"http://127.0.0.1:{port}"
        results["server_ready_s"] = round(time.perf_counter() - t0, 1)
        print(f"server ready in {results['server_ready_s']} s", flush=True)
    try:
        for c in levels:
            r = run_level(url, args.model, prompts[:c], args.max_tokens, args.streams_per_client)
            print("codellm", r, flush=True)
            results["codellm"].append(r)
        health = httpx.get(url + "/health")  # codellm's is JSON; another server's may be an empty 200
        results["server_health"] = health.json() if health.content else {"status": health.status_code}
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    if args.hf_baseline and not args.adapter:
        for c in levels:
            r = hf_generate(home, args.model, prompts[:c], args.max_tokens, args.quantize)
            print("hf_generate", r, flush=True)
            results["hf_generate"].append(r)
    if args.cb_baseline and not args.adapter:
        results["hf_continuous_batching"] = []
        for c in levels:
            try:
                r = hf_continuous_batching(home, args.model, prompts[:c], args.max_tokens, args.quantize)
            except Exception as exc:  # recorded, not fatal: the other paths' figures still count
                r = {"concurrency": c, "error": repr(exc)[:300], "tokens_per_s": float("nan")}
            print("hf_continuous_batching", r, flush=True)
            results["hf_continuous_batching"].append(r)
    stem = f"serve_{results['shape']}_{results['variant'].replace(' --', '_').replace(' ', '_')}{args.tag}"
    write_results(args.out, stem, results, table(results))


if __name__ == "__main__":
    main()
