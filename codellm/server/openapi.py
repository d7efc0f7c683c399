"""The served OpenAPI document, made true: request bodies described by msgspec from the very Structs that
validate them (bounds on optional fields included), and each route's error responses as its dialect sends them.
Litestar generates the paths; what it says about bodies and errors is replaced here. Generated clients and
schema-based fuzzers then see the API as it is."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar
from msgspec import Struct


class OpenAIErrorDetail(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(Struct):
    """The error object of the OpenAI dialect (and of the editor routes)."""

    error: OpenAIErrorDetail


class OllamaError(Struct):
    """The error object of Ollama's native API."""

    error: str


class AnthropicErrorDetail(Struct):
    type: str
    message: str


class AnthropicError(Struct):
    """The error object of the Anthropic Messages dialect."""

    type: str
    error: AnthropicErrorDetail


ERRORS = {  # status -> what it means, for every route of a dialect
    400: "Invalid request: a field of the wrong type or out of its bounds, a prompt too long, bad JSON",
    401: "Missing or wrong API key (when the server has one)",
    403: "Host or Origin not allowed (DNS rebinding and cross-site protection)",
    404: "No such model",
    415: "The body is not JSON",
    429: "Queue full: retry later (OpenAI dialect)",
    500: "Internal error",
    503: "Queue full: retry later (Ollama dialect)",
    507: "The model does not fit in memory, or the disk is full",
}
_OPENAI = {400, 401, 403, 404, 415, 429, 500, 507}
_OLLAMA = {400, 401, 403, 404, 415, 500, 503, 507}
_PUBLIC = {403, 500}  # /health, /api/version: no key, no body


def _bodies(app: Litestar) -> dict[tuple[str, str], type]:
    """(path, method) -> the Struct its handler decodes the body into."""
    out = {}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            data = handler.parsed_fn_signature.parameters.get("data")
            if data is not None and isinstance(data.annotation, type) and issubclass(data.annotation, Struct):
                for method in handler.http_methods:
                    out[(route.path_format, method.lower())] = data.annotation
    return out


def document(app: Litestar, generated: dict[str, Any]) -> dict[str, Any]:
    doc = msgspec.json.decode(msgspec.json.encode(generated))  # a copy
    bodies = _bodies(app)
    types = sorted(set(bodies.values()), key=lambda t: t.__name__) + [OpenAIError, OllamaError, AnthropicError]
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    doc.setdefault("components", {})["schemas"] = components
    refs = dict(zip(types, schemas))
    for path, operations in doc.get("paths", {}).items():
        for method, op in operations.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            body = bodies.get((path, method))
            if body is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[body]}}}
            ollama = path.startswith("/api/")
            public = body is None and method == "get" and path in ("/health", "/api/version")
            if path.startswith("/api/blobs/"):  # a digest to check, and for POST a raw body to store
                codes = {400, 401, 403, 404, 500} | ({507} if method == "post" else set())
                if method == "post":
                    op["requestBody"] = {"required": True, "content": {
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
            elif public:
                codes = _PUBLIC
            elif body is None:  # a GET: nothing to validate
                codes = {401, 403, 500} | ({404} if "{" in path else set())
            else:
                codes = _OLLAMA if ollama else _OPENAI
            error = refs[OllamaError if ollama else AnthropicError if path.startswith("/v1/messages") else OpenAIError]
            responses = {k: v for k, v in op["responses"].items() if not k.startswith(("4", "5"))}
            for status in sorted(codes):
                responses[str(status)] = {"description": ERRORS[status],
                                          "content": {"application/json": {"schema": error}}}
            op["responses"] = responses
    return doc


def install(app: Litestar) -> None:
    """Serve ``document`` where Litestar serves its own: its OpenAPI plugin builds the document once and keeps it
    (``_openapi_schema``), so that is where this one goes (tests read the served document back)."""
    doc = document(app, app.openapi_schema.to_schema())
    for plugin in app.plugins:
        if hasattr(plugin, "provide_openapi_schema"):
            plugin._openapi_schema = doc
