"""Speculative decoding on an edit workload: codellm with `--speculative ngram` and with `--draft` against itself
without, same model, same client, same sitting.

    python benchmarks/spec_bench.py --concurrency 1,8,32                       # a small target (CPU: minutes)
    python benchmarks/spec_bench.py --shape llama3.2-1b --concurrency 1,8,32   # the 1B shape (H200: ~3 minutes)

Random weights would keep no draft, so the models are made to do what an edit does: each is trained on
standard-library Python files, each followed by an instruction to rename one of its identifiers and the file again
with that name changed. The target has the body of --shape (`small`: a Qwen2 shape of --hidden x --layers) over the
tiny tokenizer and is trained for --steps steps; the draft model is the small shape trained the same way, for
`--speculative draft`. The workload is files neither was trained on, with the same kind of instruction; each answer
re-emits most of its prompt. Reports output tokens/s per concurrency for each way, its ratio to speculation off,
and the share of drafts kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve_bench  # noqa: E402


def examples(tokenizer, files: list[Path], length: int, rng: random.Random) -> list[tuple[str, str]]:
    """(prompt, answer) pairs: a chunk of a file and an instruction, then the chunk with one identifier renamed."""
    out = []
    for path in files:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, max(1, len(ids) - length), length):
            chunk = tokenizer.decode(ids[start:start + length])
            names = [n for n in set(re.findall(r"\b[a-z_][a-z0-9_]{2,}\b", chunk)) if n not in ("def", "self", "return")]
            if not names:
                continue
            old = rng.choice(sorted(names))
            new = old + "_v2"
            prompt = f"{chunk}\n# rename {old} to {new}\n"
            out.append((prompt, re.sub(rf"\b{old}\b", new, chunk)))
    return out


def train_copier(directory: Path, steps: int, shape: dict, length: int, seed: int = 0, lr: float = 1e-3) -> Path:
    """A model of ``shape`` (LlamaConfig fields, the vocabulary left out) trained on the rename task, saved with the
    tiny tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from codellm.engine import tiny

    tok = tiny.build_tokenizer()
    rng = random.Random(seed)
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    train_files = [f for i, f in enumerate(files) if i % 10 != 0]
    data = examples(tok, train_files, length, rng)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(seed)
    shape = {k: v for k, v in shape.items() if k != "vocab_size"}
    cfg = LlamaConfig(vocab_size=len(tok), **{**shape, "max_position_embeddings": 4096}, eos_token_id=eos,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    batch = 16
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        rows = [rng.choice(data) for _ in range(batch)]
        seqs, labels = [], []
        for prompt, answer in rows:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            a = tok(answer, add_special_tokens=False)["input_ids"] + [eos]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs], device=dev)
        lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels], device=dev)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = model(input_ids=ids, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"{directory.name} step {step} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    model.generation_config = GenerationConfig(eos_token_id=[eos], pad_token_id=tok.pad_token_id)
    model.to(torch.bfloat16 if dev == "cuda" else torch.float32).to("cpu").save_pretrained(directory)
    tok.save_pretrained(directory)
    cfg_path = directory / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tc))
    return directory


def small_shape(hidden: int, layers: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), tie_word_embeddings=True)


COUNTERS = {"drafted": "vllm:spec_decode_num_draft_tokens_total", "accepted": "vllm:spec_decode_num_accepted_tokens_total",
            "steps": "codellm_decode_steps_total"}


def spec_counters(url: str) -> dict[str, float]:
    """Draft tokens checked and kept from a server's /metrics, under vLLM's names (codellm exports the same), and
    codellm's engine steps (absent elsewhere)."""
    sums = serve_bench.metric_sums(url, COUNTERS.values())
    return {key: sums.get(name, 0.0) for key, name in COUNTERS.items()}


async def workload(url: str, prompts: list[tuple[str, int]], concurrency: int) -> dict:
    queue = list(prompts)
    totals = {"tokens": 0, "drafted": 0, "accepted": 0}
    before = spec_counters(url)

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            while queue:
                prompt, max_tokens = queue.pop()
                r = await c.post("/v1/completions", json={"model": "copier", "prompt": prompt, "max_tokens": max_tokens,
                                                          "temperature": 0})
                r.raise_for_status()
                usage = r.json()["usage"]
                totals["tokens"] += usage["completion_tokens"]
                details = usage.get("completion_tokens_details") or {}
                totals["accepted"] += details.get("accepted_prediction_tokens", 0)
                totals["drafted"] += details.get("accepted_prediction_tokens", 0) + details.get("rejected_prediction_tokens", 0)
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    after = spec_counters(url)
    if not totals["drafted"]:  # a server that reports drafts only in its metrics (vLLM)
        totals["drafted"], totals["accepted"] = (int(after[k] - before[k]) for k in ("drafted", "accepted"))
    steps = after["steps"] - before["steps"]
    extra = {"steps": int(steps), "ms_per_step": round(1000 * wall / steps, 3),
             "tokens_per_step": round(totals["tokens"] / steps, 2)} if steps else {}
    return {**totals, "seconds": round(wall, 2), "tokens_per_s": round(totals["tokens"] / wall, 1), **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--shape", default="small", help="the target's body: small, or a serve_bench shape (llama3.2-1b)")
    ap.add_argument("--steps", type=int, default=400, help="training steps of the target")
    ap.add_argument("--lr", type=float, default=None, help="the target's peak learning rate (default: 1e-3 small, 3e-4 else)")
    ap.add_argument("--draft-steps", type=int, default=400)
    ap.add_argument("--hidden", type=int, default=512, help="the small shape")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--length", type=int, default=256, help="tokens of file per prompt")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--ways", default="off,ngram,draft", help="speculation off, by prompt lookup, by the draft model")
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--home", type=Path, help="a registry that may hold `copier` and `copier-draft` already")
    ap.add_argument("--url", help="measure the server already running there instead (another engine serving the "
                    "copier as `copier`: `python -c 'from codellm.registry import Registry; "
                    "print(Registry(HOME).model_dir(\"copier\"))'` is its directory), under --ways' one name")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    from codellm.engine import tiny
    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    home = args.home or Path(tempfile.mkdtemp(prefix="spec-bench-"))
    reg = Registry(home)
    ways = args.ways.split(",")
    small = small_shape(args.hidden, args.layers)
    target = small if args.shape == "small" else serve_bench.SHAPES[args.shape]
    built = [("copier", target, args.steps, args.lr or (1e-3 if args.shape == "small" else 3e-4))]
    if "draft" in ways:
        built.append(("copier-draft", small, args.draft_steps, 1e-3))
    for name, shape, steps, lr in built:
        if not reg.exists(name):
            model = train_copier(Path(tempfile.mkdtemp()) / name, steps, shape, args.length, lr=lr)
            create(reg, name, Modelfile(from_=str(model)))
    tok = tiny.build_tokenizer()
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    held_out = [f for i, f in enumerate(files) if i % 10 == 0]
    pairs = examples(tok, held_out, args.length, random.Random(1))
    random.Random(2).shuffle(pairs)
    prompts = [(p, len(tok(a, add_special_tokens=False)["input_ids"]) + 8) for p, a in pairs[:args.requests]]
    levels = [int(c) for c in args.concurrency.split(",")]
    results = {"shape": args.shape, "workload": {"requests": len(prompts), "prompt_tokens_mean": round(sum(
        len(tok(p)["input_ids"]) for p, _ in prompts) / len(prompts), 1)}, "runs": {}}
    k = ["--num-speculative-tokens", str(args.num_speculative_tokens)]
    flags = {"off": [], "ngram": ["--speculative", "ngram", *k], "draft": ["--draft", "copier-draft", *k]}
    for name in ways:
        port = 11600 + random.randint(0, 300)
        proc = None if args.url else serve_bench.start_server(home, "copier", port, slots=32, num_ctx=2048,
                                                              extra=flags[name])
        try:
            url = args.url or f"http://127.0.0.1:{port}"
            asyncio.run(workload(url, prompts[:4], 4))  # warm-up
            results["runs"][name] = {c: asyncio.run(workload(url, prompts, c)) for c in levels}
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
        print(name, json.dumps(results["runs"][name]), flush=True)
    spec = [w for w in ways if w != "off"]
    for c in levels:
        for way in spec:
            on = results["runs"][way][c]
            if "off" in results["runs"]:
                on["speedup"] = round(on["tokens_per_s"] / results["runs"]["off"][c]["tokens_per_s"], 2)
            on["kept"] = round(on["accepted"] / max(1, on["drafted"]), 3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"spec_edit{args.tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    head = "| streams | " + " | ".join(f"{w} tok/s" for w in ways) + " | " + " | ".join(
        f"{w} speedup | {w} kept" for w in spec) + " |"
    lines = [head, "|" + "---|" * (1 + len(ways) + 2 * len(spec))]
    for c in levels:
        runs = results["runs"]
        cells = [f"{runs[w][c]['tokens_per_s']:,}" for w in ways]
        cells += [f"{runs[w][c].get('speedup', '-')} | {runs[w][c]['kept']:.0%}" for w in spec]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    (args.out / f"spec_edit{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
