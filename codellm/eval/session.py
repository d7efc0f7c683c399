"""One ``codellm eval``: the problems, a server (the one at ``url``, or this process's own engine behind its HTTP
API), the run, and what it leaves in the output folder (results.jsonl, summary.json, pass_at_k.png)."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path
from typing import Callable

from codellm.eval import suites
from codellm.eval.run import MAX_N, Client, EvalConfig, ModelSummary, evaluate, plot


def run_eval(models: list[str], cfg: EvalConfig, out: Path, *, url: str | None = None, api_key: str | None = None,
             registry=None, options=None, fresh: bool = False,
             progress: Callable[[int, int], None] = lambda done, total: None) -> tuple[dict[str, ModelSummary], Path]:
    problems = suites.load(cfg.suite, cfg.data, cfg.limit)
    if fresh and out.exists():
        shutil.rmtree(out)
    with contextlib.ExitStack() as stack:
        if url is None:
            from codellm.engine.manager import LoadOptions
            from codellm.registry import Registry
            from codellm.server.background import serving

            options = options or LoadOptions(keep_alive=None)  # with room in the queue for every request in flight
            options = dataclasses.replace(options, max_queue=max(options.max_queue, cfg.concurrency * min(cfg.n, MAX_N)))
            url = stack.enter_context(serving(registry or Registry(), options))
        client = Client(url, api_key)
        stack.callback(client.http.close)
        summaries = evaluate(models, problems, cfg, client, out, progress)
    chart = plot(summaries, cfg.k, out / "pass_at_k.png", f"{cfg.suite}: {len(problems)} problems, n={cfg.n}")
    return summaries, chart


def _scores(s: ModelSummary) -> dict:
    return {"pass_at": s.pass_at, "chrf": s.chrf, "samples": s.samples}


def record_in_training(registry, adapter: str, suite: str, base: ModelSummary, tuned: ModelSummary) -> None:
    """Put base and adapter scores into the adapter's training record (``training.json``), where ``codellm show``
    reads them: a new record blob and manifest, the old ones replaced whole."""
    import json

    from codellm.registry import manifest as mt

    entry = registry.get(adapter)
    old = next(layer for layer in entry.manifest.layers_of(mt.TRAINING) if layer.filename == "training.json")
    record = json.loads(registry.read_layer(old))
    record.setdefault("evaluation", {})[suite] = {"base": _scores(base), "adapter": _scores(tuned)}
    new = registry.add_layer_bytes(mt.TRAINING, json.dumps(record, indent=2).encode(), "training.json")
    layers = [new if layer is old else layer for layer in entry.manifest.layers]
    registry.save(entry.name, mt.Manifest(config=entry.manifest.config, layers=layers))


def compare_after_training(registry, adapter: str, suite: str, *, limit: int | None = None, out: Path | None = None,
                           options=None, progress: Callable[[int, int], None] = lambda done, total: None
                           ) -> dict[str, ModelSummary]:
    """The suite on the adapter's base and on the adapter (greedy, one sample each), recorded in its training record."""
    base = registry.get(adapter).manifest.config.base
    cfg = EvalConfig(suite=suite, n=1, limit=limit)
    out = out or registry.home / "train" / "--".join(registry.get(adapter).name.parts) / f"eval-{Path(suite).stem}"
    summaries, _ = run_eval([base, adapter], cfg, out, registry=registry, options=options, fresh=True, progress=progress)
    record_in_training(registry, adapter, suite, summaries[base], summaries[adapter])
    return summaries
