"""Who may talk to the server from a browser: the Host header (against DNS rebinding), the Origin header
(against cross-site requests) and the body's media type (against forms and ``text/plain`` posts that a web
page may send without asking). Ollama's rules, as ``OLLAMA_ORIGINS`` and its allowed hosts define them.

A page on ``evil.example`` that resolves its own name to 127.0.0.1 reaches a server on loopback with
``Host: evil.example``: bound to loopback, only loopback names are answered. A page anywhere can also post a
"simple" request (a form, or ``text/plain``) without a CORS preflight: a browser's request from a foreign
origin is refused, and JSON routes take JSON only (curl's default form type too, from clients that are not
browsers, so that ``curl -d '{...}'`` works as with Ollama).
"""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from litestar.types import ASGIApp, Receive, Scope, Send

# origins a browser may call from without --cors-origin, as Ollama allows them
DEFAULT_ORIGINS = (
    "http://localhost", "https://localhost", "http://localhost:*", "https://localhost:*",
    "http://127.0.0.1", "https://127.0.0.1", "http://127.0.0.1:*", "https://127.0.0.1:*",
    "http://0.0.0.0", "https://0.0.0.0", "http://0.0.0.0:*", "https://0.0.0.0:*",
    "http://[::1]", "https://[::1]", "http://[::1]:*", "https://[::1]:*",
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
)
JSON_TYPES = ("application/json",)
OCTETS = "application/octet-stream"
FORM_TYPE = "application/x-www-form-urlencoded"  # curl -d's default


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """``Host`` without its port (IPv6 literals keep their brackets off)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


@dataclass(frozen=True)
class Policy:
    bind: str = "127.0.0.1"  # the address the server listens on
    allowed_hosts: tuple[str, ...] = ()  # extra Host names (fnmatch patterns, '*' for any)
    cors_origins: tuple[str, ...] = ()  # extra browser origins (fnmatch patterns, '*' for any)
    default_origins: tuple[str, ...] = field(default=DEFAULT_ORIGINS)

    def host_allowed(self, header: str | None) -> bool:
        if header is None:
            return False
        name = host_name(header)
        if any(fnmatch.fnmatchcase(name, p.lower()) for p in self.allowed_hosts):
            return True
        if not _is_loopback(self.bind) and self.bind not in ("", "localhost"):
            # listening on a network address: names there are the operator's business unless restricted
            return not self.allowed_hosts
        return _is_loopback(name) or name == self.bind.lower()

    def origin_allowed(self, origin: str, host_header: str | None) -> bool:
        origin = origin.strip().lower()
        if origin == "null":  # sandboxed frames and file:// pages in some browsers: only if asked for
            return "null" in self.cors_origins
        parts = urlsplit(origin)
        if host_header and parts.netloc == host_header.strip().lower():
            return True  # same origin
        return any(fnmatch.fnmatchcase(origin, p.lower()) for p in (*self.cors_origins, *self.default_origins))


def check(policy: Policy, method: str, headers: dict[str, str], has_body: bool) -> tuple[int, str] | None:
    """(status, message) for a request to refuse, or None. Pure, for tests."""
    host = headers.get("host")
    if not policy.host_allowed(host):
        return 403, (f"host {host!r} is not allowed: this server answers loopback names; "
                     "add others with --allowed-hosts")
    origin = headers.get("origin")
    if origin is not None and method != "OPTIONS" and not policy.origin_allowed(origin, host):
        return 403, f"origin {origin!r} is not allowed: add it with --cors-origin"
    if has_body and method in ("POST", "PUT", "PATCH", "DELETE"):
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        browser = origin is not None or "sec-fetch-site" in headers or "sec-fetch-mode" in headers
        # raw bytes (a blob upload) too, from programs: a browser cannot send them cross-site without a preflight
        if media in JSON_TYPES or media.endswith("+json") or (media in ("", FORM_TYPE, OCTETS) and not browser):
            return None
        return 415, f"unsupported content type {media or 'none'!r}: send the body as application/json"
    return None


class OriginGuard:
    """ASGI middleware applying ``check`` to every HTTP request before routing."""

    def __init__(self, app: ASGIApp, policy: Policy, refuse) -> None:
        self.app, self.policy, self.refuse = app, policy, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            has_body = headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers
            verdict = check(self.policy, scope["method"], headers, has_body)
            if verdict is not None:
                await self.refuse(scope, send, *verdict)
                return
        await self.app(scope, receive, send)
