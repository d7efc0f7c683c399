"""Speculative decoding on an edit workload: codellm with `--speculative ngram` against itself without, same model,
same client, same sitting.

    python benchmarks/spec_bench.py --concurrency 1,8,32          # trains the copier first (GPU: ~1 minute)

Random weights would keep no draft, so the target is made to do what an edit does: a small model (the tiny
tokenizer, a Qwen2 shape of --hidden x --layers) is trained for --steps steps on standard-library Python files,
each followed by an instruction to rename one of its identifiers and the file again with that name changed.
The workload is files it was not trained on, with the same kind of instruction; each answer re-emits most of its
prompt. Reports output tokens/s per concurrency for both servers, the ratio, and the share of drafts kept.
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


def train_copier(directory: Path, steps: int, hidden: int, layers: int, length: int, seed: int = 0) -> Path:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from codellm.engine import tiny

    tok = tiny.build_tokenizer()
    rng = random.Random(seed)
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    train_files = [f for i, f in enumerate(files) if i % 10 != 0]
    data = examples(tok, train_files, length, rng)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=eos,
                      pad_token_id=tok.pad_token_id)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = Qwen2ForCausalLM(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    batch = 16
    model.train()
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
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    model.generation_config = GenerationConfig(eos_token_id=[eos], pad_token_id=tok.pad_token_id)
    model.to("cpu").save_pretrained(directory)
    tok.save_pretrained(directory)
    cfg_path = directory / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tc))
    return directory


async def workload(url: str, prompts: list[tuple[str, int]], concurrency: int) -> dict:
    queue = list(prompts)
    totals = {"tokens": 0, "drafted": 0, "accepted": 0}

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
    return {**totals, "seconds": round(wall, 2), "tokens_per_s": round(totals["tokens"] / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--length", type=int, default=256, help="tokens of file per prompt")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--home", type=Path, help="a registry that already holds `copier` (skips training)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    from codellm.engine import tiny
    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    home = args.home or Path(tempfile.mkdtemp(prefix="spec-bench-"))
    reg = Registry(home)
    if not reg.exists("copier"):
        model = train_copier(Path(tempfile.mkdtemp()) / "copier", args.steps, args.hidden, args.layers, args.length)
        create(reg, "copier", Modelfile(from_=str(model)))
    tok = tiny.build_tokenizer()
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    held_out = [f for i, f in enumerate(files) if i % 10 == 0]
    pairs = examples(tok, held_out, args.length, random.Random(1))
    random.Random(2).shuffle(pairs)
    prompts = [(p, len(tok(a, add_special_tokens=False)["input_ids"]) + 8) for p, a in pairs[:args.requests]]
    levels = [int(c) for c in args.concurrency.split(",")]
    results = {"workload": {"requests": len(prompts), "prompt_tokens_mean": round(sum(
        len(tok(p)["input_ids"]) for p, _ in prompts) / len(prompts), 1)}, "runs": {}}
    for name, extra in (("off", []), ("ngram", ["--speculative", "ngram", "--num-speculative-tokens",
                                                str(args.num_speculative_tokens)])):
        port = 11600 + random.randint(0, 300)
        proc = serve_bench.start_server(home, "copier", port, slots=32, num_ctx=2048, extra=extra)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(workload(url, prompts[:4], 4))  # warm-up
            results["runs"][name] = {c: asyncio.run(workload(url, prompts, c)) for c in levels}
        finally:
            proc.terminate()
            proc.wait(60)
        print(name, json.dumps(results["runs"][name]), flush=True)
    for c in levels:
        off, on = results["runs"]["off"][c], results["runs"]["ngram"][c]
        on["speedup"] = round(on["tokens_per_s"] / off["tokens_per_s"], 2)
        on["kept"] = round(on["accepted"] / max(1, on["drafted"]), 3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"spec_edit{args.tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| streams | off tok/s | ngram tok/s | speedup | drafts kept |", "|---|---|---|---|---|"]
    for c in levels:
        off, on = results["runs"]["off"][c], results["runs"]["ngram"][c]
        lines.append(f"| {c} | {off['tokens_per_s']:,} | {on['tokens_per_s']:,} | {on['speedup']} | {on['kept']:.0%} |")
    (args.out / f"spec_edit{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
