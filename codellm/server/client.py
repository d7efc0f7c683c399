"""`codellm run`: a chat session against a running server, or an in-process engine when none runs.

The command syntax of the interactive chat (/bye, /set system, /set parameter, \"\"\" blocks) is
parsed here, as pure functions, so the CLI only reads lines and prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator

import httpx

from codellm.errors import CodellmError, InvalidRequest
from codellm.registry.modelfile import coerce_parameter

DEFAULT_URL = "http://127.0.0.1:11435"
_PARAM_TO_API = {"num_predict": "max_tokens", "repeat_penalty": "repetition_penalty"}


@dataclass
class Session:
    model: str
    system: str | None = None
    options: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user}]


@dataclass
class Command:
    kind: str  # bye | system | parameter | clear | help | message | unknown
    arg: str = ""
    value: object = None


HELP = """Available commands:
  /set system <text>         set the system message
  /set parameter <name> <v>  set a sampling parameter (temperature, top_p, top_k, num_predict, seed, stop, ...)
  /clear                     forget the conversation
  /bye                       exit
  \"\"\"                        begin or end a multi-line message"""


def parse_command(line: str) -> Command:
    text = line.strip()
    if not text.startswith("/"):
        return Command("message", line)
    word, _, rest = text.partition(" ")
    if word in ("/bye", "/exit", "/quit"):
        return Command("bye")
    if word in ("/?", "/help"):
        return Command("help")
    if word == "/clear":
        return Command("clear")
    if word == "/set":
        what, _, rest = rest.strip().partition(" ")
        if what == "system":
            return Command("system", rest.strip())
        if what == "parameter":
            name, _, value = rest.strip().partition(" ")
            try:
                return Command("parameter", name, coerce_parameter(name, value.strip()))
            except CodellmError as exc:
                return Command("unknown", exc.message)
    return Command("unknown", f"unknown command {word!r}: type /? for help")


def apply(session: Session, cmd: Command) -> str | None:
    """Apply a command to the session; returns a line to show the user, if any."""
    if cmd.kind == "system":
        session.system = cmd.arg or None
        return "Set system message."
    if cmd.kind == "parameter":
        key = _PARAM_TO_API.get(cmd.arg, cmd.arg)
        if key == "stop":
            session.options.setdefault("stop", []).append(cmd.value)
        else:
            session.options[key] = cmd.value
        return f"Set parameter '{cmd.arg}' to '{cmd.value}'"
    if cmd.kind == "clear":
        session.history.clear()
        return "Cleared session context"
    if cmd.kind == "help":
        return HELP
    if cmd.kind == "unknown":
        return cmd.arg
    return None


def server_available(url: str, api_key: str | None = None) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def stream_http(url: str, session: Session, user: str, api_key: str | None = None) -> Iterator[str]:
    body = {"model": session.model, "messages": session.messages(user), "stream": True, **session.options}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=None) as resp:
        if resp.status_code != 200:
            resp.read()
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text
            raise InvalidRequest(message)
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise CodellmError(event["error"]["message"])
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    yield piece


def stream_local(manager, session: Session, user: str) -> Iterator[str]:
    from codellm.engine import prompts
    from codellm.engine.streams import iterate

    served = manager.get(session.model)
    ids = prompts.chat_prompt(served.lm, session.messages(user))
    overrides = {k: v for k, v in session.options.items() if k in served.sampling({}).__struct_fields__}
    for out in iterate(served.generator(), ids, served.sampling(overrides), lm=served.lm):
        if out.error:
            raise CodellmError(f"generation failed: {out.error}")
        if out.text:
            yield out.text


def exchange(stream: Iterator[str], session: Session, user: str) -> Iterator[str]:
    """Yield the answer's pieces and record the turn in the history once it completes."""
    pieces = []
    for piece in stream:
        pieces.append(piece)
        yield piece
    session.history += [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(pieces)}]


def _ollama_call(method: str, url: str, path: str, **kw) -> httpx.Response:
    from codellm.errors import NotFound

    try:
        resp = httpx.request(method, url + path, timeout=30, **kw)
    except httpx.HTTPError as exc:
        raise CodellmError(f"no codellm server answers at {url} ({type(exc).__name__})") from None
    if resp.status_code == 404:
        raise NotFound(resp.json().get("error", "not found"))
    if resp.status_code >= 400:
        raise CodellmError(resp.json().get("error", resp.text))
    return resp


def loaded_models(url: str) -> list[dict]:
    """What `codellm ps` prints: the server's loaded models with their expiry in words."""
    import time
    from datetime import datetime

    rows = []
    for m in _ollama_call("GET", url, "/api/ps").json()["models"]:
        left = datetime.fromisoformat(m["expires_at"].replace("Z", "+00:00")).timestamp() - time.time()
        until = "Forever" if left > 5 * 365 * 86400 else f"{int(left // 60)} minutes from now" if left >= 60 else "less than a minute"
        rows.append({**m, "until": until})
    return rows


def unload(url: str, model: str) -> None:
    _ollama_call("POST", url, "/api/generate", json={"model": model, "keep_alive": 0})
