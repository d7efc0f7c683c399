"""Throughput of `codellm eval`: HumanEval samples per second at n=10, through this process's engine behind its
HTTP API, with every candidate run in the sandbox.

The weights are random (``serve_bench.build_model``'s shapes), so no sample passes: this measures the harness
(sampling through the server with ``n``, and the sandbox), not a model. A real model's pass@1 needs its weights.

    python benchmarks/eval_bench.py --build llama3.2-1b --limit 40 -n 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="tiny", help="Shape of the random-weight model (serve_bench's SHAPES).")
    ap.add_argument("--suite", default="humaneval")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (slower start).")
    args = ap.parse_args()

    import torch

    from serve_bench import build_model

    from codellm.engine.manager import LoadOptions
    from codellm.eval.run import EvalConfig
    from codellm.eval.session import run_eval
    from codellm.registry import Registry

    home = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    model = build_model(args.build, home)
    cfg = EvalConfig(suite=args.suite, n=args.n, limit=args.limit, k=(1, 10) if args.n >= 10 else (1,),
                     concurrency=args.concurrency, workers=args.workers, max_tokens=args.max_tokens, mode="completion")
    t0 = time.perf_counter()
    summaries, _ = run_eval([model], cfg, home / "eval", registry=Registry(home), options=LoadOptions(keep_alive=None, compile=args.compile))
    wall = time.perf_counter() - t0
    samples = [json.loads(line) for line in (home / "eval" / "results.jsonl").read_text().splitlines()]
    result = {
        "shape": args.build, "suite": args.suite, "problems": args.limit, "n": args.n, "max_tokens": args.max_tokens,
        "samples": len(samples), "wall_s_with_build_and_load": round(wall, 2),
        **{k: v for k, v in json.loads((home / "eval" / "summary.json").read_text()).items() if k in ("seconds", "samples_per_s")},
        "sandbox_s_mean": round(sum(s["execute_s"] for s in samples) / len(samples), 4),
        "outcomes": summaries[model].outcomes, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"eval_{args.build}_n{args.n}{args.tag}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
