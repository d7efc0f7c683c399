"""An evaluation run: samples from each model through an OpenAI-compatible server (``n`` per request, as evalplus
and lm-evaluation-harness drive servers), each sample scored in the sandbox (or by chrF where a problem has no
tests), every sample written to ``results.jsonl`` as it is scored, so a killed run continues where it stopped.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from codellm.errors import CodellmError, InvalidRequest
from codellm.eval import sandbox
from codellm.eval.passk import mean_pass_at_k, pass_at_k
from codellm.eval.suites import Problem

MAX_N = 16  # choices one request asks for (the server's bound); more samples take several requests


@dataclass
class EvalConfig:
    suite: str
    data: str | None = None
    n: int = 1
    temperature: float | None = None  # default: 0 (greedy) for n=1, else 0.8
    top_p: float = 0.95
    k: tuple[int, ...] = (1,)
    limit: int | None = None
    concurrency: int = 4  # requests in flight
    workers: int = 2  # candidates run at once
    max_tokens: int = 512
    timeout: float = 10.0  # seconds a candidate may run
    mode: str = "auto"  # chat | completion | auto (chat where the model has a chat template)
    seed: int | None = 1234

    @property
    def sampling_temperature(self) -> float:
        return self.temperature if self.temperature is not None else (0.0 if self.n == 1 else 0.8)

    def key(self) -> dict:
        """What results depend on: a resumed run must match it."""
        return {"suite": self.suite, "data": self.data, "n": self.n, "temperature": self.sampling_temperature,
                "top_p": self.top_p, "max_tokens": self.max_tokens, "mode": self.mode, "limit": self.limit}


@dataclass
class Sample:
    model: str
    task_id: str
    index: int
    completion: str
    status: str  # passed | failed | timed out | crashed | scored (chrF only)
    error: str = ""
    chrf: float | None = None
    generate_s: float = 0.0
    execute_s: float = 0.0


@dataclass
class ModelSummary:
    model: str
    samples: int = 0
    pass_at: dict[str, float | None] = field(default_factory=dict)
    chrf: float | None = None
    outcomes: dict[str, int] = field(default_factory=dict)
    per_problem: dict[str, dict] = field(default_factory=dict)


# -- prompts and answers --------------------------------------------------------------------------------------------
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str:
    """The code of a chat answer: its first fenced block, else the whole answer."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def chat_prompt(p: Problem) -> str:
    if p.instruction:
        return p.instruction
    return ("Please provide a self-contained Python script that solves the following problem in a markdown code "
            f"block:\n```python\n{p.prompt.strip()}\n```")


def chrf(hypothesis: str, reference: str) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF(whitespace=True).sentence_score(hypothesis, [reference]).score  # whitespace kept: indentation counts


# -- the server ---------------------------------------------------------------------------------------------------
class Client:
    def __init__(self, url: str, api_key: str | None = None):
        import logging

        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury the progress bar
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(30, read=1800))

    def load(self, model: str) -> None:
        """Have the server load ``model`` now (Ollama's load-only request), so that timings leave loading out;
        servers without that route load it on the first sample instead."""
        try:
            self.http.post("/api/generate", json={"model": model})
        except httpx.HTTPError:
            pass

    def mode(self, model: str, asked: str) -> str:
        if asked != "auto":
            return asked
        try:  # a codellm or Ollama server says whether the model has a chat template
            r = self.http.post("/api/show", json={"model": model})
            if r.status_code == 200:
                return "chat" if r.json().get("template") else "completion"
        except httpx.HTTPError:
            pass
        return "chat" if re.search(r"instruct|chat|-it\b", model, re.I) else "completion"

    def _post(self, path: str, body: dict, patience: float = 600.0) -> httpx.Response:
        """POST, waiting out a busy server (429/503, as its Retry-After asks) for up to ``patience`` seconds."""
        deadline, delay = time.monotonic() + patience, 0.5
        while True:
            r = self.http.post(path, json=body)
            if r.status_code not in (429, 503) or time.monotonic() > deadline:
                return r
            try:
                wait = float(r.headers.get("retry-after", delay))
            except ValueError:
                wait = delay
            time.sleep(min(max(wait, 0.1), 10.0))
            delay = min(delay * 2, 10.0)

    def sample(self, model: str, p: Problem, n: int, mode: str, cfg: EvalConfig, seed: int | None) -> list[str]:
        body = {"model": model, "n": n, "max_tokens": cfg.max_tokens, "temperature": cfg.sampling_temperature}
        if cfg.sampling_temperature > 0:
            body["top_p"] = cfg.top_p
        if seed is not None:
            body["seed"] = seed
        if p.fim or mode == "completion":
            body.update(prompt=p.prompt, **({"suffix": p.suffix} if p.fim else {}), **({"stop": p.stop} if p.stop else {}))
            path = "/v1/completions"
        else:
            body["messages"] = [{"role": "user", "content": chat_prompt(p)}]
            path = "/v1/chat/completions"
        r = self._post(path, body)
        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:200]
            raise CodellmError(f"{model} on {p.task_id}: HTTP {r.status_code}: {message}")
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        if path == "/v1/completions":
            return [c["text"] for c in choices]
        return [extract_code(c["message"]["content"] or "") for c in choices]


# -- the run ------------------------------------------------------------------------------------------------------
class Results:
    """``results.jsonl`` under a lock; what a killed run left is read back on start."""

    def __init__(self, out: Path, cfg: EvalConfig, models: list[str]):
        out.mkdir(parents=True, exist_ok=True)
        self.path, self.lock = out / "results.jsonl", threading.Lock()
        run = out / "run.json"
        key = cfg.key()
        if run.is_file() and self.path.is_file():
            before = json.loads(run.read_text())
            if before.get("config") != key:
                raise InvalidRequest(f"{out} holds results of another configuration ({before.get('config')}): "
                                     "use another --out, or --fresh to start over")
        run.write_text(json.dumps({"config": key, "models": models}, indent=2))
        self.samples: list[Sample] = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    self.samples.append(Sample(**json.loads(line)))
                except (ValueError, TypeError):
                    continue  # a line cut short by the kill
            self.path.write_text("".join(json.dumps(asdict(s)) + "\n" for s in self.samples))

    def have(self, model: str, task_id: str) -> int:
        return sum(1 for s in self.samples if s.model == model and s.task_id == task_id)

    def add(self, sample: Sample) -> None:
        with self.lock:
            self.samples.append(sample)
            with self.path.open("a") as fh:
                fh.write(json.dumps(asdict(sample)) + "\n")


def evaluate(models: list[str], problems: list[Problem], cfg: EvalConfig, client: Client, out: Path,
             progress: Callable[[int, int], None] = lambda done, total: None) -> dict[str, ModelSummary]:
    results = Results(out, cfg, models)
    for model in models:
        client.load(model)
    started, before = time.perf_counter(), len(results.samples)
    limits = sandbox.Limits(seconds=cfg.timeout)
    total = len(models) * len(problems) * cfg.n
    done = [sum(min(cfg.n, results.have(m, p.task_id)) for m in models for p in problems)]
    progress(done[0], total)
    count_lock = threading.Lock()
    executor = ThreadPoolExecutor(max(1, cfg.workers), thread_name_prefix="eval-run")

    def score(model: str, p: Problem, index: int, text: str, gen_s: float) -> None:
        if p.tests:
            outcome = sandbox.run(p.program(text), limits)
            sample = Sample(model, p.task_id, index, text, outcome.status, outcome.error, None, gen_s, outcome.seconds)
        else:
            sample = Sample(model, p.task_id, index, text, "scored", "", chrf(text, p.reference), gen_s)
        results.add(sample)
        with count_lock:
            done[0] += 1
            progress(done[0], total)

    def job(model: str, mode: str, p: Problem) -> list:
        have, futures = results.have(model, p.task_id), []
        while have < cfg.n:
            n = min(MAX_N, cfg.n - have)
            t0 = time.perf_counter()
            seed = None if cfg.seed is None else cfg.seed + have
            texts = client.sample(model, p, n, mode, cfg, seed)
            gen_s = (time.perf_counter() - t0) / max(1, len(texts))
            futures += [executor.submit(score, model, p, have + i, t, gen_s) for i, t in enumerate(texts)]
            have += len(texts)
        return futures

    try:
        with ThreadPoolExecutor(max(1, cfg.concurrency), thread_name_prefix="eval-gen") as gen:
            for model in models:
                mode = client.mode(model, cfg.mode)
                for f in [gen.submit(job, model, mode, p) for p in problems]:
                    for scored in f.result():
                        scored.result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - started
    summaries = summarize(results.samples, models, problems, cfg.k)
    (out / "summary.json").write_text(json.dumps({
        "config": cfg.key(), "k": list(cfg.k), "seconds": round(seconds, 2),
        "samples_per_s": round((len(results.samples) - before) / seconds, 2),  # this run's, models loaded
        "models": {m: asdict(s) for m, s in summaries.items()}}, indent=2))
    return summaries


def summarize(samples: list[Sample], models: list[str], problems: list[Problem], ks) -> dict[str, ModelSummary]:
    by: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for s in samples:
        by[(s.model, s.task_id)].append(s)
    out = {}
    for model in models:
        summary, counts, scores = ModelSummary(model), [], []
        for p in problems:
            got = by.get((model, p.task_id), [])
            summary.samples += len(got)
            for s in got:
                summary.outcomes[s.status] = summary.outcomes.get(s.status, 0) + 1
            if p.tests:
                n, c = len(got), sum(1 for s in got if s.status == sandbox.PASSED)
                counts.append((n, c))
                summary.per_problem[p.task_id] = {"n": n, "passed": c, **{
                    f"pass@{k}": pass_at_k(n, c, k) if n >= k else None for k in ks}}
            elif got:
                mean = sum(s.chrf or 0 for s in got) / len(got)
                scores.append(mean)
                summary.per_problem[p.task_id] = {"n": len(got), "chrf": mean}
        if counts:
            summary.pass_at = {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}
        if scores:
            summary.chrf = sum(scores) / len(scores)
        out[model] = summary
    return out


def table(summaries: dict[str, ModelSummary], ks) -> str:
    """The results as a terminal table: a row per model."""
    heads = ["model", "samples", *[f"pass@{k}" for k in ks], "chrF", "passed", "failed", "timed out", "crashed"]
    rows = []
    for s in summaries.values():
        rate = [("-" if s.pass_at.get(f"pass@{k}") is None else f"{100 * s.pass_at[f'pass@{k}']:.1f}") for k in ks]
        rows.append([s.model, str(s.samples), *rate, "-" if s.chrf is None else f"{s.chrf:.1f}",
                     *[str(s.outcomes.get(o, 0)) for o in (sandbox.PASSED, sandbox.FAILED, sandbox.TIMED_OUT,
                                                            sandbox.CRASHED)]])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(heads)] + [line(r) for r in rows])


def plot(summaries: dict[str, ModelSummary], ks, path: Path, title: str) -> Path:
    """A bar chart of pass@k (or chrF) per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(summaries)
    metrics = [f"pass@{k}" for k in ks] if any(s.pass_at for s in summaries.values()) else ["chrF"]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(models) * len(metrics)), 4))
    width = 0.8 / len(metrics)
    for j, metric in enumerate(metrics):
        values = [(100 * (s.pass_at.get(metric) or 0)) if metric != "chrF" else (s.chrf or 0) for s in summaries.values()]
        bars = ax.bar([i + j * width for i in range(len(models))], values, width, label=metric)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(models))], models, rotation=15, ha="right")
    ax.set_ylabel("%" if metrics[0] != "chrF" else "chrF")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
