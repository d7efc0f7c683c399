"""Build registry models: from a Modelfile, from a local directory, and the show --modelfile inverse."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import msgspec

from codellm.errors import CodellmError, InvalidRequest, ModelfileError, NotFound
from codellm.registry import describe
from codellm.registry import manifest as mt
from codellm.registry import modelfile as mfmod
from codellm.registry.names import ModelName, is_valid
from codellm.registry.store import Entry, Registry

PullFn = Callable[[str], Entry]


def import_dir(registry: Registry, directory: Path, *, adapter: bool = False, allow_pickle: bool = False) -> tuple[list[mt.Layer], dict[str, Path]]:
    """Store the files of a local model (or PEFT adapter) directory as layers."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise NotFound(f"no such directory: {directory}", code="path_not_found")
    files = {p.name: p for p in sorted(directory.iterdir()) if p.is_file() and _inside(p, directory)}
    kept = _kept(files, str(directory), adapter, allow_pickle)
    return [registry.add_layer_file(media, files[name], name) for name, media in kept.items()], \
        {name: files[name] for name in kept}


def import_blobs(registry: Registry, files: dict[str, str], *, adapter: bool = False) -> tuple[list[mt.Layer], dict[str, Path]]:
    """Layers from blobs already in the store (uploaded through ``/api/blobs``), as ``{filename: digest}``."""
    for name, digest in files.items():
        if not isinstance(name, str) or not _PLAIN.fullmatch(name) or name in (".", ".."):
            raise InvalidRequest(f"invalid file name {name!r}: a plain file name is expected", param="files")
        try:
            found = registry.blobs.has(digest)
        except CodellmError:
            raise InvalidRequest(f"invalid digest {digest!r} for {name}", param="files") from None
        if not found:
            raise InvalidRequest(f"blob {digest} for {name} is not on the server: upload it first (POST /api/blobs/{digest})",
                                 param="files")
    paths = {name: registry.blobs.path(digest) for name, digest in sorted(files.items())}
    kept = _kept(paths, "the uploaded files", adapter, allow_pickle=False)
    layers = [mt.Layer(media, files[name], registry.blobs.size(files[name]), name) for name, media in kept.items()]
    return layers, {name: paths[name] for name in kept}


_PLAIN = re.compile(r"[A-Za-z0-9._+-][A-Za-z0-9._+ -]{0,254}")


def _kept(files: dict[str, Path], where: str, adapter: bool, allow_pickle: bool) -> dict[str, str]:
    """The files of a model (or adapter) that the registry keeps, with their media types; a set of files that is not
    a model (or not an adapter), or that holds only pickle weights, is refused."""
    if adapter and "adapter_config.json" not in files:
        raise InvalidRequest(f"{where} is not a PEFT adapter (no adapter_config.json)")
    if not adapter and "config.json" not in files:
        if "adapter_config.json" in files:
            raise InvalidRequest(f"{where} is an adapter: use ADAPTER, with FROM naming its base model")
        raise InvalidRequest(f"{where} has no config.json: not a transformers model")
    pickles = [n for n in files if describe.is_pickle(n)]
    if pickles and not any(n.endswith(".safetensors") for n in files) and not allow_pickle:
        raise InvalidRequest(f"{where} has only pickle weights ({pickles[0]}); convert to safetensors or allow pickle")
    kept = {}
    for name in files:
        media = describe.media_type_of(name, adapter=adapter)
        if media is None or media == mt.CODE or (describe.is_pickle(name) and not allow_pickle):
            continue
        if adapter and media != mt.ADAPTER:
            continue
        kept[name] = media
    return kept


def _inside(path: Path, directory: Path) -> bool:
    """A file of the directory, or a link to one inside it (or, in a Hugging Face cache snapshot, to the repo's
    own blobs); a link that leaves it would let a model carry any file of this machine into the registry."""
    if not path.is_symlink():
        return True
    target, root = path.resolve(), directory.resolve()
    if target.is_relative_to(root):
        return True
    if root.parent.name == "snapshots" and target.is_relative_to(root.parent.parent / "blobs"):
        return True
    raise InvalidRequest(f"{path} is a link to {target}, outside {directory}: refusing to import it")


def _is_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text in (".", "..")


def _resolve_path(text: str, base_dir: Path | None, allow_paths: bool) -> Path:
    if not allow_paths:
        raise ModelfileError(f"local paths are not allowed here: {text!r}")
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base_dir or Path.cwd()) / path


def create(
    registry: Registry,
    name: str,
    modelfile: mfmod.Modelfile,
    *,
    base_dir: Path | None = None,
    allow_paths: bool = True,
    pull: PullFn | None = None,
    status: Callable[[str], None] = lambda s: None,
    files: dict[str, str] | None = None,
    adapter_files: dict[str, str] | None = None,
) -> Entry:
    """``files`` and ``adapter_files`` (``{filename: digest}``, blobs already in the store) stand for a FROM
    directory and an ADAPTER directory, as Ollama's create from uploaded files sends them."""
    target = ModelName.parse(name)
    src = modelfile.from_
    base_name: str | None = None
    if files:
        status("importing the uploaded files")
        layers, paths = import_blobs(registry, files)
        config = describe.describe(paths, source="upload")
    elif _is_path(src) or (allow_paths and not is_valid(src) and (base_dir or Path.cwd()).joinpath(src).is_dir()):
        status(f"importing {src}")
        layers, paths = import_dir(registry, _resolve_path(src, base_dir, allow_paths))
        config = describe.describe(paths, source="local")
    else:
        if registry.exists(src) if is_valid(src) else False:
            base = registry.get(src)
        elif pull is not None:
            status(f"pulling {src}")
            base = pull(src)
        else:
            raise NotFound(f"model '{src}' not found, try pulling it first", param="model")
        base_name = str(base.name)
        layers = list(base.manifest.layers)
        config = msgspec.structs.replace(base.manifest.config)
        if base.manifest.is_adapter and (modelfile.adapters or adapter_files):
            raise ModelfileError("FROM names an adapter; an adapter cannot take more ADAPTERs")

    if adapter_files:
        status("adding the uploaded adapter")
        new, _ = import_blobs(registry, adapter_files, adapter=True)
        layers = [layer for layer in layers if layer.media_type != mt.ADAPTER] + new
    for adapter in modelfile.adapters:
        status(f"adding adapter {adapter}")
        if _is_path(adapter) or not is_valid(adapter):
            new, _ = import_dir(registry, _resolve_path(adapter, base_dir, allow_paths), adapter=True)
        else:
            new = registry.get(adapter).manifest.layers_of(mt.ADAPTER)
            if not new:
                raise ModelfileError(f"ADAPTER {adapter}: that model has no adapter layers")
        layers = [layer for layer in layers if layer.media_type != mt.ADAPTER] + new

    def replace(media_type: str, data: bytes | None) -> None:
        nonlocal layers
        layers = [layer for layer in layers if layer.media_type != media_type]
        if data is not None:
            layers.append(registry.add_layer_bytes(media_type, data))

    if modelfile.template is not None:
        _check_template(modelfile.template)
        replace(mt.TEMPLATE, modelfile.template.encode())
        config.chat_template = True
    if modelfile.system is not None:
        replace(mt.SYSTEM, modelfile.system.encode())
    if modelfile.parameters:
        merged = {**(registry.params(mt.Manifest(config, layers))), **modelfile.parameters}
        replace(mt.PARAMS, json.dumps(merged, sort_keys=True).encode())
    if modelfile.messages:
        replace(mt.MESSAGES, msgspec.json.encode(modelfile.messages))
    for text in modelfile.licenses:
        layers.append(registry.add_layer_bytes(mt.LICENSE, text.encode()))
    if base_name and (modelfile.adapters or adapter_files) and not config.base:
        config.base = base_name
    status("writing manifest")
    return registry.save(target, mt.Manifest(config=config, layers=_dedupe(layers)))


def _dedupe(layers: list[mt.Layer]) -> list[mt.Layer]:
    seen, out = set(), []
    for layer in layers:
        key = (layer.media_type, layer.digest, layer.filename)
        if key not in seen:
            seen.add(key)
            out.append(layer)
    return out


def _check_template(template: str) -> None:
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(template)
    except TemplateSyntaxError as exc:
        raise ModelfileError(f"TEMPLATE is not a valid Jinja template (line {exc.lineno}): {exc.message}") from None


def to_modelfile(registry: Registry, name: str) -> mfmod.Modelfile:
    """A Modelfile that re-creates ``name``: FROM the model itself, with its single layers spelled out."""
    entry = registry.get(name)
    m = entry.manifest
    licenses = [registry.read_layer(layer).decode() for layer in m.layers_of(mt.LICENSE) if not layer.filename]
    return mfmod.Modelfile(
        from_=str(entry.name),
        parameters=registry.params(m),
        template=registry.text(m, mt.TEMPLATE),
        system=registry.text(m, mt.SYSTEM),
        messages=[mfmod.Message(**x) for x in registry.messages(m)],
        licenses=licenses,
    )


def show_modelfile(registry: Registry, name: str) -> str:
    return mfmod.format(to_modelfile(registry, name))
