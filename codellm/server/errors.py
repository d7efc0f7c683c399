"""Every failure leaves the server as its API's error object, with the right status: one set of exception
handlers per dialect (``handlers``), installed on that dialect's router (Anthropic's writes its own)."""

from __future__ import annotations

import logging

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

from codellm.errors import CodellmError, QueueFull

log = logging.getLogger("codellm.server")


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _response(status: int, body: dict, headers: dict | None = None) -> Response:
    return Response(content=body, status_code=status, media_type=MediaType.JSON, headers=headers or {})


def _ollama(request: Request) -> bool:
    return _ollama_path(request.url.path)


def _ollama_path(path: str) -> bool:
    return path.startswith("/api/")


# Anthropic names its error types after the status
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
_CODES = {403: "forbidden", 413: "request_too_large", 415: "unsupported_media_type", 503: "unavailable"}


async def refuse(scope, send, status: int, message: str, retry_after: int | None = None) -> None:
    """Answer a raw ASGI request with an error in its API's shape (for middleware, before any route runs)."""
    import msgspec

    path = scope.get("path", "")
    if _ollama_path(path):
        body = {"error": message}
    elif path.startswith("/v1/messages"):
        body = {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    else:
        body = error_body(message, "server_error" if status >= 500 else "invalid_request_error", _CODES.get(status))
    data = msgspec.json.encode(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class Shape:
    """How one API dialect writes an error; each router answers in its own (``handlers``)."""

    queue_full_status = 429

    def body(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
        return error_body(message, type_, code, param)

    def headers(self, exc: CodellmError) -> dict:
        if isinstance(exc, QueueFull):
            return {"Retry-After": "1"}
        return {"x-should-retry": "false"} if exc.status >= 500 or exc.status == 409 else {}

    def invalid(self, detail: str, param: str | None) -> dict:
        return error_body(detail, "invalid_request_error", "invalid_request", param)


class OllamaShape(Shape):
    """``{"error": message}``; a full queue is 503 there."""

    queue_full_status = 503

    def body(self, status, message, type_, code=None, param=None) -> dict:
        return {"error": message}

    def headers(self, exc) -> dict:
        return {}

    def invalid(self, detail, param) -> dict:
        return {"error": f"{detail} (at {param})" if param else detail}


OPENAI, OLLAMA = Shape(), OllamaShape()


def handlers(shape: Shape) -> dict:
    """Exception handlers that answer every failure in ``shape``."""

    def codellm_error(request: Request, exc: CodellmError) -> Response:
        status = shape.queue_full_status if isinstance(exc, QueueFull) else exc.status
        return _response(status, shape.body(status, exc.message, exc.type, exc.code, exc.param), shape.headers(exc))

    def validation_error(request: Request, exc: ValidationException) -> Response:
        param, detail = None, exc.detail
        extra = exc.extra if isinstance(exc.extra, list) else []
        if extra and isinstance(extra[0], dict):
            key = str(extra[0].get("key") or "")
            param = key.removeprefix("$.").removeprefix("data.") or None
            detail = extra[0].get("message") or detail
        if "JSON" in str(exc.detail) and not extra:
            detail = f"request body is not valid JSON: {exc.detail}"
        return _response(400, shape.invalid(str(detail), param))

    def http_error(request: Request, exc: HTTPException) -> Response:
        status = exc.status_code
        kind = {401: "authentication_error", 404: "invalid_request_error", 405: "invalid_request_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")
        return _response(status, shape.body(status, str(exc.detail), kind), dict(exc.headers or {}))

    def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        message = f"internal error: {type(exc).__name__}"
        return _response(500, shape.body(500, message, "server_error", "internal_error"), shape.headers(CodellmError(message)))

    return {CodellmError: codellm_error, ValidationException: validation_error, HTTPException: http_error,
            Exception: internal_error}


OLLAMA_HANDLERS = handlers(OLLAMA)
_OPENAI_HANDLERS = handlers(OPENAI)


def _unrouted(request: Request, exc: HTTPException) -> Response:
    """No route matched (404, 405), so no router chose a shape: the path's prefix says whose client asked."""
    return OLLAMA_HANDLERS[HTTPException](request, exc) if _ollama(request) else _OPENAI_HANDLERS[HTTPException](request, exc)


HANDLERS = {**_OPENAI_HANDLERS, HTTPException: _unrouted}  # the app's: OpenAI's shape, where no router says otherwise
