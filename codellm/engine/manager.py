"""Loaded models: each loads on first use, once, and stays loaded with its own engine thread."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from codellm.engine import memory, telemetry
from codellm.engine.speculation import SpeculativeConfig
from codellm.engine.loader import LoadedModel
from codellm.engine.sampling import SamplingParams, checked
from codellm.engine.remote import EngineProcess
from codellm.engine.client import EngineClient
from codellm.errors import CodellmError
from codellm.engine.core import Engine
from codellm.registry import ModelName, Registry

log = logging.getLogger("codellm.engine")

# Modelfile PARAMETER name -> SamplingParams field
PARAM_MAP = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
    "repeat_penalty": "repetition_penalty", "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "num_predict": "max_tokens", "stop": "stop",
}


@dataclass
class LoadOptions:
    keep_alive: float | None = 300.0  # seconds a model stays loaded after its last request; None: forever
    max_loaded: int = 3  # weights loaded at once (a base and its adapters count once); LRU idle ones make room
    memory_limit: int | None = None  # bytes codellm may use for weights and caches (default: what is free)
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    num_ctx: int | None = None
    slots: int | None = None
    max_queue: int = 256
    prefill_chunk: int | None = None  # prompt tokens per step (default: core.default_prefill_chunk)
    kv_cache_memory: int | None = None  # bytes of paged KV cache per model (default: memory.kv_tokens)
    prefix_caching: bool = True
    trust_remote_code: bool = False
    cuda_graphs: bool = True  # decode through captured CUDA graphs on GPUs (eager when off, or for adapters)
    compile: bool = True  # torch.compile the graph-captured decode step (GPU only; falls back to plain graphs)
    compile_prefill: bool = False  # and the packed-prefill step (one dynamic graph for every bucket)
    mixed_steps: bool = False  # decoding sequences ride in a prefilling step's forward (``Engine(mixed=)``)
    engine_process: bool | None = None  # each engine in a child process (default: on GPUs), see engine.remote
    tensor_parallel: int = 1  # ranks a model is split over (engine.sharding); above 1 its engine is a child process
    speculative: "SpeculativeConfig | None" = None  # speculative decoding (engine.speculation, engine.drafter)


@dataclass
class Served:
    lm: LoadedModel
    engine: EngineClient | None  # None for encoders (embedding and rerank models)
    listing: str  # its manifest's path (``Registry.manifest_path``): a model removed from the registry is not served
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)

    group: str = ""  # the weights in memory it runs on (shared with its base and sibling adapters)
    expires_at: float | None = None  # None: stays loaded
    encoder: object = None  # codellm.engine.encoders.Encoder for embedding / rerank models
    active: int = 0  # requests in flight (a model is never unloaded under them)

    @property
    def engine_gone(self) -> bool:
        """Its engine stopped (the engine process was killed, say): it must be loaded again."""
        return self.engine is not None and not self.engine.alive

    def generator(self) -> EngineClient:
        """The engine, or a clear 400 when this model cannot generate text."""
        if self.engine is None:
            from codellm.errors import InvalidRequest

            raise InvalidRequest(f'"{self.lm.name}" does not support generate: it is an {self.lm.config.task} model',
                                 param="model", code="model_not_supported")
        return self.engine

    def sampling(self, overrides: dict, base: dict | None = None, names: dict[str, str] | None = None) -> SamplingParams:
        """Request fields over the model's Modelfile defaults over the API's defaults (``base``, in
        Modelfile/Ollama option names), every value checked (``sampling.checked``; ``names``: the API's
        names for the fields, for its error messages)."""
        values = options_to_overrides({**(base or {}), **self.lm.defaults})
        for key, value in overrides.items():
            if value is not None:
                values[key] = value
        return checked(values, names)


def options_to_overrides(options: dict) -> dict:
    """Modelfile PARAMETERs / Ollama ``options`` -> SamplingParams fields (unknown keys ignored)."""
    values: dict = {}
    for key, value in (options or {}).items():
        if key in PARAM_MAP and value is not None:
            values[PARAM_MAP[key]] = list(value) if isinstance(value, list) else ([value] if key == "stop" else value)
    limit = values.get("max_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit < 0:
        values.pop("max_tokens")  # Ollama's -1: until the context is full
    return values


def parse_keep_alive(value, default: float | None) -> float | None:
    """Ollama's keep_alive: a duration ("5m", "1h30m", "10s", "-1"), or seconds as a number.
    Returns seconds to stay loaded after the request, 0 to unload now, None to stay forever."""
    import re

    from codellm.errors import InvalidRequest

    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise InvalidRequest("keep_alive must be a duration or a number of seconds", param="keep_alive")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = re.fullmatch(r"(-)?((?:\d+(?:\.\d+)?(?:h|m|s|ms))+)", text)
            if not parts:
                raise InvalidRequest(f"invalid keep_alive duration {text!r} (use e.g. 5m, 1h, 30s, -1)",
                                     param="keep_alive") from None
            unit = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
            seconds = sum(float(n) * unit[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", parts.group(2)))
            seconds = -seconds if parts.group(1) else seconds
    return None if seconds < 0 else seconds


@dataclass
class Group:
    """Weights in memory and the engine that runs them, shared by every model over those weights
    (a base and all its adapters): loading another adapter costs only reading it."""

    key: str
    engine: EngineClient | None
    nbytes: int


class ModelManager:
    def __init__(self, registry: Registry, options: LoadOptions | None = None):
        self.registry = registry
        self.options = options or LoadOptions()
        self._served: dict[str, Served] = {}
        self._groups: dict[str, Group] = {}
        self._load_lock = threading.RLock()
        self._loop = None  # the server's event loop, where engine processes' messages are read (serve_on)

    def serve_on(self, loop) -> None:
        """Read engine processes' outputs on ``loop``, for the models loaded now and those loaded later."""
        self._loop = loop
        for served in list(self._served.values()):
            if isinstance(served.engine, EngineProcess):
                served.engine.serve_on(loop)

    def canonical(self, name: str) -> str:
        return str(ModelName.parse(name))

    def resolve(self, name: str) -> str:
        """The registry model a request's ``model`` means: the name itself, or for ``base:adapter`` (a name that is
        no model) the adapter model after the last colon, which must have been made FROM ``base``."""
        from codellm.errors import InvalidName, InvalidRequest
        from codellm.registry import manifest as mt

        try:
            if self.registry.exists(name):
                return name
        except InvalidName:
            pass
        base, sep, adapter = name.rpartition(":")
        try:
            if not (sep and self.registry.exists(base) and self.registry.exists(adapter)):
                return name
        except InvalidName:
            return name
        entry = self.registry.get(adapter)
        made_on = entry.manifest.config.base
        if not entry.manifest.layers_of(mt.ADAPTER) or not made_on:
            raise InvalidRequest(f"`{adapter}` is not an adapter, so `{name}` names no model", param="model")
        if self.canonical(made_on) != self.canonical(base):
            raise InvalidRequest(f"adapter `{adapter}` was made for `{made_on}`, not `{base}`", param="model")
        return str(entry.name)

    def loaded(self) -> dict[str, Served]:
        return dict(self._served)

    def ready(self, name: str) -> Served | None:
        """``name`` if it is loaded and its engine runs (marked used now), else None: the per-request fast path."""
        key = self.canonical(name)
        served = self._served.get(key)
        if served is None or served.engine_gone:
            return None
        # removed from the registry (codellm rm) while loaded: forget it once idle (one stat: resolving the name's path
        # on every request was a third of a request's time on the event loop)
        if not os.path.isfile(served.listing):
            if served.active == 0:
                self.unload(key)
            return None
        served.last_used = time.time()
        return served

    def get(self, name: str, *, pin: bool = False) -> Served:
        """The loaded model ``name``, loading it (and evicting idle ones beyond the caps) if needed. A model whose
        engine died (its process was killed, say) is loaded afresh."""
        key = self.canonical(name)
        served = self._served.get(key)
        if served is not None and served.engine_gone:
            with self._load_lock:
                if self._served.get(key) is served:
                    log.warning("the engine of %s is gone; loading it again", key)
                    self._unload_group(served.group)
            served = None
        if served is None:
            self.registry.get(key)  # NotFound before taking any lock
            with self._load_lock:
                served = self._served.get(key) or self._load(key, pin)
        served.last_used = time.time()
        return served

    def _load(self, key: str, pin: bool) -> Served:
        from codellm.engine import loader
        from codellm.registry import manifest as mt

        o = self.options
        entry = self.registry.get(key)
        if entry.manifest.config.task in ("embed", "rerank"):
            return self._load_encoder(key, entry, pin)
        entry, weights = loader.resolve(self.registry, entry)
        self.registry.check(weights, name=entry.name.short)  # before anything of it is read: a clear error if damaged
        spec = self._speculation(entry, weights)
        draft = spec.draft if spec is not None and spec.method == "draft" else None
        gkey = loader.weights_identity(weights, o.device, o.dtype, o.quantize, *([draft] if draft else []))
        group = self._groups.get(gkey)
        if group is None:
            extra = memory.estimate(self.registry, loader.resolve(self.registry, draft)[1], o, kv_cache=False) if draft else 0
            used = sum(g.nbytes for g in self._groups.values())
            fp = memory.footprint(self.registry, weights, o, capacity=memory.available(o, used) + used - extra)
            if fp.fitted:
                log.info("%s: a KV cache of %s, what fits beside its weights (--kv-cache-memory sets it)", entry.name,
                         memory.human(fp.kv))
            need = fp.total + extra
            self._make_room(need)
            group = self._groups[gkey] = Group(gkey, self._start_engine(entry, weights, spec, fp.kv if fp.fitted else None),
                                               need)
        engine = group.engine
        adapter = None
        if entry.manifest.layers_of(mt.ADAPTER):  # goes in between two steps
            model, adapter = engine.attach_adapter(self.registry, entry)
            for other in self._served.values():
                if other.group == gkey:
                    other.lm.model = model
        lm = loader.view(self.registry, entry, weights, engine.lm.model, engine.lm.device, engine.lm.dtype,
                         num_ctx=o.num_ctx, quantize=o.quantize, adapter=adapter, trust_remote_code=o.trust_remote_code,
                         max_len_cap=engine.lm.max_len)
        served = Served(lm, engine, group=gkey, listing=self.registry.manifest_path(key))
        served.expires_at = None if pin or o.keep_alive is None else time.time() + o.keep_alive
        self._served[key] = served
        from codellm.engine import grammar

        grammar.warm(lm.tokenizer, lm.eos_ids, wait=pin)
        memory.freeze_heap()
        return served

    def _speculation(self, entry, weights) -> SpeculativeConfig | None:
        """The server's speculative decoding, or by the draft model this model's Modelfile names (PARAMETER draft)."""
        import msgspec

        spec = self.options.speculative
        draft = {**self.registry.params(weights), **self.registry.params(entry.manifest)}.get("draft")
        if not draft:
            return spec
        if spec is None:
            return SpeculativeConfig(method="draft", draft=draft)
        if spec.method != "draft" or spec.draft != draft:  # the model's own setting is the more specific one
            log.info("%s drafts with %s (its PARAMETER draft), in place of the server's %s", entry.name, draft,
                     spec.draft or spec.method)
        return msgspec.structs.replace(spec, method="draft", draft=draft)

    def _start_engine(self, entry, weights, spec: SpeculativeConfig | None, kv_cache_memory: int | None = None) -> EngineClient:
        from codellm.engine import loader

        o = self.options
        load = dict(device=o.device, dtype=o.dtype, quantize=o.quantize, trust_remote_code=o.trust_remote_code)
        view = dict(num_ctx=o.num_ctx, quantize=o.quantize, trust_remote_code=o.trust_remote_code)
        engine = dict(slots=o.slots, max_queue=o.max_queue, prefill_chunk=o.prefill_chunk, cuda_graphs=o.cuda_graphs,
                      compile=o.compile, compile_prefill=o.compile_prefill, kv_cache_memory=kv_cache_memory or o.kv_cache_memory,
                      kv_fit=kv_cache_memory is not None, prefix_caching=o.prefix_caching, mixed=o.mixed_steps,
                      speculative=spec)
        separate = o.engine_process
        if o.tensor_parallel > 1:  # the child is rank 0 and starts the others
            engine["tensor_parallel"], separate = o.tensor_parallel, True
        if separate is None:
            separate = loader.pick_device(o.device, o.dtype)[0].type == "cuda"
        if separate:
            process = EngineProcess(self.registry, entry, weights, load=load, engine=engine, view=view,
                                    max_queue=o.max_queue)
            if self._loop is not None:
                process.serve_on(self._loop)
            return process
        model, dev, dtype = loader.load_weights(self.registry, entry, weights, **load)
        base = loader.view(self.registry, entry, weights, model, dev, dtype, **view)
        return Engine(base, draft=loader.load_draft(self.registry, spec, base, **load), **engine)

    def _load_encoder(self, key: str, entry, pin: bool) -> Served:
        from codellm.engine import loader
        from codellm.engine.encoders import load_encoder

        o = self.options
        gkey = "enc-" + loader.weights_identity(entry.manifest, o.device, o.dtype)
        need = memory.estimate(self.registry, entry.manifest, o, kv_cache=False)
        self._make_room(need)
        enc = load_encoder(self.registry, entry, device=o.device, dtype=o.dtype, trust_remote_code=o.trust_remote_code)
        self._groups[gkey] = Group(gkey, None, need)
        lm = LoadedModel(name=key, manifest=entry.manifest, model=enc.model, tokenizer=enc.tokenizer, device=enc.device,
                         dtype=next(enc.model.parameters()).dtype, max_len=enc.max_len)
        served = Served(lm, None, group=gkey, encoder=enc, listing=self.registry.manifest_path(key))
        served.expires_at = None if pin or o.keep_alive is None else time.time() + o.keep_alive
        self._served[key] = served
        return served

    def _groups_by_age(self) -> list[str]:
        """Idle groups (nothing in flight in any of their models), least recently used first."""
        ages = []
        for gkey in self._groups:
            members = [s for s in self._served.values() if s.group == gkey]
            if all(s.active == 0 for s in members):
                ages.append((max((s.last_used for s in members), default=0), gkey))
        return [g for _, g in sorted(ages)]

    def _make_room(self, need: int) -> None:
        """Evict idle models, least recently used first, until one more fits the count cap and memory."""
        from codellm.errors import InsufficientMemory

        while True:
            used = sum(g.nbytes for g in self._groups.values())
            free = memory.available(self.options, used)
            if len(self._groups) < max(1, self.options.max_loaded) and need <= free:
                return
            idle = self._groups_by_age()
            if not idle:
                if need > free:
                    raise InsufficientMemory(
                        f"model requires more memory ({memory.human(need)}) than is available ({memory.human(free)})")
                return  # over the count cap but every model is busy: load anyway rather than fail
            self._unload_group(idle[0])

    def _unload_group(self, gkey: str) -> None:
        for key in [k for k, s in self._served.items() if s.group == gkey]:
            self._served.pop(key, None)
            telemetry.forget(key)
        group = self._groups.pop(gkey, None)
        if group and group.engine:
            group.engine.shutdown()

    def touch(self, served: Served, keep_alive: float | None | str = "default") -> None:
        """A request finished: the model stays loaded for keep_alive seconds (0: unload now)."""
        served.last_used = time.time()
        if keep_alive == "default":
            if served.expires_at is None:
                return
            keep_alive = self.options.keep_alive
        served.expires_at = None if keep_alive is None else time.time() + keep_alive
        if keep_alive == 0 and served.active == 0:
            self.unload(served.lm.name)

    def reap(self, now: float | None = None) -> list[str]:
        """Unload models whose keep_alive has run out and that serve nothing."""
        now = now or time.time()
        gone = [k for k, s in self._served.items() if s.active == 0 and (
            (s.expires_at is not None and s.expires_at <= now) or not self.registry.exists(k))]
        for key in gone:
            self.unload(key)
        return gone

    def unload(self, name: str) -> bool:
        """Forget ``name``; its weights leave memory once no other model shares them, and an adapter comes off the
        weights it shared (unless another model still serves it)."""
        with self._load_lock:
            served = self._served.pop(self.canonical(name), None)
            if served is None:
                return False
            telemetry.forget(served.lm.name)
            others = [s for s in self._served.values() if s.group == served.group]
            if not others:
                self._unload_group(served.group)
            elif served.lm.adapter and not any(s.lm.adapter == served.lm.adapter for s in others):
                # off the event loop (this may run there): the weights change between two steps, and the graphs
                # are captured again
                threading.Thread(target=self._detach, args=(served.lm.adapter, served.group), daemon=True,
                                 name="detach-adapter").start()
        return True

    def _detach(self, adapter: str, group: str) -> None:
        with self._load_lock:  # a load of the same adapter meanwhile waits, and then finds it gone
            others = [s for s in self._served.values() if s.group == group]
            if not others or others[0].engine is None or any(s.lm.adapter == adapter for s in others):
                return
            try:
                model = others[0].engine.detach_adapter(adapter)
            except CodellmError as exc:  # still in use: it stays on the weights until they unload
                log.warning("adapter %s stays attached: %s", adapter, exc)
                return
            if model is not None:
                for other in others:
                    other.lm.model = model

    def close(self) -> None:
        for gkey in list(self._groups):
            self._unload_group(gkey)
