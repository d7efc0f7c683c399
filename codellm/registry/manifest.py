"""Manifests: a model is a list of typed layers (blobs) plus a config record.

The layout follows Ollama/OCI (schemaVersion, mediaType, layers with digest and size) so the
semantics carry over: two tags of one model share every blob, and a merged model shares the
tokenizer blobs of its base.
"""

from __future__ import annotations

import msgspec

PREFIX = "application/vnd.codellm."
MANIFEST = PREFIX + "manifest.v1+json"
WEIGHTS = PREFIX + "weights"  # safetensors shard or shard index (or, when allowed, pickle)
CONFIG = PREFIX + "config"  # config.json of the architecture
GENERATION_CONFIG = PREFIX + "generation-config"
TOKENIZER = PREFIX + "tokenizer"
TEMPLATE = PREFIX + "template"  # a Jinja chat template (Modelfile TEMPLATE)
PARAMS = PREFIX + "params"  # JSON object of default PARAMETERs
SYSTEM = PREFIX + "system"
MESSAGES = PREFIX + "messages"  # JSON list of {role, content}
ADAPTER = PREFIX + "adapter"  # files of a PEFT adapter directory
LICENSE = PREFIX + "license"
README = PREFIX + "readme"
CODE = PREFIX + "code"  # remote code, stored only with --trust-remote-code
TRAINING = PREFIX + "training"  # training config and metrics of an adapter

# Layers whose files make up the loadable model directory (and keep their file names).
FILE_LAYERS = frozenset({WEIGHTS, CONFIG, GENERATION_CONFIG, TOKENIZER, ADAPTER, LICENSE, README, CODE})
# Layers of which a model has at most one: a Modelfile instruction replaces them.
SINGLE_LAYERS = frozenset({TEMPLATE, PARAMS, SYSTEM, MESSAGES})


class Layer(msgspec.Struct, frozen=True, omit_defaults=True):
    media_type: str = msgspec.field(name="mediaType")
    digest: str
    size: int
    filename: str | None = None


class FimTokens(msgspec.Struct, frozen=True, omit_defaults=True):
    """How a family spells fill-in-the-middle; ``order`` is psm (prefix-suffix-middle) or spm."""

    prefix: str
    suffix: str
    middle: str
    order: str = "psm"
    stop: tuple[str, ...] = ()


class ModelConfig(msgspec.Struct, omit_defaults=True):
    format: str = "safetensors"
    architecture: str | None = None
    model_type: str | None = None
    family: str | None = None
    parameters: int | None = None
    dtype: str | None = None
    context_length: int | None = None
    chat_template: bool = False
    fim: FimTokens | None = None
    quantization: str | None = None
    embedding: bool = False
    task: str = "generate"  # generate | embed (an encoder) | rerank (a cross-encoder)
    source: str | None = None  # hub repo id (or "local") it came from
    revision: str | None = None
    base: str | None = None  # for adapters: name of the base model
    base_digest: str | None = None  # ... and the id of its manifest when the adapter was made
    trust_remote_code: bool = False


class Manifest(msgspec.Struct, omit_defaults=True):
    config: ModelConfig
    layers: list[Layer]
    schema_version: int = msgspec.field(default=2, name="schemaVersion")
    media_type: str = msgspec.field(default=MANIFEST, name="mediaType")

    def layers_of(self, media_type: str) -> list[Layer]:
        return [layer for layer in self.layers if layer.media_type == media_type]

    def layer(self, media_type: str) -> Layer | None:
        found = self.layers_of(media_type)
        return found[0] if found else None

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def is_adapter(self) -> bool:
        return bool(self.layers_of(ADAPTER)) and not self.layers_of(WEIGHTS)

    def encode(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=2)

    @staticmethod
    def decode(data: bytes) -> "Manifest":
        return msgspec.json.decode(data, type=Manifest)
