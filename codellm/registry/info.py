"""What a model is, in the words `show` and /api/show use: capabilities, parameters, texts."""

from __future__ import annotations

import json
from dataclasses import dataclass

from codellm.registry import manifest as mt
from codellm.registry.store import Entry, Registry


@dataclass
class ModelInfo:
    entry: Entry
    config: mt.ModelConfig
    parameters: dict
    template: str | None
    system: str | None
    license: str | None
    licenses: list[str]
    capabilities: list[str]
    training: dict | None = None  # an adapter's training record: settings, final metrics, evaluations

    @property
    def parameters_text(self) -> str:
        lines = []
        for key, value in self.parameters.items():
            for item in value if isinstance(value, list) else [value]:
                lines.append(f"{key:<16}{json.dumps(item) if isinstance(item, str) else item}")
        return "".join(line + "\n" for line in lines)


def parameter_size(n: int | None) -> str:
    """A parameter count as Ollama prints it: 1.5B, 494.0M, 105.5K."""
    if not n:
        return "unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def chat_template_of(registry: Registry, manifest: mt.Manifest) -> str | None:
    """The Modelfile TEMPLATE, else the tokenizer's own chat template."""
    text = registry.text(manifest, mt.TEMPLATE)
    if text is not None:
        return text
    for layer in manifest.layers_of(mt.TOKENIZER):
        if layer.filename == "chat_template.jinja":
            return registry.read_layer(layer).decode()
        if layer.filename in ("tokenizer_config.json", "chat_template.json"):
            try:
                value = json.loads(registry.read_layer(layer)).get("chat_template")
            except ValueError:
                continue
            if isinstance(value, str):
                return value
            if isinstance(value, list) and value:
                return next((t["template"] for t in value if t.get("name") == "default"), value[0].get("template"))
    return None


def describe_model(registry: Registry, name: str) -> ModelInfo:
    entry = registry.get(name)
    m = entry.manifest
    c = m.config
    caps = []
    if c.task == "rerank":
        caps.append("rerank")
    elif c.embedding or c.task == "embed":
        caps.append("embedding")
    else:
        caps.append("completion")
        if c.fim:
            caps.append("insert")
    licenses = [registry.read_layer(layer).decode(errors="replace") for layer in m.layers_of(mt.LICENSE)]
    record = next((layer for layer in m.layers_of(mt.TRAINING) if layer.filename == "training.json"), None)
    return ModelInfo(
        entry=entry, config=c, parameters=registry.params(m), template=chat_template_of(registry, m),
        system=registry.text(m, mt.SYSTEM), license="\n".join(licenses) or None, licenses=licenses,
        capabilities=caps, training=json.loads(registry.read_layer(record)) if record else None,
    )
