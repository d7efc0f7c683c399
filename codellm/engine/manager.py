"""Loaded models: each loads on first use, once, and stays loaded with its own engine thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from codellm.engine.loader import LoadedModel, load
from codellm.engine.sampling import SamplingParams
from codellm.engine.scheduler import Engine
from codellm.registry import ModelName, Registry

# Modelfile PARAMETER name -> SamplingParams field
_PARAM_MAP = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
    "repeat_penalty": "repetition_penalty", "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "num_predict": "max_tokens", "stop": "stop",
}


@dataclass
class LoadOptions:
    keep_alive: float | None = 300.0  # seconds a model stays loaded after its last request; None: forever
    max_loaded: int = 3  # models loaded at once; the least recently used idle one makes room
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    num_ctx: int | None = None
    slots: int | None = None
    max_queue: int = 256
    prefill_chunk: int | None = None  # prompt tokens per step (default: 2048 on GPU, 512 on CPU)
    trust_remote_code: bool = False


@dataclass
class Served:
    lm: LoadedModel
    engine: Engine
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)

    expires_at: float | None = None  # None: stays loaded
    active: int = 0  # requests in flight (a model is never unloaded under them)

    def sampling(self, overrides: dict, base: dict | None = None) -> SamplingParams:
        """Request fields over the model's Modelfile defaults over the API's defaults (``base``, in
        Modelfile/Ollama option names)."""
        values = options_to_overrides({**(base or {}), **self.lm.defaults})
        for key, value in overrides.items():
            if value is not None:
                values[key] = value
        return SamplingParams(**values)


def options_to_overrides(options: dict) -> dict:
    """Modelfile PARAMETERs / Ollama ``options`` -> SamplingParams fields (unknown keys ignored)."""
    values: dict = {}
    for key, value in (options or {}).items():
        if key in _PARAM_MAP and value is not None:
            values[_PARAM_MAP[key]] = list(value) if isinstance(value, list) else ([value] if key == "stop" else value)
    if values.get("max_tokens") is not None and values["max_tokens"] < 0:
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


class ModelManager:
    def __init__(self, registry: Registry, options: LoadOptions | None = None):
        self.registry = registry
        self.options = options or LoadOptions()
        self._served: dict[str, Served] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def canonical(self, name: str) -> str:
        return str(ModelName.parse(name))

    def loaded(self) -> dict[str, Served]:
        return dict(self._served)

    def get(self, name: str, *, pin: bool = False) -> Served:
        """The loaded model ``name``, loading it (and evicting idle ones beyond the cap) if needed."""
        key = self.canonical(name)
        served = self._served.get(key)
        if served is None:
            self.registry.get(key)  # NotFound before taking any lock
            with self._lock:
                lock = self._locks.setdefault(key, threading.Lock())
            with lock:
                served = self._served.get(key)
                if served is None:
                    self._make_room(key)
                    o = self.options
                    lm = load(self.registry, key, device=o.device, dtype=o.dtype, quantize=o.quantize,
                              num_ctx=o.num_ctx, trust_remote_code=o.trust_remote_code)
                    engine = Engine(lm, slots=o.slots, max_queue=o.max_queue, prefill_chunk=o.prefill_chunk)
                    served = self._served[key] = Served(lm, engine)
                    served.expires_at = None if pin or o.keep_alive is None else time.time() + o.keep_alive
        served.last_used = time.time()
        return served

    def _make_room(self, loading: str) -> None:
        while len(self._served) >= max(1, self.options.max_loaded):
            idle = [(s.last_used, k) for k, s in self._served.items() if s.active == 0 and k != loading]
            if not idle:
                break  # every loaded model is busy: load anyway rather than fail the request
            self.unload(min(idle)[1])

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
        gone = [k for k, s in self._served.items() if s.expires_at is not None and s.expires_at <= now and s.active == 0]
        for key in gone:
            self.unload(key)
        return gone

    def unload(self, name: str) -> bool:
        served = self._served.pop(self.canonical(name), None)
        if served:
            served.engine.shutdown()
        return served is not None

    def close(self) -> None:
        for key in list(self._served):
            self.unload(key)
