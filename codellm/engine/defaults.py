"""The model `codellm serve` uses when none is named: a small coder pulled from the hub, or,
where the hub cannot be reached, a tiny model built locally so the whole path still runs."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Callable

from codellm.errors import CodellmError
from codellm.registry import Registry
from codellm.registry.catalog import DEFAULT_MODEL

log = logging.getLogger("codellm")
OFFLINE_MODEL = "codellm-tiny:latest"


def ensure_default(registry: Registry, *, status: Callable[[str], None] = log.info, pull=None) -> str:
    """Name of a servable default model, pulling or building it on first use."""
    for name in (DEFAULT_MODEL, OFFLINE_MODEL):
        if registry.exists(name):
            return name
    registry.writable()  # a read-only registry without a default: say so, rather than try to make one
    if pull is None:
        from codellm.registry.hub import pull as hub_pull

        pull = lambda spec: hub_pull(registry, spec)  # noqa: E731
    try:
        status(f"pulling the default model {DEFAULT_MODEL} from the hub")
        return str(pull(DEFAULT_MODEL).name)
    except CodellmError as exc:
        status(f"hub unreachable ({exc.message}); building the offline model {OFFLINE_MODEL}")
    return build_offline(registry)


def build_offline(registry: Registry, name: str = OFFLINE_MODEL, steps: int = 300) -> str:
    from codellm.engine import tiny
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    with tempfile.TemporaryDirectory() as tmp:
        directory = tiny.build(Path(tmp) / "model", steps=steps)
        entry = create(registry, name, Modelfile(from_=str(directory), parameters={"temperature": 0.7, "num_predict": 256}))
    return str(entry.name)
