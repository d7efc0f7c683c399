"""Request timings under vLLM's metric names and meanings, so that dashboards and alerts made for vLLM read ours.

Every engine front (``client.Admission``) runs in the serving process, whether the engine runs there or in a
child process, so each request is timed where it was admitted and where its outputs arrive: one series per
model name, whatever the placement. Counts the engine keeps itself (running, waiting, KV blocks, the prefix
cache) are read from its ``Stats`` when scraped (``StatsCollector``).
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from codellm.engine.outputs import Output, Sink

disable_created_metrics()  # vLLM's choice too: no *_created series beside each counter and histogram
REGISTRY = CollectorRegistry(auto_describe=False)
LABELS = ("model_name",)

# vLLM's own buckets, so that quantiles over both engines are comparable
_LATENCY = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
            960.0, 1920.0, 7680.0)
TTFT = Histogram("vllm:time_to_first_token_seconds", "Time from admission to a choice's first output.", LABELS,
                 buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                          20.0, 40.0, 80.0, 160.0, 640.0, 2560.0), registry=REGISTRY)
ITL = Histogram("vllm:inter_token_latency_seconds", "Time between two outputs of one choice.", LABELS,
                buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0), registry=REGISTRY)
E2E = Histogram("vllm:e2e_request_latency_seconds", "Time from admission to a choice's last output.", LABELS,
                buckets=_LATENCY, registry=REGISTRY)
QUEUE = Histogram("vllm:request_queue_time_seconds", "Time a choice waited for a batch row and its KV blocks.",
                  LABELS, buckets=_LATENCY, registry=REGISTRY)
_TOKENS = tuple(float(m * 10 ** e) for e in range(7) for m in (1, 2, 5))
PROMPT = Histogram("vllm:request_prompt_tokens", "Prompt tokens of each finished choice.", LABELS, buckets=_TOKENS,
                   registry=REGISTRY)
GENERATION = Histogram("vllm:request_generation_tokens", "Generated tokens of each finished choice.", LABELS,
                       buckets=_TOKENS, registry=REGISTRY)
SUCCESS = Counter("vllm:request_success", "Choices finished, by reason (stop, length, cancelled, error).",
                  (*LABELS, "finished_reason"), registry=REGISTRY)

GENERATED = Counter("vllm:generation_tokens", "Tokens generated, the first of each choice included.", LABELS,
                    registry=REGISTRY)

_PER_MODEL = (TTFT, ITL, E2E, QUEUE, PROMPT, GENERATION, GENERATED)


def timed(sink: Sink, model: str) -> Sink:
    """``sink`` with each choice's outputs timed for ``model`` from now, the moment of admission."""
    start = time.perf_counter()
    ttft, itl, e2e, queue, generated = (h.labels(model) for h in (TTFT, ITL, E2E, QUEUE, GENERATED))
    last: dict[int, float] = {}

    def timing(out: Output) -> None:
        now = time.perf_counter()
        before = last.get(out.index)
        if before is None:
            ttft.observe(now - start)
            if out.queue_time is not None:
                queue.observe(out.queue_time)
        elif out.token_ids:
            itl.observe(now - before)
        last[out.index] = now
        if out.token_ids:
            generated.inc(len(out.token_ids))
        if out.finish_reason is not None:
            e2e.observe(now - start)
            PROMPT.labels(model).observe(out.prompt_tokens)
            GENERATION.labels(model).observe(out.completion_tokens)
            SUCCESS.labels(model, out.finish_reason).inc()
        sink(out)
    return timing


def forget(model: str) -> None:
    """Drop ``model``'s series when it is unloaded: one series per loaded model."""
    for metric in (*_PER_MODEL, SUCCESS):
        metric.remove_by_labels({"model_name": model})


class StatsCollector(Collector):
    """The engines' own counts at scrape time. ``engines()`` yields (model name, engine client) pairs."""

    def __init__(self, engines: Callable[[], Iterable]):
        self.engines = engines

    def collect(self):
        gauges = {
            "vllm:num_requests_running": ("Choices holding a batch row.", lambda e: e.active()),
            "vllm:num_requests_waiting": ("Choices admitted and waiting for a row.",
                                          lambda e: max(0, e.pending() - e.active())),
            "vllm:kv_cache_usage_perc": ("Fraction of KV-cache blocks in use (0 to 1).",
                                         lambda e: e.stats.kv_used / max(1, e.stats.kv_blocks)),
            "codellm_kv_cache_blocks": ("KV-cache blocks in the pool.", lambda e: e.stats.kv_blocks),
            "codellm_lora_adapters": ("LoRA adapters on the weights.", lambda e: e.stats.adapters),
        }
        counters = {
            "vllm:prompt_tokens": ("Prompt tokens computed (prefilled).", lambda e: e.stats.prefill_tokens),
            "codellm_decode_tokens": ("Tokens generated by decode steps (each choice's first comes from prefill).",
                                      lambda e: e.stats.decode_tokens),
            "vllm:num_preemptions": ("Sequences preempted for want of KV blocks.", lambda e: e.stats.preempted),
            "vllm:prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.",
                                          lambda e: e.stats.prefix_queries),
            "vllm:prefix_cache_hits": ("Prompt tokens found in the prefix cache.", lambda e: e.stats.prefix_hits),
            "codellm_decode_steps": ("Engine steps run.", lambda e: e.stats.steps),
            "vllm:spec_decode_num_drafts": ("Speculative drafts checked (a sequence's drafts in one step).",
                                            lambda e: e.stats.spec_drafts),
            "vllm:spec_decode_num_draft_tokens": ("Speculative draft tokens checked.",
                                                  lambda e: e.stats.spec_draft_tokens),
            "vllm:spec_decode_num_accepted_tokens": ("Speculative draft tokens kept.", lambda e: e.stats.spec_accepted),
        }
        engines = list(self.engines())
        for name, (doc, value) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            for model, engine in engines:
                family.add_metric([model], value(engine))
            yield family
        for name, (doc, value) in counters.items():
            family = CounterMetricFamily(name, doc, labels=LABELS)
            for model, engine in engines:
                family.add_metric([model], value(engine))
            yield family


def exposition(extra: Collector | None = None) -> bytes:
    """The Prometheus text format: request timings, and ``extra`` (the engines' counts) read now."""
    if extra is None:
        return generate_latest(REGISTRY)
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(_Forward(REGISTRY))
    scrape.register(extra)
    return generate_latest(scrape)


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        return self.registry.collect()
