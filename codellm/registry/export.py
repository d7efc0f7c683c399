"""A registry model as a plain Hugging Face directory, for the engines that serve at cluster scale (vLLM, SGLang,
TGI load it as it is) and for anything else that reads the hub's layout.

The weights, config, tokenizer and license are copied from the content-addressed blobs, each checked against its
digest first. What the registry holds beyond the hub's files goes where those engines look for it: a Modelfile
TEMPLATE becomes ``chat_template.jinja`` (and the tokenizer config's ``chat_template``), and sampling PARAMETERs
become ``generation_config.json`` defaults (vLLM's ``--generation-config auto``). An adapter stays an adapter, in
``adapter/`` beside its base (vLLM's ``--lora-modules NAME=DIR/adapter``); merge it first to hand over one model.
The directory appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from codellm.errors import InvalidRequest
from codellm.registry import manifest as mt
from codellm.registry.info import chat_template_of
from codellm.registry.store import Registry

MODEL_LAYERS = frozenset({mt.WEIGHTS, mt.CONFIG, mt.GENERATION_CONFIG, mt.TOKENIZER, mt.LICENSE, mt.README})
# Modelfile PARAMETER -> generation_config.json field
GENERATION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                     "repeat_penalty": "repetition_penalty"}


def _copy_layers(registry: Registry, manifest: mt.Manifest, media_types: frozenset[str], target: Path,
                 status: Callable[[str], None]) -> None:
    for layer in manifest.layers:
        if layer.media_type not in media_types or not layer.filename:
            continue
        name = Path(layer.filename).name  # stored names are plain; never a path from the manifest
        if name in ("", ".", ".."):
            raise InvalidRequest(f"a layer has an unusable file name {layer.filename!r}")
        status(f"copying {name} ({layer.size:,} bytes)")
        shutil.copyfile(registry.blobs.path(layer.digest), target / name)


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


@contextmanager
def staged(directory: str | Path) -> Iterator[Path]:
    """A temporary directory beside ``directory`` (which must not exist, or be empty) to write an export into: it
    becomes ``directory`` when the block ends, and is removed if the block fails."""
    target = Path(directory).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InvalidRequest(f"{target} exists and is not empty: export into a new directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_hf(registry: Registry, name: str, directory: str | Path, *,
              status: Callable[[str], None] = lambda s: None) -> Path:
    """Write model ``name`` to ``directory`` (which must not exist, or be empty) and return it."""
    target = Path(directory).resolve()
    entry = registry.get(name)
    manifest = entry.manifest
    if manifest.config.task in ("embed", "rerank"):
        weights = manifest
    else:
        weights = registry.get(manifest.config.base).manifest if manifest.is_adapter else manifest
    adapter = bool(manifest.layers_of(mt.ADAPTER))  # (a model made FROM a base with an ADAPTER holds both)
    registry.check(weights, name=entry.name.short, media_types=MODEL_LAYERS)
    if adapter:
        registry.check(manifest, name=entry.name.short, media_types=frozenset({mt.ADAPTER}))
    with staged(target) as tmp:
        _copy_layers(registry, weights, MODEL_LAYERS, tmp, status)
        if manifest is not weights and manifest.layers_of(mt.TOKENIZER):  # its own tokenizer files over its base's
            _copy_layers(registry, manifest, frozenset({mt.TOKENIZER}), tmp, status)
        template = chat_template_of(registry, manifest)
        if template:
            (tmp / "chat_template.jinja").write_text(template)
            tok_cfg = tmp / "tokenizer_config.json"
            if tok_cfg.is_file():
                cfg = _json(tok_cfg)
                cfg["chat_template"] = template
                tok_cfg.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
        params = {**(registry.params(weights) if manifest is not weights else {}), **registry.params(manifest)}
        defaults = {GENERATION_FIELDS[k]: v for k, v in params.items() if k in GENERATION_FIELDS}
        if defaults:
            gen = tmp / "generation_config.json"
            gen.write_text(json.dumps({**_json(gen), **defaults}, indent=2))
        if adapter:
            (tmp / "adapter").mkdir()
            _copy_layers(registry, manifest, frozenset({mt.ADAPTER}), tmp / "adapter", status)
    return target
