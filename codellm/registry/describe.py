"""Derive a manifest's config record and layer kinds from a model's files, without loading it."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from codellm.errors import InvalidRequest
from codellm.registry import catalog
from codellm.registry import manifest as mt

TOKENIZER_FILES = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "vocab.txt",
}
_WEIGHTS = re.compile(r".+\.safetensors|model\.safetensors\.index\.json")
_PICKLE = re.compile(r".+\.(bin|pt|pth|ckpt)|pytorch_model\.bin\.index\.json")
_LICENSE = re.compile(r"(LICENSE|LICENCE|COPYING|NOTICE)(\.[a-z]+)?", re.I)
_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8"}


def is_pickle(filename: str) -> bool:
    return bool(_PICKLE.fullmatch(filename))


def media_type_of(filename: str, *, adapter: bool = False) -> str | None:
    """Which layer a top-level file of a model (or adapter) directory becomes; None = not needed."""
    if adapter and (filename.startswith("adapter_") or filename in {"adapter_config.json"}):
        return mt.ADAPTER
    if filename == "config.json":
        return mt.CONFIG
    if filename == "generation_config.json":
        return mt.GENERATION_CONFIG
    if filename in TOKENIZER_FILES:
        return mt.TOKENIZER
    if _WEIGHTS.fullmatch(filename) or is_pickle(filename):
        return mt.WEIGHTS
    if _LICENSE.fullmatch(filename):
        return mt.LICENSE
    if filename.lower() == "readme.md":
        return mt.README
    if filename.endswith(".py"):
        return mt.CODE
    return None


def safetensors_header(path: Path, name: str | None = None) -> dict:
    """The JSON header of a safetensors file, checked: a damaged one is an error naming the file."""
    name = name or path.name
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InvalidRequest(f"{name}: not a safetensors file ({size} bytes, shorter than its header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(100_000_000, size - 8):
            raise InvalidRequest(f"{name}: damaged safetensors header (declares {length:,} bytes of {size:,})")
        try:
            header = json.loads(fh.read(length))
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest(f"{name}: damaged safetensors header (not JSON)") from None
    ok = isinstance(header, dict) and all(
        key == "__metadata__" or (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                                  and isinstance(info.get("shape"), list)
                                  and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"]))
        for key, info in header.items())
    if not ok:
        raise InvalidRequest(f"{name}: damaged safetensors header (tensors need a dtype and a shape)")
    return header


def _json_file(name: str, raw: bytes | None) -> dict:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        line = getattr(exc, "lineno", None)
        raise InvalidRequest(f"{name} is not valid JSON" + (f" (line {line})" if line else "")) from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"{name} must hold a JSON object")
    return data


def count_parameters(files: dict[str, Path]) -> tuple[int | None, str | None, str | None]:
    """Parameter count, dominant dtype and quantization read from safetensors headers alone."""
    total, by_dtype, quant = 0, {}, None
    shards = [p for name, p in files.items() if name.endswith(".safetensors")]
    if not shards:
        return None, None, None
    for name, path in ((n, p) for n, p in files.items() if n.endswith(".safetensors")):
        for key, info in safetensors_header(path, name).items():
            if key == "__metadata__":
                continue
            n = 1
            for dim in info["shape"]:
                n *= dim
            if info["dtype"] == "U8" and (".absmax" in key or "quant" in key):
                quant = "nf4"
            if info["dtype"] == "U8" and quant == "nf4":
                n *= 2
            total += n
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + n
    dtype = max(by_dtype, key=by_dtype.get) if by_dtype else None
    return total, _DTYPE.get(dtype, dtype), quant


def describe(files: dict[str, Path], *, source: str, revision: str | None = None) -> mt.ModelConfig:
    """The config record for a model (or adapter) whose files are ``{filename: path}``."""
    def read(name: str) -> bytes | None:
        path = files.get(name)
        return path.read_bytes() if path else None

    cfg = _json_file("config.json", read("config.json"))
    if "text_config" in cfg and "max_position_embeddings" not in cfg:
        cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k != "text_config"}}
    tok_cfg_raw = read("tokenizer_config.json")
    tok_cfg = _json_file("tokenizer_config.json", tok_cfg_raw)
    specials = catalog.special_tokens_of(read("tokenizer.json"), tok_cfg_raw)
    model_type = cfg.get("model_type")
    family = catalog.family_of(source, model_type, specials)
    fim = catalog.FIM.get(family) if family else None
    if fim is not None and fim.prefix.strip() not in specials and family != "codellama":
        fim = None  # e.g. an instruct build whose tokenizer lacks the FIM tokens
    params, dtype, quant = count_parameters(files)
    archs = cfg.get("architectures") or [None]
    quant = quant or (cfg.get("quantization_config") or {}).get("quant_method")
    context = None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(cfg.get(key), int):
            context = cfg[key]
            break
    arch = archs[0] or ""
    if arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) or not arch:
        task = "generate"
    elif arch.endswith("ForSequenceClassification"):
        task = "rerank"
    else:
        task = "embed"
    return mt.ModelConfig(
        architecture=archs[0],
        model_type=model_type,
        family=family,
        parameters=params,
        dtype=cfg.get("torch_dtype") or cfg.get("dtype") or dtype,
        context_length=context,
        chat_template=bool(tok_cfg.get("chat_template")) or "chat_template.jinja" in files or "chat_template.json" in files,
        fim=fim,
        quantization=quant,
        embedding=task == "embed",
        task=task,
        source=source,
        revision=revision,
        format="safetensors" if any(n.endswith(".safetensors") for n in files) else ("pickle" if any(is_pickle(n) for n in files) else "none"),
        trust_remote_code=False,
    )


def needs_remote_code(config_json: bytes | None, tokenizer_config_json: bytes | None = None) -> bool:
    for raw in (config_json, tokenizer_config_json):
        if raw:
            try:
                if json.loads(raw).get("auto_map"):
                    return True
            except ValueError:
                pass
    return False
