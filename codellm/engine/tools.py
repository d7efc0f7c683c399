"""Tool calling: tools go into the prompt through the model's chat template, and the family's
tool-call syntax is parsed back out of the generated text, incrementally, so streams can send
tool-call deltas as soon as a call is complete.

Formats: Hermes ``<tool_call>{json}</tool_call>`` (Qwen2.5 coders and most fine-tunes), Qwen3-Coder's XML inside
the same markers (``<tool_call><function=name><parameter=p>value</parameter></function></tool_call>``), Llama 3 JSON
(``{"name": ..., "parameters": {...}}``, optionally after ``<|python_tag|>``), Mistral ``[TOOL_CALLS][{...}]``,
and Mistral's newer ``[TOOL_CALLS]name[ARGS]{...}`` (Devstral, Mistral Small 3.2).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def check_tools(tools: list | None, param: str = "tools") -> list | None:
    """Tools as every API sends them, ``{"type": "function", "function": {"name", "description"?, "parameters"?}}``,
    refused with a clear error otherwise (templates and the call parser read these fields without checking)."""
    from codellm.errors import InvalidRequest

    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest(f"{param}[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                                 param=param)
        if tool.get("type", "function") != "function":
            raise InvalidRequest(f"{param}[{i}]: only function tools are supported, not {tool.get('type')!r}", param=param)
        if not isinstance(fn.get("parameters", {}), (dict, type(None))) or not isinstance(fn.get("description", ""), (str, type(None))):
            raise InvalidRequest(f"{param}[{i}].function: parameters must be an object and description a string",
                                 param=param)
    return tools


def tool_format(template: str | None, family: str | None) -> str:
    t = template or ""
    if "<tool_call>" in t:
        return "qwen3_coder" if "<function=" in t else "hermes"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3"
    if "[TOOL_CALLS]" in t:
        return "mistral_args" if "[ARGS]" in t else "mistral"
    return {"llama": "llama3", "codestral": "mistral"}.get(family or "", "hermes")


def args_key(fmt: str) -> str:
    """The key under which a call object of this format holds its arguments."""
    return "parameters" if fmt == "llama3" else "arguments"


def forced_call(fmt: str, name: str | None, tools: list[dict] | None = None) -> tuple[str, str, str]:
    """(head, object start, tail) of a tool call the output is made to be (``tool_choice`` "required" or a named
    function): head + object start go at the start of the assistant's turn, the model completes the call
    (constrained, ``grammar.tool_call``), and head + object start + output + tail parse as one call. Without a name
    the model picks it. Qwen3-Coder's calls are written in its own XML where ``xml_parameters`` can hold the tools."""
    if fmt == "mistral_args":  # the name is plain text, then the arguments object (see ``grammar.tool_call``)
        return ("[TOOL_CALLS]" + name + "[ARGS]", "{", "") if name else ("[TOOL_CALLS]", "", "")
    if fmt == "qwen3_coder" and xml_parameters(chosen_tools(tools or [], name)) is not None:
        return "<tool_call>\n", f"<function={name}>\n" if name else "<function=", "\n</tool_call>"
    key = args_key(fmt)
    head, tail = {"hermes": ("<tool_call>\n", "\n</tool_call>"), "qwen3_coder": ("<tool_call>\n", "\n</tool_call>"),
                  "llama3": ("", ""), "mistral": ("[TOOL_CALLS][", "]")}[fmt]
    start = f'{{"name": {json.dumps(name, ensure_ascii=False)}, "{key}": {{' if name else '{"name": "'
    return head, start, tail


def chosen_tools(tools: list[dict], name: str | None) -> list[tuple[str, dict]]:
    """(name, parameter schema) of the tool called ``name``, or of every tool when no name is given."""
    return [(fn.get("name"), fn.get("parameters") or {"type": "object"})
            for fn in ((t.get("function") or t) for t in tools) if not name or fn.get("name") == name]


_XML_STRING_KEYS = {"type", "description", "title", "minLength", "maxLength", "enum", "const", "default", "examples"}


def xml_parameters(chosen: list[tuple[str, dict]]) -> list[tuple[str, list[tuple[str, dict, bool]]]] | None:
    """Each tool's parameters as Qwen3-Coder's XML writes them: (tool, [(parameter, schema, required)]) in the
    schema's order, or None where some cannot be held to their schema that way: a string with a pattern or a
    format (raw text has no JSON escapes to check them on), a type that may be a string or not, names that would
    break the markup. Those calls are written as JSON, which the parser reads too."""
    out = []
    for tool, params in chosen:
        required = set(params.get("required") or []) if isinstance(params, dict) else set()
        if not tool or not isinstance(params, dict) or required - set(params.get("properties") or {}):
            return None
        fields = []
        for key, schema in (params.get("properties") or {}).items():
            if any(c in key + tool for c in "<>\n") or not isinstance(schema, dict):
                return None
            kind = schema.get("type")
            if not isinstance(kind, str) or (kind == "string" and set(schema) - _XML_STRING_KEYS):
                return None
            fields.append((key, schema, key in required))
        out.append((tool, fields))
    return out


def template_renders_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def tools_system_prompt(tools: list[dict]) -> str:
    """For chat templates that ignore ``tools``: describe them in Hermes style in the system message."""
    lines = ["You may call one or more functions to assist with the user query.",
             "You are provided with function signatures within <tools></tools> XML tags:", "<tools>"]
    lines += [json.dumps(t, ensure_ascii=False) for t in tools]
    lines += ["</tools>", "For each function call, return a json object with function name and arguments within "
              "<tool_call></tool_call> XML tags:", "<tool_call>", '{"name": <function-name>, "arguments": <args-json-object>}',
              "</tool_call>"]
    return "\n".join(lines)


def _call_from(obj) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(obj["name"], args if isinstance(args, dict) else {})


_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)


def parameter_types(tools: list | None) -> dict[str, dict[str, str]]:
    """{tool: {parameter: JSON type}}: how to read Qwen3-Coder's untyped parameter values."""
    out: dict[str, dict[str, str]] = {}
    for tool in tools or []:
        fn = tool.get("function") or {}
        props = (fn.get("parameters") or {}).get("properties") or {}
        out[fn.get("name", "")] = {k: v.get("type") for k, v in props.items() if isinstance(v, dict)}
    return out


def _xml_call(body: str, types: dict[str, dict[str, str]]) -> ToolCall | None:
    """``<function=name><parameter=p>value</parameter>...</function>``: strings are written raw, other values as JSON."""
    found = _FUNCTION.search(body)
    if not found:
        return None
    name, args = found.group(1).strip(), {}
    for p in _PARAMETER.finditer(found.group(2)):
        key, raw = p.group(1).strip(), p.group(2)
        if types.get(name, {}).get(key) == "string":
            args[key] = raw
            continue
        try:
            args[key] = json.loads(raw)
        except ValueError:
            args[key] = raw
    return ToolCall(name, args)


class ToolCallParser:
    """Feed generated text; get back ("text", str) and ("call", ToolCall) events in order. ``tools``: what the
    request offered, which says how to read formats whose values are untyped."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, fmt: str, tools: list | None = None):
        self.fmt = fmt
        self.types = parameter_types(tools) if fmt == "qwen3_coder" else {}
        self.buffer = ""
        self.in_call = False
        self.json_mode: bool | None = None  # llama3 / mistral: decided by how the output starts
        self.calls = 0

    def feed(self, text: str) -> list[tuple]:
        self.buffer += text
        return self._hermes() if self.fmt in ("hermes", "qwen3_coder") else self._whole()

    def _hermes(self) -> list[tuple]:
        events = []
        while True:
            if self.in_call:
                end = self.buffer.find(self.CLOSE)
                if end < 0:
                    return events
                call = self._parse_json(self.buffer[:end])
                events.append(("call", call) if call else ("text", self.OPEN + self.buffer[:end] + self.CLOSE))
                self.buffer = self.buffer[end + len(self.CLOSE):]
                self.in_call = False
                continue
            start = self.buffer.find(self.OPEN)
            if start >= 0:
                if start:
                    events.append(("text", self.buffer[:start]))
                self.buffer = self.buffer[start + len(self.OPEN):]
                self.in_call = True
                continue
            keep = _partial_suffix(self.buffer, self.OPEN)  # a marker may be arriving in pieces
            if len(self.buffer) > keep:
                events.append(("text", self.buffer[:len(self.buffer) - keep]))
                self.buffer = self.buffer[len(self.buffer) - keep:]
            return events

    def _whole(self) -> list[tuple]:
        if self.json_mode is None:
            head = self.buffer.lstrip()
            if not head:
                return []
            marker = "[TOOL_CALLS]" if self.fmt.startswith("mistral") else "<|python_tag|>"
            if head.startswith(("{", "[")) or head.startswith(marker):
                self.json_mode = True
            elif marker.startswith(head):
                return []  # maybe the marker, arriving in pieces: wait
            else:
                self.json_mode = False
        if self.json_mode:
            return []  # parsed whole at the end
        out, self.buffer = self.buffer, ""
        return [("text", out)] if out else []

    def _parse_json(self, text: str) -> ToolCall | None:
        """A call's body: JSON, or Qwen3-Coder's XML (where a forced call, written as JSON, may also stand)."""
        if self.fmt == "qwen3_coder" and text.lstrip().startswith("<function="):
            return _xml_call(text, self.types)
        try:
            return _call_from(json.loads(text.strip()))
        except ValueError:
            return None

    def finish(self) -> list[tuple]:
        """End of output: whatever is held back, as calls where it parses, else as text."""
        rest, self.buffer = self.buffer, ""
        if self.fmt in ("hermes", "qwen3_coder"):
            if self.in_call:
                call = self._parse_json(rest)
                return [("call", call)] if call else [("text", self.OPEN + rest)]
            return [("text", rest)] if rest else []
        if not self.json_mode:
            return [("text", rest)] if rest else []
        if self.fmt == "mistral_args":
            return _named_calls(rest)
        body = rest.strip().removeprefix("[TOOL_CALLS]").removeprefix("<|python_tag|>").strip()
        try:
            parsed = json.loads(body)
        except ValueError:
            chunks = [c for c in body.replace(";\n", ";").split(";") if c.strip()]
            try:
                parsed = [json.loads(c) for c in chunks]
            except ValueError:
                return [("text", rest)]
        items = parsed if isinstance(parsed, list) else [parsed]
        calls = [_call_from(i) for i in items]
        if not calls or any(c is None for c in calls):
            return [("text", rest)]
        return [("call", c) for c in calls]


def _named_calls(text: str) -> list[tuple]:
    """``[TOOL_CALLS]name[ARGS]{...}``, one or more: the calls, or all of it as text where any does not parse."""
    calls = []
    for part in [p for p in text.strip().split("[TOOL_CALLS]") if p.strip()]:
        name, sep, args = part.partition("[ARGS]")
        try:
            parsed = json.loads(args) if sep else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict) or not name.strip():
            return [("text", text)]
        calls.append(("call", ToolCall(name.strip(), parsed)))
    return calls or ([("text", text)] if text else [])


def _partial_suffix(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def parse_all(text: str, fmt: str, tools: list | None = None) -> tuple[str, list[ToolCall]]:
    parser = ToolCallParser(fmt, tools)
    events = parser.feed(text) + parser.finish()
    content = "".join(e[1] for e in events if e[0] == "text")
    return content, [e[1] for e in events if e[0] == "call"]
