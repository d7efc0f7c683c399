"""QLoRA training speed and memory: codellm's trainer step against the plain peft + bitsandbytes recipe
of ../shared/perf/gpu_baseline.py, on the same model, data and settings, in one run.

    python benchmarks/train_bench.py --shape llama3.2-1b

Model: random bf16 weights of a known shape (speed does not depend on weight values). Settings of the
baseline: sequence 1024, micro-batch 8, LoRA r=16 alpha=32 dropout 0.05 on all linear layers, nf4 with
double quantization and bf16 compute, paged 8-bit AdamW, max_grad_norm 0.3, gradient checkpointing.
Each variant runs in its own process (clean peak-memory figures): 3 warm-up steps, then --steps timed.
Writes benchmarks/results/train_<shape>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# name: (what it is, TrainConfig settings on top of the shared ones; None for the peft + bitsandbytes recipe)
VARIANTS = {
    "baseline": ("peft prepare_model_for_kbit_training + HF loss (full fp32 logits) + autocast, grad checkpointing", None),
    "codellm": ("codellm trainer: no fp32 upcast, autocast (no LoRA input casts), chunked loss, fused AdamW, grad "
                "checkpointing", {}),
    "codellm-no-ckpt": ("codellm trainer without gradient checkpointing", {"gradient_checkpointing": False}),
    "codellm-ckpt-12": ("codellm trainer recomputing 12 of 16 layers (--checkpoint-layers 12)", {"checkpoint_layers": 12}),
    "codellm-compile": ("codellm trainer, decoder layers through torch.compile (--compile), grad checkpointing",
                        {"compile": True}),
    "codellm-no-ckpt-compile": ("codellm trainer, --compile, no gradient checkpointing",
                                {"compile": True, "gradient_checkpointing": False}),
    "codellm-ckpt-8-compile": ("codellm trainer, --compile, recomputing 8 of 16 layers",
                               {"compile": True, "checkpoint_layers": 8}),
    "codellm-ckpt-11-compile": ("codellm trainer, --compile, recomputing 11 of 16 layers",
                                {"compile": True, "checkpoint_layers": 11}),
    "codellm-ckpt-12-compile": ("codellm trainer, --compile, recomputing 12 of 16 layers",
                                {"compile": True, "checkpoint_layers": 12}),
}


def build(shape: str, directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from serve_bench import SHAPES

    if (directory / "config.json").exists():
        return
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=None, eos_token_id=0, pad_token_id=0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(directory)


def run_variant(variant: str, model_dir: Path, steps: int, bsz: int, seq: int, quant: bool) -> dict:
    import torch

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    data = torch.randint(300, vocab, (bsz * 16, seq), generator=g).cuda()
    if variant == "baseline":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kw = {}
        if quant:
            kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda", **kw)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4)

        def loss_of(x):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(input_ids=x, labels=x).loss
    else:
        from codellm.trainer.loop import TrainConfig, load_for_training, make_optimizer
        from codellm.trainer.loss import CausalLMLoss

        cfg = TrainConfig(r=16, alpha=32, dropout=0.05, lr=2e-4, **VARIANTS[variant][1])
        quantize = "nf4" if quant else None
        model = load_for_training(model_dir, cfg, torch.device("cuda"), quantize)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg)
        loss_fn = CausalLMLoss(model)

        def loss_of(x):
            return loss_fn(x, x) / (x.shape[0] * (x.shape[1] - 1))  # the same mean as HF's loss
    model.train()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    def step(i):
        x = data[(i % 16) * bsz:(i % 16 + 1) * bsz]
        loss = loss_of(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    if os.environ.get("TRAIN_PROFILE"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(0)
            torch.cuda.synchronize()
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:25]
        for e in rows:
            print(f"PROF {e.self_device_time_total / 1000:9.2f} ms {e.count:6d}x  {e.key[:110]}", file=sys.stderr)
    t = time.perf_counter()
    losses = [float(step(i)) for i in range(steps)]
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    out = {"variant": variant, "what": VARIANTS[variant][0], "tokens_per_s": round(steps * bsz * seq / dt, 1),
           "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
           "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2),
           "step_ms": round(dt / steps * 1000, 1), "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/codellm-train-bench"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--bf16", action="store_true", help="LoRA on a bf16 base instead of nf4 (QLoRA).")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process, print JSON
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    model_dir = args.model_dir / args.shape
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, model_dir, args.steps, args.batch, args.seq, not args.bf16)), flush=True)
        return
    import torch
    import transformers

    build(args.shape, model_dir)
    results = {"shape": args.shape, "seq": args.seq, "batch": args.batch, "quantize": None if args.bf16 else "nf4",
               "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "transformers": transformers.__version__, "runs": []}
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--shape", args.shape, "--model-dir", str(args.model_dir), "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq), "--one", variant] + (["--bf16"] if args.bf16 else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{variant} failed:\n{proc.stderr[-3000:]}", flush=True)
            results["runs"].append({"variant": variant, "error": proc.stderr[-1000:]})
            continue
        r = json.loads(line[7:])
        print(r, flush=True)
        results["runs"].append(r)
    base = next((r for r in results["runs"] if r["variant"] == "baseline" and "error" not in r), None)
    lines = [f"{results['device']}, torch {results['torch']}, transformers {results['transformers']}; {args.shape}, "
             f"{args.batch}x{args.seq} tokens per step, {'bf16 LoRA' if args.bf16 else 'QLoRA nf4'}, r=16 all-linear.", "",
             "| variant | tokens/s | peak allocated GB | step ms | vs baseline tok/s | vs baseline memory |", "|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mem = f"{r['peak_allocated_gb'] / base['peak_allocated_gb']:.2f}x" if base else "-"
        lines.append(f"| {r['variant']} | {r['tokens_per_s']} | {r['peak_allocated_gb']} | {r['step_ms']} | {ratio} | {mem} |")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"train_{args.shape}_{'bf16' if args.bf16 else 'nf4'}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
