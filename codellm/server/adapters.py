"""LoRA adapters added and removed while the server runs: vLLM's ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``, so tools written for vLLM's runtime LoRA work here.

Off unless the server was started with ``--allow-lora-updates``. A loaded adapter becomes a registry model
named ``lora_name`` (FROM its base, ADAPTER its files), served on its base's weights and engine like any
other adapter, and listed in ``/v1/models``; unloading forgets it and removes what loading created, and so
does the server's shutdown. A server killed before its shutdown leaves them behind; each server keeps a
ledger of its own in the registry (``run/lora-HOST-PID.json``), and the next server started on that registry on
this host removes what a dead one's ledger lists. The adapter comes from a registry adapter model, or from a PEFT
directory on the server's own disk, which only a client on this machine (loopback) may name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
from pathlib import Path

from litestar import Request, post
from litestar.response import Response
from msgspec import Meta, Struct
from typing import Annotated

from codellm.errors import CodellmError, InvalidRequest, NotFound
from codellm.registry import manifest as mt
from codellm.registry.names import is_valid
from codellm.server.openai import manager_of


log = logging.getLogger("codellm.server")


class Forbidden(CodellmError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class LoadLoRA(Struct, kw_only=True):
    lora_name: Annotated[str, Meta(min_length=1, max_length=300)]
    lora_path: Annotated[str, Meta(min_length=1, max_length=4096)]
    base_model_name: Annotated[str, Meta(max_length=300)] | None = None  # not vLLM's: which base, when several


class UnloadLoRA(Struct, kw_only=True):
    lora_name: Annotated[str, Meta(min_length=1, max_length=300)]
    lora_int_id: int | None = None  # vLLM's; unused


def _allowed(request: Request) -> None:
    if not request.app.state.lora_updates:
        raise Forbidden("runtime LoRA updates are off: start the server with --allow-lora-updates")


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _base(request: Request, data: LoadLoRA, adapter_entry) -> str:
    """The model the adapter goes on: named, the registry adapter's own base, or the only base loaded."""
    manager = manager_of(request)
    if data.base_model_name:
        return data.base_model_name
    if adapter_entry is not None and adapter_entry.manifest.config.base:
        return adapter_entry.manifest.config.base
    bases = sorted({name for name, s in manager.loaded().items()
                    if s.engine is not None and not s.lm.manifest.layers_of(mt.ADAPTER)})
    if len(bases) != 1:
        raise InvalidRequest(f"say which model the adapter goes on with base_model_name (loaded bases: "
                             f"{', '.join(bases) or 'none'})", param="base_model_name")
    return bases[0]


@post("/v1/load_lora_adapter", status_code=200, summary="Add a LoRA adapter while serving (vLLM)")
async def load_lora_adapter(request: Request, data: LoadLoRA) -> Response:
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    _allowed(request)
    manager = manager_of(request)
    reg = manager.registry
    if not is_valid(data.lora_name):
        raise InvalidRequest(f"invalid lora_name {data.lora_name!r}", param="lora_name")
    if reg.exists(data.lora_name):
        raise InvalidRequest(f"The lora adapter '{data.lora_name}' has already been loaded.", param="lora_name")
    from_registry = is_valid(data.lora_path) and reg.exists(data.lora_path)
    entry = reg.get(data.lora_path) if from_registry else None
    if entry is not None and not entry.manifest.layers_of(mt.ADAPTER):
        raise InvalidRequest(f"{data.lora_path} is not an adapter", param="lora_path")
    if entry is None and not _loopback(request):
        raise Forbidden("only a client on this machine may load an adapter from a directory; name a registry adapter")
    base = _base(request, data, entry)
    if not reg.exists(base):
        raise NotFound(f"The model `{base}` does not exist.", param="base_model_name")
    modelfile = Modelfile(from_=base, adapters=[data.lora_path])
    names = request.app.state.runtime_adapters
    await asyncio.to_thread(_record, reg, names | {data.lora_name})  # before it exists: a kill leaves no stray
    try:
        await asyncio.to_thread(create, reg, data.lora_name, modelfile, allow_paths=entry is None)
        names.add(reg.get(data.lora_name).name)
    finally:
        await asyncio.to_thread(_record, reg, names)
    try:
        await asyncio.to_thread(manager.get, data.lora_name)  # attached now, not on the first request
    except BaseException:
        await asyncio.to_thread(_forget, request, data.lora_name)
        raise
    return Response(f"Success: LoRA adapter '{data.lora_name}' added successfully.", media_type="text/plain")


def forget_all(app) -> None:
    """At shutdown: adapters added at run time last as long as the server, as in vLLM; the registry forgets them."""
    reg = app.state.manager.registry
    _remove(reg, app.state.runtime_adapters)
    app.state.runtime_adapters.clear()
    if not reg.read_only:
        _ledger(reg).unlink(missing_ok=True)


def _remove(reg, names) -> None:
    for name in map(str, names):
        try:
            if is_valid(name) and reg.exists(name) and reg.get(name).manifest.layers_of(mt.ADAPTER):
                reg.remove(name)
        except CodellmError:
            pass


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), None if there is none: a pid taken again by another
    process after a kill has another start."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"


def _ledger(reg) -> Path:
    return reg.home / "run" / f"lora-{socket.gethostname()}-{os.getpid()}.json"


def _record(reg, names) -> None:
    """This server's ledger: the adapters it added, written whole (a temporary file renamed over it)."""
    path = _ledger(reg)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"started": _started(os.getpid()), "adapters": sorted(str(n) for n in names)}))
    os.replace(tmp, path)


def reclaim(reg) -> list[str]:
    """At start: remove the adapters that servers on this host, now gone, added at run time and never removed (they
    were killed). Ledgers of other hosts and of live servers are left alone; a ledger that cannot be read is
    dropped."""
    if reg.read_only:
        return []
    removed = []
    prefix = f"lora-{socket.gethostname()}-"
    for path in (reg.home / "run").glob(prefix + "*.json"):
        pid = path.stem.removeprefix(prefix)
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            ledger = json.loads(path.read_text())
            started, names = ledger["started"], [n for n in ledger["adapters"] if isinstance(n, str)]
        except (OSError, ValueError, KeyError, TypeError):
            started, names = None, []
        now = _started(int(pid))
        if now is not None and (now == started or "?" in (now, started)):
            continue  # that server still runs
        _remove(reg, names)
        removed += names
        path.unlink(missing_ok=True)
    if removed:
        log.info("removed adapters added at run time by servers that were stopped without shutting down: %s",
                 ", ".join(removed))
    return removed


def _forget(request: Request, name: str) -> None:
    manager = manager_of(request)
    manager.unload(name)
    key = manager.registry.get(name).name
    manager.registry.remove(key)
    request.app.state.runtime_adapters.discard(key)
    _record(manager.registry, request.app.state.runtime_adapters)


@post("/v1/unload_lora_adapter", status_code=200, summary="Remove a LoRA adapter added while serving (vLLM)")
async def unload_lora_adapter(request: Request, data: UnloadLoRA) -> Response:
    _allowed(request)
    reg = manager_of(request).registry
    if not is_valid(data.lora_name) or not reg.exists(data.lora_name) or \
            reg.get(data.lora_name).name not in request.app.state.runtime_adapters:
        raise NotFound(f"The lora adapter '{data.lora_name}' cannot be found.", param="lora_name",
                       code="lora_not_found")
    await asyncio.to_thread(_forget, request, data.lora_name)
    return Response(f"Success: LoRA adapter '{data.lora_name}' removed successfully.", media_type="text/plain")


ROUTES = [load_lora_adapter, unload_lora_adapter]
