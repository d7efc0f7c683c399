"""Prompt templates rendered with bounds: chat templates (Jinja, from a hub repo or a Modelfile TEMPLATE) in a
sandbox that limits time, sizes and output, and Ollama's Go prompt templates by a small renderer of their own.

A chat template is code from whoever made the model, and with ``/api/create`` that can be any client of the
server. Jinja's sandbox stops it from reaching Python's internals, but not from looping 10^10 times or building
a gigabyte string. Here every call and operator that can grow a value is checked before it runs, the output is
counted as it is produced, and a render that runs past its deadline is interrupted.
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
import itertools
import json
import queue
import re
import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable

from jinja2 import TemplateError, TemplateSyntaxError, nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from codellm.errors import InvalidRequest

MAX_CHARS = 8_000_000  # the longest string, list or rendered prompt a template may build
MAX_SECONDS = 2.0  # a render (a long chat with many tools takes milliseconds)
time_limit: contextvars.ContextVar[float] = contextvars.ContextVar("template_time_limit", default=MAX_SECONDS)


class TemplateTimeout(BaseException):
    """Raised inside a render that ran past its deadline (a BaseException: template code cannot catch it)."""


class TooSlow(InvalidRequest):
    """A render ran past its deadline."""


class _TooLarge(Exception):
    pass


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _check(value: Any) -> Any:
    if _size(value) > MAX_CHARS:
        raise _TooLarge
    return value


class _Codegen(CodeGenerator):
    """Jinja's code generator, with ``a ~ b`` (string concatenation) going through the environment's check."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _bounded_filter(fn: Callable) -> Callable:
    @functools.wraps(fn)  # keeps Jinja's pass_context / pass_environment marks
    def bounded_filter(*args, **kwargs):
        for value in (*args[1:], *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_CHARS:
                raise _TooLarge
        return _check(fn(*args, **kwargs))

    return bounded_filter


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with every operator, call and filter that can grow a value checked."""

    intercepted_binops = frozenset({"*", "**", "+", "%", "//"})
    intercepted_unops = frozenset()
    code_generator_class = _Codegen

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.filters = {name: _bounded_filter(fn) for name, fn in self.filters.items()}

    def concat(self, parts) -> str:
        parts = [str(p) for p in parts]
        if sum(map(len, parts)) > MAX_CHARS:
            raise _TooLarge
        return "".join(parts)

    def call_binop(self, context, op: str, left, right):
        if op == "*":
            for seq, times in ((left, right), (right, left)):
                if _size(seq) and isinstance(times, int) and _size(seq) * max(0, times) > MAX_CHARS:
                    raise _TooLarge
        elif op == "**":
            if isinstance(right, int) and isinstance(left, int) and abs(left) > 1 and right > 4096:
                raise _TooLarge
        elif op == "%" and isinstance(left, str):
            if any(int(width) > MAX_CHARS for width in re.findall(r"%[-+ #0]*(\d+)", left)):
                raise _TooLarge
        elif op == "+" and _size(left) + _size(right) > MAX_CHARS:
            raise _TooLarge
        return _check(super().call_binop(context, op, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        for value in (*args, *kwargs.values()):  # a width, a count, a padding: center(10**9), "x".ljust(10**9)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_CHARS:
                raise _TooLarge
        return _check(super().call(__context, __obj, *args, **kwargs))


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=64)
def compile_chat_template(source: str):
    """A chat template compiled as transformers compiles it (same options, filters and globals), in the bounded
    sandbox. Raises InvalidRequest for a template that does not parse."""
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _bounded_filter(_tojson)
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=lambda *a, **k: dict(*a, **k))
    try:
        return env.from_string(source)
    except TemplateSyntaxError as exc:
        raise InvalidRequest(f"the chat template is not valid Jinja (line {exc.lineno}): {exc.message}",
                             param="template") from None


def _interrupt(thread_id: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(TemplateTimeout))


def _clear_interrupt() -> None:
    """Withdraw an interruption of this thread that has not been raised yet (a NULL exception clears it)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), ctypes.c_void_p(0))


class _Watchdog:
    """One thread that interrupts renders past their deadline (a timer thread per render would cost a thread
    start on every chat request). Arming, disarming and firing share a lock, so an interruption is only ever
    sent while its render is armed; one sent as the render was ending is withdrawn in ``disarm`` before it can be
    raised outside the render. An interruption can land on any bytecode between arming and disarming, so nothing
    there may hold Python-level lock state: the lock is a plain ``threading.Lock`` and the wake-up a C
    ``SimpleQueue`` (a Condition's, or an Event's, Python-level ``__enter__`` interrupted half-way left its lock
    held, and every later render hung)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._armed: dict[int, tuple[float, int]] = {}  # token -> (deadline, thread id)
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float) -> int:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="template-watchdog", daemon=True)
                self._thread.start()
            token = next(self._tokens)
            self._armed[token] = (time.monotonic() + seconds, threading.get_ident())
        self._wake.put(None)
        return token

    def disarm(self, token: int) -> bool:
        """False if the deadline had passed and the render was interrupted."""
        with self._lock:
            if self._armed.pop(token, None) is not None:
                return True
            _clear_interrupt()
            return False

    def _run(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                for token, (deadline, thread_id) in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[token]
                        _interrupt(thread_id)
                soonest = min((d for d, _ in self._armed.values()), default=None)
            try:
                self._wake.get(timeout=None if soonest is None else max(0.0, soonest - now))
                while True:  # one pass serves every wake-up sent meanwhile
                    self._wake.get_nowait()
            except queue.Empty:
                pass


_watchdog = _Watchdog()


def bounded(fn: Callable[[], str], seconds: float | None = None) -> str:
    """``fn()`` (a render), interrupted after ``seconds`` (default: ``time_limit``, which a caller can lower for
    renders on an event loop). The interruption is an exception raised in this thread while it runs Python code,
    which a template loop always is."""
    seconds = time_limit.get() if seconds is None else seconds
    try:
        token = _watchdog.arm(seconds)
        try:
            out = fn()
        finally:
            interrupted = not _watchdog.disarm(token)
        if interrupted:  # it ended as its deadline passed: as late as one that was stopped
            raise TemplateTimeout
        return out
    except TemplateTimeout:
        raise TooSlow(f"the prompt template took longer than {seconds:g} s to render", param="template") from None


def _nine(call_id) -> str:
    import hashlib

    text = str(call_id)
    return text if len(text) == 9 and text.isalnum() else hashlib.sha1(text.encode()).hexdigest()[:9]


def mistral_call_ids(messages: list[dict]) -> list[dict]:
    """Mistral's templates take only tool-call ids of nine letters and digits (what its own API makes); OpenAI and
    Anthropic clients send longer ones. Each id is written as nine hex digits of its hash, the same for a call and
    for the result that answers it."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = [{**c, "id": _nine(c["id"])} if isinstance(c, dict) and "id" in c else c
                               for c in m["tool_calls"]]
        if m.get("tool_call_id") is not None:
            m["tool_call_id"] = _nine(m["tool_call_id"])
        out.append(m)
    return out


def render_chat(tokenizer, messages: list[dict], *, tools: list | None = None, add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template applied to ``messages``, as ``apply_chat_template(tokenize=False)`` renders
    it, within the bounds above."""
    template = compile_chat_template(tokenizer.chat_template)
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    if "[TOOL_CALLS]" in tokenizer.chat_template:
        messages = mistral_call_ids(messages)
    context = {**tokenizer.special_tokens_map, "messages": messages,
               "tools": tools, "documents": None, "add_generation_prompt": add_generation_prompt}

    def render() -> str:
        out, total = [], 0
        for piece in template.generate(**context):
            total += len(piece)
            if total > MAX_CHARS:
                raise _TooLarge
            out.append(piece)
        return "".join(out)

    try:
        return bounded(render)
    except _TooLarge:
        raise InvalidRequest(f"the chat template's output would exceed {MAX_CHARS:,} characters",
                             param="template") from None


# -- Ollama's Go templates ----------------------------------------------------------------------------------------
_GO_TAG = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_GO_VARS = {".System": "system", ".Prompt": "prompt", ".Suffix": "suffix", ".Response": "response"}


def go_template(template: str, **values: str) -> str:
    """Render the common subset of an Ollama (Go) prompt template: {{ .System }}, {{ .Prompt }}, {{ .Suffix }},
    {{ .Response }}, {{ if .X }}...{{ else }}...{{ end }}, and {{- -}} trimming. Everything else in the text is
    literal (Jinja syntax included): rendering takes one pass over the template."""
    root: list = []
    stack: list[tuple[str, list, list]] = []  # (variable, then-branch, else-branch) of each open if
    branch, pos, trim_next = root, 0, False

    def text(piece: str, trim_left: bool) -> None:
        nonlocal trim_next
        if trim_next:
            piece = piece.lstrip()
        if trim_left:
            piece = piece.rstrip()
        trim_next = False
        if piece:
            branch.append(piece)

    for m in _GO_TAG.finditer(template):
        left, body, right = m.group(1), m.group(2), m.group(3)
        text(template[pos:m.start()], bool(left))
        pos, trim_next = m.end(), bool(right)
        if body in _GO_VARS:
            branch.append((_GO_VARS[body],))
        elif body.startswith("if ") and body[3:].strip() in _GO_VARS:
            node = (_GO_VARS[body[3:].strip()], [], [])
            branch.append(node)
            stack.append((node, branch))
            branch = node[1]
        elif body == "else" and stack and branch is stack[-1][0][1]:
            branch = stack[-1][0][2]
        elif body == "end" and stack:
            branch = stack.pop()[1]
        else:
            raise InvalidRequest(f"unsupported template action {{{{ {body} }}}}: codellm renders .System, .Prompt, "
                                 ".Suffix, .Response, if/else/end", param="template")
    if stack:
        raise InvalidRequest("invalid template: an {{ if }} has no {{ end }}", param="template")
    text(template[pos:], False)

    def emit(items: list, out: list[str]) -> None:
        for item in items:
            if isinstance(item, str):
                out.append(item)
            elif len(item) == 1:
                out.append(values.get(item[0], ""))
            else:
                emit(item[1] if values.get(item[0]) else item[2], out)

    out: list[str] = []
    emit(root, out)
    return "".join(out)

