"""Build registry models: from a Modelfile, from a local directory, and the show --modelfile inverse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import msgspec

from codellm.errors import InvalidRequest, ModelfileError, NotFound
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
    if adapter and "adapter_config.json" not in files:
        raise InvalidRequest(f"{directory} is not a PEFT adapter directory (no adapter_config.json)")
    if not adapter and "config.json" not in files:
        if "adapter_config.json" in files:
            raise InvalidRequest(f"{directory} is an adapter: use ADAPTER, with FROM naming its base model")
        raise InvalidRequest(f"{directory} has no config.json: not a transformers model directory")
    pickles = [n for n in files if describe.is_pickle(n)]
    if pickles and not any(n.endswith(".safetensors") for n in files) and not allow_pickle:
        raise InvalidRequest(f"{directory} has only pickle weights ({pickles[0]}); convert to safetensors or allow pickle")
    layers, kept = [], {}
    for name, path in files.items():
        media = describe.media_type_of(name, adapter=adapter)
        if media is None or media == mt.CODE or (describe.is_pickle(name) and not allow_pickle):
            continue
        if adapter and media != mt.ADAPTER:
            continue
        layers.append(registry.add_layer_file(media, path, name))
        kept[name] = path
    return layers, kept


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
) -> Entry:
    target = ModelName.parse(name)
    src = modelfile.from_
    base_name: str | None = None
    if _is_path(src) or (allow_paths and not is_valid(src) and (base_dir or Path.cwd()).joinpath(src).is_dir()):
        status(f"importing {src}")
        layers, files = import_dir(registry, _resolve_path(src, base_dir, allow_paths))
        config = describe.describe(files, source="local")
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
        if base.manifest.is_adapter and modelfile.adapters:
            raise ModelfileError("FROM names an adapter; an adapter cannot take more ADAPTERs")

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
    if base_name and modelfile.adapters and not config.base:
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
