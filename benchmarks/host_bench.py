"""Host time of a decode step, by part, per generated token: what the engine thread spends besides the forward pass.

At 64-256 streams on a GPU the decode step is bound by this host work, not by the device (NOTES run 30: 7 ms a
step at 256 streams, of which 2.8 ms were kernels), so its parts are measured where they can be: in-process, on
the CPU, with the model forward timed and set apart. Each part is a real engine function, timed by wrapping it.

    python benchmarks/host_bench.py --batch 256 --steps 64
    python benchmarks/host_bench.py --checkout /tmp/before      # the same on another checkout, for a ratio

Reports microseconds per generated token for each part (parts nest: ``Engine._emit`` includes
``outputs.process``), and the step's host time outside the forward and the prefill.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PARTS = [  # (module, attribute path): the engine's host work of a decode step
    ("codellm.engine.core", "Engine._run_step"), ("codellm.engine.core", "Engine._prefill"),
    ("codellm.engine.core", "Engine._emit"), ("codellm.engine.core", "Engine._deliver"),
    ("codellm.engine.core", "Engine._drain"), ("codellm.engine.outputs", "process"),
    ("codellm.engine.outputs", "detokenize"), ("codellm.engine.scheduler", "Scheduler.schedule_decode"),
    ("codellm.engine.scheduler", "Scheduler.schedule_prefill"), ("codellm.engine.kvcache", "PagedCache.sync"),
    ("codellm.engine.runner", "ModelRunner.read"), ("codellm.engine.runner", "ModelRunner._logits"),
]


def _wrap(owner, name: str, label: str, spent: dict) -> None:
    f = getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - t

    static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    setattr(owner, name, staticmethod(timed) if static else timed)


def measure(batch: int, steps: int, home: Path) -> dict:
    """Per-token host microseconds by part, from this interpreter's ``codellm`` (run inside a checkout)."""
    import importlib

    import torch

    from codellm.engine.core import Engine  # (before serve_bench, which puts this checkout first on the path)
    from codellm.engine.loader import load
    from codellm.engine.sampling import SamplingParams
    from codellm.registry import Registry

    import serve_bench

    torch.set_num_threads(1)
    if not (home / "manifests").exists():
        serve_bench.build_model("tiny", home, "bench")
    spent: dict[str, float] = defaultdict(float)
    for module, path in PARTS:
        owner = importlib.import_module(module)
        *outer, name = path.split(".")
        for attr in outer:
            owner = getattr(owner, attr)
        if hasattr(owner, name):  # a part another checkout does not have is left out
            _wrap(owner, name, path, spent)
    engine = Engine(load(Registry(home), "bench", num_ctx=512), slots=batch, cuda_graphs=False)
    engine.timed = False

    def run(tokens: int) -> int:
        done, left = threading.Event(), [batch]

        def sink(out):
            if out.finish_reason:
                left[0] -= 1
                if not left[0]:
                    done.set()

        for i in range(batch):
            engine.submit([300 + i] * 128, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), sink)
        spent.clear()
        before = engine.stats.decode_tokens
        done.wait(900)
        return engine.stats.decode_tokens - before

    run(4)
    generated = run(steps)
    engine.shutdown()
    per = {k: round(v / generated * 1e6, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}
    per["host outside forward and prefill"] = round(
        per.get("Engine._run_step", 0) - per.get("ModelRunner._logits", 0) - per.get("Engine._prefill", 0), 2)
    import codellm

    return {"batch": batch, "steps": steps, "tokens": generated, "code": str(Path(codellm.__file__).parents[1]),
            "us_per_token": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--checkout", type=Path, help="Measure this checkout's engine instead (e.g. a worktree of an "
                                                  "earlier commit), in a child interpreter.")
    ap.add_argument("--home", type=Path, help="Registry for the tiny model (default: a temporary one).")
    ap.add_argument("--out", type=Path, help="Write the result as JSON here.")
    args = ap.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="codellm-host-"))
    if args.checkout:
        code = (f"import sys, json; sys.path[:0] = [{str(args.checkout)!r}, {str(ROOT / 'benchmarks')!r}]; "
                f"import codellm, host_bench; print(json.dumps(host_bench.measure({args.batch}, {args.steps}, "
                f"__import__('pathlib').Path({str(home)!r}))))")
        env = {**os.environ, "PYTHONPATH": str(args.checkout)}
        result = json.loads(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                           text=True).stdout.strip().splitlines()[-1])
    else:
        sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
        result = measure(args.batch, args.steps, home)
    print(f"codellm from {result['code']}, {result['batch']} streams, {result['tokens']} tokens")
    for part, us in result["us_per_token"].items():
        print(f"{us:8.2f} us/token  {part}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
