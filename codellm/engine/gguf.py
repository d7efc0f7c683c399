"""A registry model as one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile beside it.

The weights go through llama.cpp's own converter (``registry.llamacpp``), so the file is what llama.cpp itself
would write. It is then read back with transformers' GGUF loader and its logits compared with the original
model's on a probe batch: an export that does not compute what the model computes is refused.

Ollama wants its prompt template in Go, not Jinja. The Modelfile's TEMPLATE is Ollama's System/Prompt/Response
form, derived from the model's own chat template by rendering probe conversations through it, and kept only when
it renders every probe exactly as the Jinja template does (else Ollama falls back to the chat template inside
the GGUF, which it matches against the templates it knows).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from codellm.errors import CodellmError, InvalidRequest
from codellm.registry import manifest as mt
from codellm.registry.export import export_hf, staged
from codellm.registry.llamacpp import convert, converter
from codellm.registry.store import Registry

OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0")
_S, _P, _R = "SYSTEM·7f3a", "PROMPT·91c2", "RESPONSE·4d8e"  # probe texts no template produces on its own
_P2, _R2 = "PROMPT·e05b", "RESPONSE·a6f1"
PROBES = ["def fibonacci(n):\n    if n < 2:\n        return n\n", "import json\n\nwith open('data.json') as f:\n",
          "class Stack:\n    def __init__(self):\n        self.items = []\n", "SELECT name, count(*) FROM users"]


@dataclass
class GGUFExport:
    directory: Path
    gguf: Path
    modelfile: Path
    template: str | None  # the Go TEMPLATE written, or None where none reproduced the chat template
    check: dict = field(default_factory=dict)  # logits of the GGUF against the original's


# -- the prompt template in Go ----------------------------------------------------------------------------------
def ollama_template(tokenizer) -> tuple[str | None, str | None]:
    """(template, default system prompt): Ollama's ``{{ .System }} {{ .Prompt }} {{ .Response }}`` template that
    renders what ``tokenizer``'s chat template renders for a system prompt, a user turn and an answer, and for a
    conversation as Ollama strings turns together, with the system prompt that template adds by itself (for the
    Modelfile's SYSTEM). (None, None) when no such template reproduces the probes: a chat template that puts the
    system prompt inside a user turn, or a header in every prompt, does more than lay turns out."""
    from codellm.engine.templates import go_template, render_chat

    if not getattr(tokenizer, "chat_template", None):
        return None, None
    bos = tokenizer.bos_token or ""
    ends = [t for t in (tokenizer.eos_token, *tokenizer.all_special_tokens) if t]

    def jinja(messages, generation: bool) -> str:
        text = render_chat(tokenizer, messages, add_generation_prompt=generation)
        return text[len(bos):] if bos and text.startswith(bos) else text  # llama.cpp adds BOS as a token

    sys_msg, user, answer = ({"role": "system", "content": _S}, {"role": "user", "content": _P},
                             {"role": "assistant", "content": _R})
    try:
        a = jinja([sys_msg, user], True)
        b = jinja([user], True)
        c = jinja([sys_msg, user, answer], False)
        turns = jinja([sys_msg, user, answer, {"role": "user", "content": _P2}], True)
    except Exception:  # noqa: BLE001 (a template that refuses these conversations has no such translation)
        return None, None
    if a.count(_S) != 1 or a.count(_P) != 1 or b.count(_P) != 1 or turns.count(_P2) != 1:
        return None, None
    before_a, after_prompt = a.split(_P)
    sys_open, between = before_a.split(_S)  # between: the end of the system turn and the opening of the user's
    shared = between[:len(_common_prefix(between, after_prompt))]  # both end a turn the same way
    cut = max((shared.find(end) + len(end) for end in ends if end in shared), default=0)
    cut += len(shared[cut:]) - len(shared[cut:].lstrip("\n"))
    sys_close, user_open = between[:cut], between[cut:]
    before_b = b.split(_P)[0]
    default = None
    if before_b != user_open:
        if not (before_b.startswith(sys_open) and before_b.endswith(between)) or len(before_b) <= len(sys_open + between):
            return None, None
        default = before_b[len(sys_open):len(before_b) - len(between)]
    eot = turns.split(_R, 1)[-1].split(_P2)[0]
    if not eot.endswith(user_open):
        return None, None
    eot = eot[:len(eot) - len(user_open)]
    pieces = (sys_open, sys_close, user_open, after_prompt, eot)
    if any("{{" in p or "}}" in p or '"""' in p for p in pieces):
        return None, None  # text Go would read as actions, or that a Modelfile cannot quote
    template = (f"{{{{ if .System }}}}{sys_open}{{{{ .System }}}}{sys_close}{{{{ end }}}}"
                f"{{{{ if .Prompt }}}}{user_open}{{{{ .Prompt }}}}{{{{ end }}}}{after_prompt}"
                f"{{{{ .Response }}}}{{{{ if .Response }}}}{eot}{{{{ end }}}}")

    def go(system: str, prompt: str, response: str = "") -> str:
        return go_template(template, system=system, prompt=prompt, response=response)

    # a turn as Ollama renders it (the last one up to its answer), then a conversation as turns strung together
    agrees = (go(_S, _P) == a and go(default or "", _P) == b and c.startswith(go(_S, _P, _R))
              and go(_S, _P, _R) + go("", _P2) == turns)
    return (template, default) if agrees else (None, None)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def stop_strings(tokenizer, template: str | None, eos_ids: list[int]) -> list[str]:
    """What ends a turn: the model's end-of-sequence tokens, and the template's end-of-turn text."""
    stops = [tokenizer.convert_ids_to_tokens(i) for i in eos_ids if i is not None]
    if template:
        tail = template.rsplit("{{ if .Response }}", 1)[1].removesuffix("{{ end }}").strip()  # the end of a turn
        if tail and tail not in stops:
            stops.append(tail)
    return [s for s in dict.fromkeys(stops) if s and '"' not in s]


def modelfile_text(gguf_name: str, template: str | None, stops: list[str], params: dict, system: str | None,
                   license_: str | None) -> str:
    lines = ["# Written by `codellm export --format gguf`. Make it an Ollama model with:",
             "#   ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    for stop in stops:
        lines.append(f'PARAMETER stop "{stop}"')
    for key, value in params.items():
        if key in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "num_ctx", "num_predict", "seed",
                   "repeat_last_n", "presence_penalty", "frequency_penalty"):
            lines.append(f"PARAMETER {key} {json.dumps(value) if isinstance(value, str) else value}")
    if system and '"""' not in system:
        lines.append(f'SYSTEM """{system}"""')
    if license_ and '"""' not in license_:
        lines.append(f'LICENSE """{license_}"""')
    return "\n".join(lines) + "\n"


# -- reading it back ----------------------------------------------------------------------------------------------
def compare_logits(hf_dir: Path, gguf: Path) -> dict:
    """The GGUF read back by transformers beside the original: the largest logit difference (relative to the
    largest logit) and how often both pick the same next token, over the probe batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    original = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    try:
        read = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise CodellmError(f"transformers cannot read this GGUF back to check it ({exc}); export with --no-check "
                           "to skip the check") from None
    worst, same, total = 0.0, 0, 0
    with torch.no_grad():
        for text in PROBES:
            ids = torch.tensor([tok(text, add_special_tokens=True)["input_ids"]])
            a, b = original(ids).logits[0], read(ids).logits[0]
            worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp(min=1e-6)))
            same += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
    return {"max_relative_difference": worst, "top1_agreement": same / total, "positions": total}


def _acceptable(check: dict, outtype: str) -> bool:
    if outtype == "f32":
        return check["max_relative_difference"] < 1e-4 and check["top1_agreement"] == 1.0
    if outtype in ("f16", "bf16", "auto"):
        return check["max_relative_difference"] < 0.05 and check["top1_agreement"] >= 0.95
    return check["top1_agreement"] >= 0.85  # 8-bit


# -- the export ---------------------------------------------------------------------------------------------------
def export_gguf(registry: Registry, name: str, directory: str | Path, *, outtype: str = "auto",
                llama_cpp: str | os.PathLike | None = None, check: bool = True,
                status: Callable[[str], None] = lambda s: None) -> GGUFExport:
    """Write ``directory``/{model.gguf, Modelfile} for model ``name`` (merged first where it is an adapter); the
    directory appears whole or not at all."""
    from transformers import AutoTokenizer

    if outtype not in OUTTYPES:
        raise InvalidRequest(f"unknown GGUF type {outtype!r}: one of {', '.join(OUTTYPES)}")
    target = Path(directory).resolve()
    entry = registry.get(name)
    if entry.manifest.layers_of(mt.ADAPTER):
        raise InvalidRequest(f"{entry.name.short} is an adapter: a GGUF holds one model, so merge it first (--merge)")
    tool = converter(registry.home, llama_cpp, status=status)
    with staged(target) as tmp:
        hf = export_hf(registry, name, tmp / "hf", status=status)
        gguf = convert(tool, hf, tmp / "model.gguf", outtype, status=status)
        result = GGUFExport(target, target / "model.gguf", target / "Modelfile", None)
        if check:
            status("reading the GGUF back to compare its logits with the model's")
            result.check = compare_logits(hf, gguf)
            if not _acceptable(result.check, outtype):
                raise CodellmError(f"the GGUF does not compute what the model computes: {result.check}")
        tokenizer = AutoTokenizer.from_pretrained(hf)
        result.template, default_system = ollama_template(tokenizer)
        gen = json.loads((hf / "generation_config.json").read_text()) if (hf / "generation_config.json").is_file() else {}
        eos = gen.get("eos_token_id", tokenizer.eos_token_id)
        eos = eos if isinstance(eos, list) else [eos]
        params = registry.params(entry.manifest)
        (tmp / "Modelfile").write_text(modelfile_text(
            "model.gguf", result.template, stop_strings(tokenizer, result.template, eos), params,
            registry.text(entry.manifest, mt.SYSTEM) or default_system, registry.text(entry.manifest, mt.LICENSE)))
        shutil.rmtree(hf)
    return result
