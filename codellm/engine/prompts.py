"""Prompts: chat messages through the model's chat template, raw completions, and FIM.

Special-token text inside a prompt (``<|fim_prefix|>``...) tokenizes to the special ids, which is
what editors that build their own FIM prompts rely on.
"""

from __future__ import annotations

import json

from codellm.errors import InvalidRequest
from codellm.engine.loader import LoadedModel
from codellm.engine.tools import template_renders_tools, tools_system_prompt


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text"):
            parts.append(part.get("text", ""))
        else:
            raise InvalidRequest(f"content part of type {kind!r} is not supported: this model reads text only",
                                 param="messages")
    return "".join(parts)


def _template_message(m: dict) -> dict:
    """Chat templates want tool-call arguments as objects; OpenAI clients send JSON strings."""
    out = {**m, "content": _text_of(m.get("content"))}
    if m.get("tool_calls"):
        calls = []
        for call in m["tool_calls"]:
            fn = dict(call.get("function") or {})
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"] or "{}")
                except ValueError:
                    pass
            calls.append({**call, "type": call.get("type", "function"), "function": fn})
        out["tool_calls"] = calls
    return out


def chat_messages(lm: LoadedModel, messages: list[dict], tools: list | None = None) -> list[dict]:
    """Request messages with the Modelfile SYSTEM and MESSAGEs put in front (and, for templates that
    ignore ``tools``, the tools described in the system message)."""
    msgs = [_template_message(m) for m in messages]
    history = [dict(m) for m in lm.messages]
    if lm.system and not any(m["role"] == "system" for m in msgs):
        history.insert(0, {"role": "system", "content": lm.system})
    if msgs and msgs[0]["role"] == "system":
        history = [msgs[0]] + [m for m in history if m["role"] != "system"]
        msgs = msgs[1:]
    out = history + msgs
    if tools and not template_renders_tools(getattr(lm.tokenizer, "chat_template", None)):
        note = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + note}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def chat_prompt(lm: LoadedModel, messages: list[dict], *, add_generation_prompt: bool = True, tools: list | None = None) -> list[int]:
    if not messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):
        raise InvalidRequest(
            f"model {lm.name} has no chat template: use /v1/completions, or give it a TEMPLATE in a Modelfile",
            param="model",
        )
    try:
        text = tok.apply_chat_template(chat_messages(lm, messages, tools), tokenize=False,
                                       add_generation_prompt=add_generation_prompt, tools=tools or None)
    except Exception as exc:  # jinja raises from inside templates (raise_exception)
        raise InvalidRequest(f"the chat template rejected these messages: {exc}", param="messages") from None
    return encode(lm, text, add_special_tokens=False)


def encode(lm: LoadedModel, text: str, *, add_special_tokens: bool = True) -> list[int]:
    tok = lm.tokenizer
    if add_special_tokens and tok.bos_token and text.startswith(tok.bos_token):
        add_special_tokens = False
    return tok(text, add_special_tokens=add_special_tokens)["input_ids"]


def fim_text(lm: LoadedModel, prefix: str, suffix: str) -> str:
    fim = lm.fim
    if fim is None:
        raise InvalidRequest(f"model {lm.name} has no fill-in-the-middle tokens; `suffix` needs a FIM model "
                             "(qwen2.5-coder, starcoder2, deepseek-coder, codellama, codegemma)", param="suffix")
    if fim.order == "spm":
        return f"{fim.suffix}{suffix}{fim.prefix}{prefix}{fim.middle}"
    return f"{fim.prefix}{prefix}{fim.suffix}{suffix}{fim.middle}"


def completion_prompt(lm: LoadedModel, prompt: str | list[int], suffix: str | None = None) -> list[int]:
    if isinstance(prompt, list):
        vocab = len(lm.tokenizer)
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        return list(prompt)
    if suffix is not None:
        return encode(lm, fim_text(lm, prompt, suffix), add_special_tokens=True)
    return encode(lm, prompt)


_GO_TAG = __import__("re").compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}")
_GO_VARS = {".System": "system", ".Prompt": "prompt", ".Suffix": "suffix", ".Response": "response"}


def go_template(template: str, *, system: str = "", prompt: str = "", suffix: str = "") -> str:
    """Render the common subset of an Ollama (Go) prompt template: {{ .System }}, {{ .Prompt }},
    {{ .Suffix }}, {{ .Response }}, {{ if .X }}...{{ else }}...{{ end }}, and {{- -}} trimming."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def convert(m) -> str:
        left, body, right = m.group(1), m.group(2), m.group(3)
        open_, close = ("{%" + left, right + "%}")
        if body in _GO_VARS:
            return "{{" + left + " " + _GO_VARS[body] + " " + right + "}}"
        if body.startswith("if ") and body[3:].strip() in _GO_VARS:
            return f"{open_} if {_GO_VARS[body[3:].strip()]} {close}"
        if body == "else":
            return f"{open_} else {close}"
        if body == "end":
            return f"{open_} endif {close}"
        raise InvalidRequest(f"unsupported template action {{{{ {body} }}}}: codellm renders .System, .Prompt, "
                             ".Suffix, .Response, if/else/end", param="template")

    try:
        jinja = ImmutableSandboxedEnvironment(keep_trailing_newline=True).from_string(_GO_TAG.sub(convert, template))
    except TemplateSyntaxError as exc:
        raise InvalidRequest(f"invalid template: {exc.message}", param="template") from None
    return jinja.render(system=system, prompt=prompt, suffix=suffix, response="")
