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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = registry.get(name)
    manifest = entry.manifest
    config = manifest.config
    if config.embedding:
        raise InvalidRequest(f"{entry.name.short} is an embedding model, not a generator")
    weights_manifest = manifest
    if manifest.is_adapter:
        if not config.base:
            raise InvalidRequest(f"adapter {entry.name.short} does not name its base model")
        try:
            weights_manifest = registry.get(config.base).manifest
        except NotFound:
            raise NotFound(f"base model '{config.base}' of adapter '{entry.name.short}' is not in the registry") from None
    if (config.trust_remote_code or weights_manifest.config.trust_remote_code) and not trust_remote_code:
        raise Refused(f"{entry.name.short} needs remote code: serve it with --trust-remote-code")
    if weights_manifest.config.format == "pickle" and not any(l.filename and l.filename.endswith(".safetensors") for l in weights_manifest.layers):
        raise Refused(f"{entry.name.short} has pickle weights only; codellm loads safetensors")
    files_key = f"{entry.id}-weights" if manifest is weights_manifest else f"{entry.id}-base"
    model_dir = registry.files_dir(weights_manifest, mt.FILE_LAYERS - {mt.ADAPTER}, key=files_key)
    # the tokenizer (and template) of the served model itself win over its base's
    tok_dir = registry.files_dir(manifest, frozenset({mt.TOKENIZER}), key=f"{entry.id}-tok") if manifest.layers_of(mt.TOKENIZER) else model_dir
    dev, torch_dtype = pick_device(device, dtype)
    attn = kvcache.register()
    kwargs = dict(dtype=torch_dtype, attn_implementation=attn, use_safetensors=True, trust_remote_code=trust_remote_code)
    if quantize:
        if quantize != "nf4":
            raise InvalidRequest(f"unknown quantization {quantize!r} (supported: nf4)")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype if torch_dtype != torch.float32 else torch.bfloat16,
        )
        kwargs["device_map"] = {"": dev}
    log.info("loading %s from %s (%s, %s)", entry.name.short, model_dir, dev, torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if not quantize:
        model.to(dev)
    adapter_layers = manifest.layers_of(mt.ADAPTER)
    if adapter_layers:
        from peft import PeftModel

        adapter_dir = registry.files_dir(manifest, frozenset({mt.ADAPTER}), key=f"{entry.id}-adapter")
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code)
    template = chat_template_of(registry, manifest)
    if template:
        tokenizer.chat_template = template
    params = {**registry.params(weights_manifest), **registry.params(manifest)} if manifest is not weights_manifest else registry.params(manifest)
    context = config.context_length or weights_manifest.config.context_length or DEFAULT_NUM_CTX
    max_len = min(int(num_ctx or params.get("num_ctx") or DEFAULT_NUM_CTX), context)
    fim = config.fim or weights_manifest.config.fim
    return LoadedModel(
        name=str(entry.name), manifest=manifest, model=model, tokenizer=tokenizer, device=dev, dtype=torch_dtype,
        max_len=max_len, defaults=params, system=registry.text(manifest, mt.SYSTEM),
        messages=registry.messages(manifest), fim=fim, eos_ids=_eos_ids(registry, weights_manifest, tokenizer, fim),
        quantization=quantize,
    )
