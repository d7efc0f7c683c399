"""Every failure leaves the server as OpenAI's error object, with the right status, in one place."""

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


async def refuse(scope, send, status: int, message: str) -> None:
    """Answer a raw ASGI request with an error in its API's shape (for middleware, before any route runs)."""
    import msgspec

    path = scope.get("path", "")
    if _ollama_path(path):
        body = {"error": message}
    elif path.startswith("/v1/messages"):  # Anthropic's shape
        body = {"type": "error", "error": {"type": "permission_error" if status == 403 else "invalid_request_error",
                                           "message": message}}
    else:
        body = error_body(message, "invalid_request_error", {403: "forbidden", 415: "unsupported_media_type"}.get(status))
    data = msgspec.json.encode(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def codellm_error(request: Request, exc: CodellmError) -> Response:
    if _ollama(request):  # Ollama's shape; a full queue is 503 there
        status = 503 if isinstance(exc, QueueFull) else exc.status
        return _response(status, {"error": exc.message})
    headers = {}
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = "1"
    elif exc.status >= 500 or exc.status == 409:
        headers["x-should-retry"] = "false"
    return _response(exc.status, error_body(exc.message, exc.type, exc.code, exc.param), headers)


def validation_error(request: Request, exc: ValidationException) -> Response:
    param, detail = None, exc.detail
    extra = exc.extra if isinstance(exc.extra, list) else []
    if extra and isinstance(extra[0], dict):
        key = str(extra[0].get("key") or "")
        param = key.removeprefix("$.").removeprefix("data.") or None
        detail = extra[0].get("message") or detail
    if "JSON" in str(exc.detail) and not extra:
        detail = f"request body is not valid JSON: {exc.detail}"
    if _ollama(request):
        return _response(400, {"error": f"{detail} (at {param})" if param else str(detail)})
    return _response(400, error_body(str(detail), "invalid_request_error", "invalid_request", param))


def http_error(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if _ollama(request):
        return _response(status, {"error": str(exc.detail)}, dict(exc.headers or {}))
    kind = {401: "authentication_error", 404: "invalid_request_error", 405: "invalid_request_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    headers = dict(exc.headers or {})
    return _response(status, error_body(str(exc.detail), kind, None), headers)


def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    if _ollama(request):
        return _response(500, {"error": f"internal error: {type(exc).__name__}"})
    return _response(500, error_body(f"internal error: {type(exc).__name__}", "server_error", "internal_error"),
                     {"x-should-retry": "false"})


HANDLERS = {
    CodellmError: codellm_error,
    ValidationException: validation_error,
    HTTPException: http_error,
    Exception: internal_error,
}
