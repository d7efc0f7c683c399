"""Content-addressed blob store: ``blobs/sha256-<hex>``, written atomically, verified on demand."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from codellm.errors import Corrupt

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def git_blob_sha1(path: str | os.PathLike) -> str:
    """The git object id of a file: what the hub reports for files not stored in LFS."""
    size = os.path.getsize(path)
    h = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_digest(digest: str) -> str:
    if not _DIGEST.fullmatch(digest or ""):
        raise Corrupt(f"invalid blob digest {digest!r}")
    return digest


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / check_digest(digest).replace(":", "-")

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def verify(self, digest: str) -> bool:
        """Re-hash a blob; a corrupt one is deleted so the next pull fetches it again."""
        path = self.path(digest)
        if not path.is_file():
            return False
        if sha256_file(path) == digest:
            return True
        path.unlink(missing_ok=True)
        return False

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def add_file(self, src: str | os.PathLike, *, move: bool = False, digest: str | None = None) -> tuple[str, int]:
        """Store a file under its sha256; returns (digest, size). Identical content is stored once."""
        src = Path(src)
        digest = digest or sha256_file(src)
        size = src.stat().st_size
        dest = self.path(digest)
        if dest.is_file() and dest.stat().st_size == size:
            if move:
                src.unlink(missing_ok=True)
            return digest, size
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        os.close(fd)
        try:
            if move:
                shutil.move(str(src), tmp)
            else:
                shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest, size

    def add_bytes(self, data: bytes) -> tuple[str, int]:
        digest = sha256_bytes(data)
        dest = self.path(digest)
        if not dest.is_file():
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, dest)
        return digest, len(data)

    def read_bytes(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def digests(self) -> set[str]:
        return {p.name.replace("-", ":", 1) for p in self.root.glob("sha256-*") if p.is_file()}
