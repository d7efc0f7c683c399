"""The few typed failures every room raises; the server and CLI map them to output once.

Each carries what an OpenAI-shaped error body needs (status, type, code, param) so that the
HTTP layer never has to guess, and a one-line message that the CLI prints as is.
"""

from __future__ import annotations


class CodellmError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(CodellmError):
    """The caller asked for something malformed or impossible (400)."""

    status = 400
    type = "invalid_request_error"


class InvalidName(InvalidRequest):
    code = "invalid_model_name"


class ModelfileError(InvalidRequest):
    code = "invalid_modelfile"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Refused(InvalidRequest):
    """A safe default said no (pickle weights, remote code); a flag says yes."""

    code = "refused"


class Unauthorized(CodellmError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(CodellmError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class QueueFull(CodellmError):
    """Too much work queued; retrying later can help (429 + Retry-After)."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class ReadOnly(CodellmError):
    """The registry is mounted read-only here (a serving replica): pulls, creates and deletes go to its writer."""

    status = 403
    type = "permission_error"
    code = "read_only_registry"


class InsufficientMemory(CodellmError):
    """A model does not fit beside the busy ones; retrying at once cannot help."""

    status = 507
    type = "server_error"
    code = "insufficient_memory"


class DownloadError(CodellmError):
    """The hub could not give us what we asked for, or gave corrupt data."""

    status = 502
    type = "server_error"
    code = "download_failed"


class Corrupt(CodellmError):
    code = "corrupt_blob"


def disk_full(exc: BaseException) -> str | None:
    """One line for a write that found no room (disk or quota full), naming the file; None for other errors.
    Whatever was stored before it stays intact: blobs and manifests are only ever replaced whole."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {exc.filename}" if exc.filename else ""
        return (f"no space left on the device{where}: free some space (codellm prune, codellm rm, or elsewhere on "
                "that disk) and run it again; what was stored before is intact")
    return None
