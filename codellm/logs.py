"""Logs as text or as one JSON object a line (``--log-format json``, for log shippers), every record made while a
request is handled carrying its ``request_id``. Engine processes inherit the format through the environment."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from datetime import datetime, timezone

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

FIELDS = ("request_id", "method", "path", "status", "duration_ms", "key", "client")


class _RequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        key = getattr(record, "key", None)
        return line + (f" [{rid}]" if rid else "") + (f" key={key}" if key else "")


def configure(level: str | int = "info", fmt: str | None = None) -> None:
    """One handler on the root logger (uvicorn's loggers propagate to it: it is started with no config of its own).
    ``fmt``: text or json (default: ``CODELLM_LOG_FORMAT``, else text)."""
    fmt = fmt or os.environ.get("CODELLM_LOG_FORMAT") or "text"
    os.environ["CODELLM_LOG_FORMAT"] = fmt  # for engine processes started from here
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestId())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
