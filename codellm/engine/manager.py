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

    def sampling(self, overrides: dict) -> SamplingParams:
        """Request fields over the model's Modelfile defaults over the API defaults."""
        values: dict = {}
        for key, value in self.lm.defaults.items():
            if key in _PARAM_MAP:
                values[_PARAM_MAP[key]] = list(value) if isinstance(value, list) else value
        if values.get("max_tokens", 0) is not None and values.get("max_tokens", 0) < 0:
            values.pop("max_tokens")
        for key, value in overrides.items():
            if value is not None:
                values[key] = value
        return SamplingParams(**values)


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

    def get(self, name: str) -> Served:
        key = self.canonical(name)
        served = self._served.get(key)
        if served is None:
            self.registry.get(key)  # NotFound before taking any lock
            with self._lock:
                lock = self._locks.setdefault(key, threading.Lock())
            with lock:
                served = self._served.get(key)
                if served is None:
                    o = self.options
                    lm = load(self.registry, key, device=o.device, dtype=o.dtype, quantize=o.quantize,
                              num_ctx=o.num_ctx, trust_remote_code=o.trust_remote_code)
                    engine = Engine(lm, slots=o.slots, max_queue=o.max_queue, prefill_chunk=o.prefill_chunk)
                    served = self._served[key] = Served(lm, engine)
        served.last_used = time.time()
        return served

    def unload(self, name: str) -> bool:
        served = self._served.pop(self.canonical(name), None)
        if served:
            served.engine.shutdown()
        return served is not None

    def close(self) -> None:
        for key in list(self._served):
            self.unload(key)
