"""API keys: one from ``--api-key`` / ``CODELLM_API_KEY``, or several, each with a name, from a key file.

A key file holds one key a line, ``NAME KEY`` (or a bare ``KEY``, named ``key-<line>``); blank lines and ``#``
comments are skipped. It is read again when it changes, so keys are added and revoked without a restart.
Keys are compared as SHA-256 digests with ``hmac.compare_digest`` against every key: how long a check takes
says nothing of how much of a key was right, nor of its length. Logs name the key, never show it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
import threading
from pathlib import Path

log = logging.getLogger("codellm.server")
_NAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,64}$")


class KeyFileError(ValueError):
    pass


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse(text: str, source: str = "key file") -> dict[str, bytes]:
    """{name: digest of its key}. Pure: a bad line is a ``KeyFileError`` naming the line, never the key."""
    keys: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) == 1:
            name, key = f"key-{number}", parts[0]
        elif len(parts) == 2:
            name, key = parts
        else:
            raise KeyFileError(f"{source}, line {number}: expected 'NAME KEY' or 'KEY'")
        if not _NAME.match(name):
            raise KeyFileError(f"{source}, line {number}: a key name is 1-64 letters, digits or _.@:-")
        if len(key) < 8:
            raise KeyFileError(f"{source}, line {number}: key {name!r} is shorter than 8 characters")
        if name in keys:
            raise KeyFileError(f"{source}, line {number}: key name {name!r} appears twice")
        keys[name] = _digest(key)
    return keys


class KeyRing:
    """The keys that open the API; empty means no key is asked for."""

    def __init__(self, key: str | None = None, path: str | os.PathLike | None = None):
        self._fixed = {"default": _digest(key)} if key else {}
        self.path = Path(path) if path else None
        self._file: dict[str, bytes] = {}
        self._seen: tuple | None = None
        self._lock = threading.Lock()
        if self.path is not None:
            self._load(strict=True)

    @property
    def required(self) -> bool:
        self._refresh()
        return bool(self._fixed or self._file)

    def match(self, token: str) -> str | None:
        """The name of the key ``token`` is, or None."""
        self._refresh()
        given, found = _digest(token), None
        for name, digest in (*self._fixed.items(), *self._file.items()):
            if hmac.compare_digest(given, digest) and found is None:
                found = name
        return found

    def _signature(self) -> tuple | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _refresh(self) -> None:
        if self.path is not None and self._signature() != self._seen:
            self._load(strict=False)

    def _load(self, strict: bool) -> None:
        """Strict at start (a bad file stops the server); later, a bad edit keeps the keys that were good, and is
        logged once."""
        with self._lock:
            self._seen = self._signature()
            try:
                keys = parse(self.path.read_text(), str(self.path))
                if not keys:
                    raise KeyFileError(f"{self.path} holds no keys")
            except (OSError, UnicodeDecodeError, KeyFileError) as exc:
                if strict:
                    raise KeyFileError(f"cannot use the key file: {exc}") from exc
                log.error("key file not reloaded, the keys read before stay: %s", exc)
                return
            self._file = keys
            if self.path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
                log.warning("key file %s can be read by other users (chmod 600 it)", self.path)
