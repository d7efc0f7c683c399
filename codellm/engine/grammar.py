"""Structured output that holds: JSON schemas, as token masks, through a grammar engine (llguidance).

A request asks for JSON (``response_format``, Ollama's ``format``, a forced tool call); the server turns
that into a grammar here, once, and a schema the engine cannot enforce is refused with a 400 rather than
answered with JSON that only looks constrained. Each constrained sequence then carries a ``Constraint``:
before its token is sampled the logits of every token the grammar does not allow next are masked, and the
sampled token advances the grammar. Separators are fixed (``", "`` and ``": "``, no other whitespace), the
way ``json.dumps`` writes and the way a forced tool call's opening text is written, so output stays
compact and a model cannot pad it with whitespace until its token limit.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from codellm.errors import InvalidRequest

if TYPE_CHECKING:
    import torch

ANY_OBJECT: dict = {"type": "object"}
_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


def json_schema(schema: dict | None, *, param: str = "response_format") -> str:
    """The grammar of one JSON value matching ``schema`` (None: any JSON object)."""
    import llguidance

    if schema is not None and not isinstance(schema, dict):
        raise InvalidRequest("a JSON schema must be an object", param=param)
    return _checked(lambda: llguidance.LLMatcher.grammar_from_json_schema(schema or ANY_OBJECT, overrides=_OPTIONS),
                    param)


def _checked(make, param: str) -> str:
    """The grammar ``make()`` builds, refused with a 400 where the grammar engine cannot build or enforce it."""
    import llguidance

    try:
        grammar = make()
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"unsupported JSON schema: {exc}", param=param) from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequest(f"unsupported JSON schema: {error}", param=param)
    return grammar


def tool_call(tools: list[dict], name: str | None, fmt: str, args_token: int | None = None) -> str:
    """The grammar of the rest of a forced call (after ``tools.forced_call``'s opening): the named tool, or any of
    ``tools``, with its arguments held to that tool's parameter schema. Mostly one call object,
    ``{"name": ..., "arguments"/"parameters": {...}}``; in Mistral's ``name[ARGS]{...}`` the name is plain text, and
    ``[ARGS]`` the tokenizer's special token ``args_token`` where it has one; Qwen3-Coder's is its XML
    (``_xml_calls``)."""
    from codellm.engine.tools import args_key, chosen_tools, xml_parameters

    chosen = chosen_tools(tools, name)
    if not chosen:
        raise InvalidRequest(f"no tool named {name!r}", param="tool_choice")
    if fmt == "qwen3_coder" and (xml := xml_parameters(chosen)) is not None:
        return _xml_calls(xml)
    if fmt == "mistral_args":
        return json_schema(chosen[0][1], param="tools") if name else _named_calls(chosen, args_token)
    key = args_key(fmt)
    options = [{"type": "object", "additionalProperties": False, "required": ["name", key],
                "properties": {"name": {"const": n}, key: params}} for n, params in chosen]
    return json_schema(options[0] if len(options) == 1 else {"anyOf": options}, param="tools")


def _named_calls(chosen: list[tuple[str, dict]], args_token: int | None) -> str:
    """``name[ARGS]{arguments}`` for any of the tools (a Lark grammar over llguidance's JSON schemas)."""
    import json

    import llguidance

    args = f"<[{int(args_token)}]>" if args_token is not None else '"[ARGS]"'
    rules = [f"t{i}: {json.dumps(n)} {args} %json {json.dumps({**params, 'x-guidance': _OPTIONS})}"
             for i, (n, params) in enumerate(chosen)]
    lark = "start: " + " | ".join(f"t{i}" for i in range(len(chosen))) + "\n" + "\n".join(rules) + "\n"
    return _checked(lambda: llguidance.LLMatcher.grammar_from_lark(lark), "tools")


def _xml_calls(calls: list[tuple[str, list[tuple[str, dict, bool]]]]) -> str:
    """Qwen3-Coder's ``<function=name>`` with a ``<parameter=key>`` block a parameter (those required always, the
    others where the model writes them, in the schema's order), then ``</function>``, for any of the tools: a
    string's value is raw text of its length bounds (or one of its values) in which ``</parameter>`` cannot
    appear, any other value JSON held to its schema. A value and its closing tag are one lexeme, so the value
    ends exactly where the tag begins."""
    import json

    import llguidance

    close = json.dumps("\n</parameter>\n")
    rules, starts = [], []
    for t, (tool, fields) in enumerate(calls):
        parts = []
        for i, (key, schema, required) in enumerate(fields):
            opening = json.dumps(f"<parameter={key}>\n")
            if schema.get("type") == "string":
                if "const" in schema or "enum" in schema:
                    values = [schema["const"]] if "const" in schema else schema["enum"]
                    rules.append(f"V{t}X{i}: " + " | ".join(json.dumps(str(v)) for v in values))
                else:
                    bounds = f"{int(schema.get('minLength', 0))},{int(schema['maxLength']) if 'maxLength' in schema else ''}"
                    rules.append(f"V{t}X{i}: /(?s:.{{{bounds}}})/ & ~/(?s:.*<\\/parameter>.*)/")
                rules.append(f"P{t}X{i}: {opening} V{t}X{i} {close}")
                item = f"P{t}X{i}"
            else:
                rules.append(f"p{t}x{i}: {opening} %json {json.dumps({**schema, 'x-guidance': _OPTIONS})} {close}")
                item = f"p{t}x{i}"
            parts.append(item if required else f"{item}?")
        rules.append(f"f{t}: {json.dumps(f'<function={tool}>' + chr(10))} {' '.join(parts)} \"</function>\"")
        starts.append(f"f{t}")
    lark = "start: " + " | ".join(starts) + "\n" + "\n".join(rules) + "\n"
    return _checked(lambda: llguidance.LLMatcher.grammar_from_lark(lark), "tools")


_TOKENIZERS: "weakref.WeakKeyDictionary[Any, dict[tuple, Any]]" = weakref.WeakKeyDictionary()  # goes with its model
_LOCK = threading.Lock()


def _tokenizer(tokenizer, eos: tuple[int, ...]):
    """llguidance's view of a tokenizer (its token trie), built once per tokenizer and end-of-sequence set: 0.6 s
    for a 65k vocabulary and 1.1 s for 152k on a CPU core, which ``warm`` spends off the request path."""
    import llguidance.hf

    with _LOCK:
        views = _TOKENIZERS.setdefault(tokenizer, {})
        if eos not in views:
            views[eos] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=list(eos) or None)
        return views[eos]


def warm(tokenizer, eos, *, wait: bool = False) -> None:
    """Build ``tokenizer``'s grammar view now (a model just loaded), and import the mask's torch half (1.4 s,
    measured here), so that the first request for structured output pays for neither on the server's event loop or
    the engine's step loop. A grammar itself compiles in well under a millisecond. ``wait``: before returning (a
    model loaded before serving starts: done in a background thread, the work held up the first seconds of requests,
    8 ms of TTFT at one stream on an H200); else in the background."""
    def run() -> None:
        _tokenizer(tokenizer, tuple(sorted(eos)))
        import llguidance.torch  # noqa: F401

    thread = threading.Thread(target=run, name="grammar-warm", daemon=True)
    thread.start()
    if wait:
        thread.join()


class Constraint:
    """One sequence's place in its grammar: which tokens may come next, advanced by each token it takes."""

    def __init__(self, tokenizer, grammar: str, prefix: str = "", eos: tuple[int, ...] = ()):
        import llguidance

        self.tokenizer = _tokenizer(tokenizer, eos)
        try:
            self.matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        except (ValueError, RuntimeError) as exc:
            raise InvalidRequest(f"unsupported grammar: {exc}") from None
        if prefix and not self.matcher.consume_tokens(self.tokenizer.tokenize_str(prefix)):
            raise InvalidRequest("the output's start does not fit its grammar")
        if self.matcher.is_error():
            raise InvalidRequest(f"unsupported grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """Nothing more may follow (or the grammar failed): the sequence ends here."""
        return self.matcher.is_stopped()

    def accept(self, token: int) -> bool:
        return self.matcher.consume_token(token)


def mask(constraints: list[Constraint], logits: "torch.Tensor") -> None:
    """Set, in place, the logits of row i to -inf wherever ``constraints[i]`` allows no token (rows without one:
    None, left as they are)."""
    import torch
    import llguidance.torch as lt

    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return
    vocab = logits.shape[-1]
    allowed = torch.zeros((len(rows), vocab), dtype=torch.bool)  # past the tokenizer's vocabulary: never
    shifts = torch.arange(32, dtype=torch.int32)
    for j, i in enumerate(rows):  # (rows may come from different tokenizers: a mask each)
        words = lt.allocate_token_bitmask(1, constraints[i].tokenizer.vocab_size)
        lt.fill_next_token_bitmask(constraints[i].matcher, words, 0)
        bits = ((words[0].unsqueeze(-1) >> shifts) & 1).view(-1)  # one bit a token, lowest first
        n = min(vocab, bits.numel())
        allowed[j, :n] = bits[:n].bool()
    index = torch.tensor(rows, device=logits.device)
    with torch.inference_mode():  # (the logits are inference tensors)
        logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
