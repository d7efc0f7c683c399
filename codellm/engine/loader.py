"""Load a registry model into memory: transformers weights from safetensors, tokenizer, defaults.

bf16 on GPUs that support it (fp16 otherwise), fp32 on CPU unless asked; ``quantize="nf4"`` loads
through bitsandbytes; PEFT adapters stay unmerged on top of their base.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch

from codellm.errors import InvalidRequest, NotFound, Refused
from codellm.registry import Registry
from codellm.registry import manifest as mt
from codellm.registry.info import chat_template_of
from codellm.engine import kvcache

log = logging.getLogger("codellm.engine")
DEFAULT_NUM_CTX = 4096
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    name: str
    manifest: mt.Manifest
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    max_len: int
    defaults: dict = field(default_factory=dict)
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    fim: mt.FimTokens | None = None
    eos_ids: set[int] = field(default_factory=set)
    quantization: str | None = None
    adapter: str | None = None  # the PEFT adapter (on ``model``) this model's requests run with

    @property
    def config(self) -> mt.ModelConfig:
        return self.manifest.config


def pick_device(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype:
        if dtype not in _DTYPES:
            raise InvalidRequest(f"unknown dtype {dtype!r} (use bf16, fp16 or fp32)")
        return dev, _DTYPES[dtype]
    if dev.type == "cuda":
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, torch.float32


def _eos_ids(registry: Registry, manifest: mt.Manifest, tokenizer, fim: mt.FimTokens | None) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for layer in manifest.layers_of(mt.GENERATION_CONFIG):
        eos = json.loads(registry.read_layer(layer)).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    for text in (fim.stop if fim else ()):
        tid = tokenizer.convert_tokens_to_ids(text)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and text in tokenizer.all_special_tokens + list(tokenizer.added_tokens_encoder):
            ids.add(tid)
    return ids


def resolve(registry: Registry, name):
    """(entry, manifest holding the weights): an adapter-only model's weights are its base's.
    ``name`` is a model name, or its registry entry when the caller has read it already."""
    entry = registry.get(name) if isinstance(name, str) else name
    manifest, config = entry.manifest, entry.manifest.config
    if config.embedding:
        raise InvalidRequest(f"{entry.name.short} is an embedding model, not a generator")
    weights = manifest
    if manifest.is_adapter:
        if not config.base:
            raise InvalidRequest(f"adapter {entry.name.short} does not name its base model")
        try:
            weights = registry.get(config.base).manifest
        except NotFound:
            raise NotFound(f"base model '{config.base}' of adapter '{entry.name.short}' is not in the registry") from None
    return entry, weights


def weights_identity(weights: mt.Manifest, *options) -> str:
    """Models with the same weights (and load options) share one copy in memory and one engine."""
    from codellm.registry.blobs import sha256_bytes

    digests = sorted(layer.digest for layer in weights.layers if layer.media_type in (mt.WEIGHTS, mt.CONFIG))
    return sha256_bytes(repr((digests, options)).encode())[7:23]


def adapter_name(entry) -> str:
    """PEFT keeps adapters in ModuleDicts, whose keys cannot hold '.' or ':': name them by manifest id."""
    return f"a{entry.id}"


def load_weights(registry: Registry, entry, weights: mt.Manifest, *, device=None, dtype=None, quantize=None,
                 trust_remote_code=False, shard: tuple[int, int] | None = None):
    """The model's weights on ``device``; with ``shard`` (rank, world), only that rank's share of a tensor-parallel
    split (``sharding.load``)."""
    from transformers import AutoModelForCausalLM

    config = entry.manifest.config
    if (config.trust_remote_code or weights.config.trust_remote_code) and not trust_remote_code:
        raise Refused(f"{entry.name.short} needs remote code: serve it with --trust-remote-code")
    if weights.config.format == "pickle" and not any(l.filename and l.filename.endswith(".safetensors") for l in weights.layers):
        raise Refused(f"{entry.name.short} has pickle weights only; codellm loads safetensors")
    registry.check(weights, name=entry.name.short, media_types=mt.FILE_LAYERS - {mt.ADAPTER})
    model_dir = registry.files_dir(weights, mt.FILE_LAYERS - {mt.ADAPTER}, key=f"w{weights_identity(weights)}")
    dev, torch_dtype = pick_device(device, dtype)
    kwargs = dict(dtype=torch_dtype, attn_implementation=kvcache.register(), use_safetensors=True,
                  trust_remote_code=trust_remote_code)
    if shard is not None and shard[1] > 1:
        from codellm.engine import sharding

        if quantize:
            raise Refused(f"{quantize} weights are not split over ranks: serve {entry.name.short} unquantized with "
                          f"--tensor-parallel")
        log.info("loading rank %d of %d's share of %s from %s (%s, %s)", *shard, entry.name.short, model_dir, dev,
                 torch_dtype)
        return sharding.load(model_dir, *shard, device=dev, dtype=torch_dtype, attn_implementation=kwargs["attn_implementation"],
                             trust_remote_code=trust_remote_code), dev, torch_dtype
    if quantize:
        if quantize != "nf4":
            raise InvalidRequest(f"unknown quantization {quantize!r} (supported: nf4)")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype if torch_dtype != torch.float32 else torch.bfloat16,
        )
        kwargs["device_map"] = {"": dev}
    log.info("loading weights of %s from %s (%s, %s)", entry.name.short, model_dir, dev, torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if not quantize:
        model.to(dev)
    return model.eval(), dev, torch_dtype


def attach_adapter(registry: Registry, model, entry):
    """Put the adapter of ``entry`` on ``model`` (unmerged), next to any adapters already there."""
    from peft import PeftModel

    name = adapter_name(entry)
    registry.check(entry.manifest, name=entry.name.short, media_types=frozenset({mt.ADAPTER}))
    adapter_dir = registry.files_dir(entry.manifest, frozenset({mt.ADAPTER}), key=f"{entry.id}-adapter")
    if isinstance(model, PeftModel):
        if name not in model.peft_config:
            model.load_adapter(adapter_dir, adapter_name=name, is_trainable=False)
    else:
        model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=name, is_trainable=False)
    return model.eval(), name


def view(registry: Registry, entry, weights: mt.Manifest, model, dev, torch_dtype, *, num_ctx=None, quantize=None,
         adapter: str | None = None, trust_remote_code: bool = False, max_len_cap: int | None = None) -> LoadedModel:
    """The prompt side of a model (tokenizer, template, defaults, FIM, EOS) around weights in memory."""
    from transformers import AutoTokenizer

    manifest, config = entry.manifest, entry.manifest.config
    tok_source = manifest if manifest.layers_of(mt.TOKENIZER) else weights
    tok_dir = registry.files_dir(tok_source, frozenset({mt.TOKENIZER, mt.CONFIG, mt.GENERATION_CONFIG}),
                                 key=f"t{weights_identity(tok_source)}")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code)
    template = chat_template_of(registry, manifest)
    if template:
        tokenizer.chat_template = template
    params = {**registry.params(weights), **registry.params(manifest)} if manifest is not weights else registry.params(manifest)
    context = config.context_length or weights.config.context_length or DEFAULT_NUM_CTX
    max_len = min(int(num_ctx or params.get("num_ctx") or DEFAULT_NUM_CTX), context)
    if max_len_cap:
        max_len = min(max_len, max_len_cap)
    fim = config.fim or weights.config.fim
    return LoadedModel(
        name=str(entry.name), manifest=manifest, model=model, tokenizer=tokenizer, device=dev, dtype=torch_dtype,
        max_len=max_len, defaults=params, system=registry.text(manifest, mt.SYSTEM),
        messages=registry.messages(manifest), fim=fim, eos_ids=_eos_ids(registry, weights, tokenizer, fim),
        quantization=quantize, adapter=adapter,
    )


def load(
    registry: Registry,
    name: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    num_ctx: int | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load one model on its own (its weights, its adapter if any, its prompt side)."""
    entry, weights = resolve(registry, name)
    model, dev, torch_dtype = load_weights(registry, entry, weights, device=device, dtype=dtype, quantize=quantize,
                                           trust_remote_code=trust_remote_code)
    adapter = None
    if entry.manifest.layers_of(mt.ADAPTER):
        model, adapter = attach_adapter(registry, model, entry)
    return view(registry, entry, weights, model, dev, torch_dtype, num_ctx=num_ctx, quantize=quantize, adapter=adapter,
                trust_remote_code=trust_remote_code)


def load_draft(registry: Registry, speculative, target: LoadedModel, *, trust_remote_code: bool = False,
               **_) -> LoadedModel | None:
    """The draft model of ``target``'s speculative decoding (``speculative.draft``), on the target's device and in
    its dtype, for as long a context as the target's; None unless the speculation is by a draft model."""
    if speculative is None or speculative.method != "draft":
        return None
    if not speculative.draft:
        raise InvalidRequest("draft-model speculation needs a draft model (--draft MODEL)", param="draft")
    try:
        return load(registry, speculative.draft, device=str(target.device), dtype=str(target.dtype).removeprefix("torch."),
                    num_ctx=target.max_len, trust_remote_code=trust_remote_code)
    except NotFound:
        raise NotFound(f"draft model '{speculative.draft}' of {target.name} is not in the registry "
                       f"(codellm pull {speculative.draft})") from None
