"""Modelfiles with Ollama's syntax: FROM, PARAMETER, TEMPLATE, SYSTEM, MESSAGE, ADAPTER, LICENSE.

Values are a bare rest-of-line, a "quoted string" or a \"\"\"triple-quoted\"\"\" block over many lines.
TEMPLATE is a Jinja chat template (the transformers convention), not a Go template.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from codellm.errors import ModelfileError

PARAMETER_TYPES: dict[str, type] = {
    "num_ctx": int, "num_predict": int, "num_keep": int, "num_batch": int, "num_gpu": int, "num_thread": int,
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "typical_p": float,
    "repeat_penalty": float, "repeat_last_n": int, "presence_penalty": float, "frequency_penalty": float,
    "seed": int, "stop": str, "mirostat": int, "mirostat_eta": float, "mirostat_tau": float,
    "penalize_newline": bool, "use_mmap": bool,
    "draft": str,  # the draft model of its speculative decoding: a smaller model of the same vocabulary
}
ROLES = ("system", "user", "assistant", "tool")
INSTRUCTIONS = ("from", "parameter", "template", "system", "message", "adapter", "license")


class Message(msgspec.Struct):
    role: str
    content: str


class Modelfile(msgspec.Struct):
    from_: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    messages: list[Message] = msgspec.field(default_factory=list)
    adapters: list[str] = msgspec.field(default_factory=list)
    licenses: list[str] = msgspec.field(default_factory=list)


def coerce_parameter(key: str, raw: Any, *, where: str = "") -> Any:
    kind = PARAMETER_TYPES.get(key)
    if kind is None:
        raise ModelfileError(f"{where}unknown parameter {key!r} (known: {', '.join(sorted(PARAMETER_TYPES))})")
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).lower()
            if text not in ("true", "false"):
                raise ValueError
            return text == "true"
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError
        return kind(raw) if kind is not int else int(float(raw)) if isinstance(raw, str) and "." in raw else int(raw)
    except (TypeError, ValueError):
        raise ModelfileError(f"{where}parameter {key} needs a {kind.__name__}, got {raw!r}") from None


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value[1:-1]
    return value


def parse(text: str) -> Modelfile:
    mf = Modelfile()
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        lineno, line = i + 1, lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if "\t" in word:
            word, _, more = word.partition("\t")
            rest = more + " " + rest
        instruction, rest = word.lower(), rest.strip()
        where = f"line {lineno}: "
        if instruction not in INSTRUCTIONS:
            raise ModelfileError(f"{where}unknown instruction {word!r} (expected one of {', '.join(i.upper() for i in INSTRUCTIONS)})")
        # instruction arguments: PARAMETER and MESSAGE take a first word
        head = ""
        if instruction in ("parameter", "message"):
            head, _, rest = rest.partition(" ")
            rest = rest.strip()
            if not head:
                raise ModelfileError(f"{where}{instruction.upper()} needs a name and a value")
        if rest.startswith('"""'):
            body = rest[3:]
            if '"""' in body:
                value, _, trailing = body.partition('"""')
            else:
                chunks = [body]
                while True:
                    if i >= len(lines):
                        raise ModelfileError(f"{where}unterminated \"\"\" block")
                    nxt = lines[i]
                    i += 1
                    if '"""' in nxt:
                        before, _, trailing = nxt.partition('"""')
                        chunks.append(before)
                        break
                    chunks.append(nxt)
                value = "\n".join(chunks)
                if value.startswith("\n"):
                    value = value[1:]
            if trailing.strip():
                raise ModelfileError(f"{where}unexpected text after closing \"\"\"")
        else:
            value = _unquote(rest)
        if not value and instruction not in ("system", "template"):
            raise ModelfileError(f"{where}{instruction.upper()} needs a value")
        if instruction == "from":
            if mf.from_:
                raise ModelfileError(f"{where}FROM given twice")
            mf.from_ = value
        elif instruction == "parameter":
            key = head.lower()
            coerced = coerce_parameter(key, value, where=where)
            if key == "stop":
                mf.parameters.setdefault("stop", []).append(coerced)
            else:
                mf.parameters[key] = coerced
        elif instruction == "template":
            mf.template = value
        elif instruction == "system":
            mf.system = value
        elif instruction == "message":
            role = head.lower()
            if role not in ROLES:
                raise ModelfileError(f"{where}MESSAGE role must be one of {', '.join(ROLES)}, got {head!r}")
            mf.messages.append(Message(role, value))
        elif instruction == "adapter":
            mf.adapters.append(value)
        elif instruction == "license":
            mf.licenses.append(value)
    if not mf.from_:
        raise ModelfileError("no FROM line: a Modelfile starts from a model (FROM qwen2.5-coder:1.5b)")
    return mf


def _quote(value: str) -> str:
    if "\n" in value or '"' in value and '"""' not in value:
        if '"""' in value:
            return json.dumps(value)
        return '"""' + value + '"""'
    return json.dumps(value) if value != value.strip() or not value else value


def format(mf: Modelfile) -> str:
    out = [f"FROM {mf.from_}"]
    if mf.template is not None:
        out.append(f"TEMPLATE {_quote(mf.template)}")
    if mf.system is not None:
        out.append(f"SYSTEM {_quote(mf.system)}")
    for key, value in mf.parameters.items():
        for item in value if isinstance(value, list) else [value]:
            text = json.dumps(item) if key == "stop" else (str(item).lower() if isinstance(item, bool) else str(item))
            out.append(f"PARAMETER {key} {text}")
    for adapter in mf.adapters:
        out.append(f"ADAPTER {adapter}")
    for msg in mf.messages:
        out.append(f"MESSAGE {msg.role} {_quote(msg.content)}")
    for lic in mf.licenses:
        out.append(f"LICENSE {_quote(lic)}")
    return "\n".join(out) + "\n"
