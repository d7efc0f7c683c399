"""Data-parallel training against one process: `codellm train` alone, accumulating the global batch, then
`torchrun --nproc-per-node N -m codellm train` (DDP, or --fsdp: base and adapter sharded), on the same model, data,
seed and steps, in one run. Reports each one's steady tokens/s, the scaling ratio, peak GPU memory per process, and
how far apart their losses and final adapters are (they take the same steps: bf16 rounding apart, they agree).

    python benchmarks/dp_bench.py --shape llama3.2-1b --gpus 2             # QLoRA (nf4), DDP
    python benchmarks/dp_bench.py --shape llama2-7b --gpus 2 --fsdp        # bf16 LoRA, sharded
    python benchmarks/dp_bench.py --shape tiny --gpus 2 --device cpu       # gloo on a CPU: a smoke run

Model: random weights of a serve_bench shape, with its synthetic tokenizer; data: synthetic Alpaca records of about
--seq tokens. Writes benchmarks/results/dp_<shape>_<way>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_bench import build_model  # noqa: E402


def write_data(path: Path, rows: int, words: int, seed: int = 0) -> None:
    """Alpaca records of about ``words`` words each (a synthetic-vocabulary word is a token or so)."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 2))) for _ in range(500)]

    def text(n: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(n))

    with path.open("w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"instruction": text(words // 4), "input": "", "output": text(words - words // 4)}) + "\n")


def train(home: Path, data: Path, name: str, args, processes: int) -> tuple[list[dict], float]:
    """One `codellm train` run (torchrun when ``processes`` > 1): its metrics records and wall seconds."""
    import time

    common = ["bench", "--data", str(data), "--name", name, "--max-steps", str(args.steps), "--batch-size",
              str(args.batch), "--max-len", str(args.seq), "--dropout", "0", "--eval-split", "0", "--seed", "1",
              "--save-every", str(args.steps + 1)]
    if args.fsdp:  # (a world of one has nothing to shard: it trains the same 16-bit base, unsharded)
        common.append("--fsdp")
    if processes == 1:
        cmd = [sys.executable, "-m", "codellm", "train", *common, "--grad-accum", str(args.gpus)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "codellm", "train", *common]
    env = {**os.environ, "CODELLM_HOME": str(home), "NCCL_NVLS_ENABLE": "0", "GLOO_SOCKET_IFNAME": "lo"}
    if args.device == "cpu":  # (the GPUs hidden)
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    start = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"{name} failed:\n{r.stderr[-4000:]}")
    path = home / "train" / f"library--{name}--latest" / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if '"loss"' in x], wall


def steady(records: list[dict], skip: int) -> float:
    """Tokens a second after the first ``skip`` steps (the records' rate is cumulative from the start)."""
    a, b = records[min(skip, len(records) - 2)], records[-1]
    seen = lambda r: r["tokens_per_s"] * r["elapsed_s"]  # noqa: E731
    return (seen(b) - seen(a)) / max(1e-9, b["elapsed_s"] - a["elapsed_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--gpus", type=int, default=2, help="processes of the data-parallel run")
    ap.add_argument("--fsdp", action="store_true", help="shard base and adapter (bf16 LoRA) instead of DDP")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=3, help="steps left out of the speed (warm-up)")
    ap.add_argument("--batch", type=int, default=4, help="micro-batch per process")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--device", choices=["cpu"], help="cpu: gloo on this machine's CPUs, GPUs hidden")
    ap.add_argument("--home", type=Path, default=Path("/tmp/codellm-dp-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    home = args.home
    if not (home / "src").is_dir():
        build_model(args.shape, home)
    data = home / "data.jsonl"
    write_data(data, rows=args.batch * args.gpus * (args.steps + 1), words=int(args.seq * 0.9))
    way = "fsdp" if args.fsdp else "ddp"
    one, one_wall = train(home, data, f"one-{way}", args, 1)
    many, many_wall = train(home, data, f"dp-{way}", args, args.gpus)
    a = load_file(home / "train" / f"library--one-{way}--latest" / "adapter" / "adapter_model.safetensors")
    b = load_file(home / "train" / f"library--dp-{way}--latest" / "adapter" / "adapter_model.safetensors")
    speed_one, speed_many = steady(one, args.skip), steady(many, args.skip)
    result = {
        "shape": args.shape, "way": way, "processes": args.gpus, "steps": args.steps, "batch_per_process": args.batch,
        "seq": args.seq, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu"
        else "cpu", "torch": torch.__version__,
        "tokens_per_s": {"1": round(speed_one, 1), str(args.gpus): round(speed_many, 1)},
        "scaling": round(speed_many / max(1e-9, speed_one), 3),
        "gpu_peak_gib": {"1": one[-1].get("gpu_peak_gib"), str(args.gpus): many[-1].get("gpu_peak_gib")},
        "wall_s": {"1": round(one_wall, 1), str(args.gpus): round(many_wall, 1)},
        "losses": {"1": [r["loss"] for r in one], str(args.gpus): [r["loss"] for r in many]},
        "loss_max_rel_diff": max(abs(x["loss"] - y["loss"]) / max(1e-9, abs(x["loss"])) for x, y in zip(one, many)),
        "adapter_max_abs_diff": max(float((a[k].float() - b[k].float()).abs().max()) for k in a),
    }
    print(json.dumps(result, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"dp_{args.shape}_{way}{'_cpu' if args.device == 'cpu' else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    n = str(args.gpus)
    stem.with_suffix(".md").write_text(
        f"{result['device']}, torch {result['torch']}; {args.shape}, {way}, micro-batch {args.batch} x {args.seq} "
        f"tokens per process, {args.steps} steps (speed after {args.skip}).\n\n"
        "| processes | tokens/s | peak GPU GiB |\n|---|---|---|\n"
        f"| 1 (grad-accum {args.gpus}) | {result['tokens_per_s']['1']} | {result['gpu_peak_gib']['1']} |\n"
        f"| {n} | {result['tokens_per_s'][n]} | {result['gpu_peak_gib'][n]} |\n\n"
        f"Scaling {result['scaling']}x; losses within {result['loss_max_rel_diff']:.2e} (relative), adapters within "
        f"{result['adapter_max_abs_diff']:.2e}.\n")


if __name__ == "__main__":
    main()
