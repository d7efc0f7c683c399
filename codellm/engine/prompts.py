"""Prompts: chat messages through the model's chat template, raw completions, and FIM.

Special-token text inside a prompt (``<|fim_prefix|>``...) tokenizes to the special ids, which is
what editors that build their own FIM prompts rely on.
"""

from __future__ import annotations

import json

from codellm.errors import InvalidRequest
from codellm.engine import templates
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
        text = templates.render_chat(tok, chat_messages(lm, messages, tools), tools=tools or None,
                                     add_generation_prompt=add_generation_prompt)
    except InvalidRequest:
        raise
    except Exception as exc:  # jinja raises from inside templates (raise_exception), and so do bad messages
        raise InvalidRequest(f"the chat template rejected these messages: {exc}", param="messages") from None
    return encode(lm, text, add_special_tokens=False)


INLINE_CHARS = 16_000  # prompts shorter than this are rendered and tokenized on the event loop
INLINE_SECONDS = 0.05  # ... if their template renders within this; else again in a worker thread


async def render_off_loop(size: int, fn, *args, **kwargs):
    """``fn(*args)`` (a prompt to render and tokenize) on the event loop for a short input, in a worker thread for
    a long one. A short prompt takes well under a millisecond, while a thread hop under load waits for the GIL (up
    to the 5 ms switch interval each way) and held a burst of 64 requests behind one another. A template that
    is slow to render holds the loop for at most ``INLINE_SECONDS``, and then gets its full time in a thread."""
    import asyncio

    if size <= INLINE_CHARS:
        token = templates.time_limit.set(INLINE_SECONDS)
        try:
            return fn(*args, **kwargs)
        except templates.TooSlow:
            pass
        finally:
            templates.time_limit.reset(token)
    return await asyncio.to_thread(fn, *args, **kwargs)


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


def go_template(template: str, *, system: str = "", prompt: str = "", suffix: str = "") -> str:
    """An Ollama (Go) prompt template's common subset, rendered: see ``templates.go_template``."""
    return templates.go_template(template, system=system, prompt=prompt, suffix=suffix, response="")
