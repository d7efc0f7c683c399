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
    """``read_only``: nothing is written; good hashes are remembered in memory instead of in ``.verified/``."""

    def __init__(self, root: Path, *, read_only: bool = False):
        self.root = Path(root)
        self.read_only = read_only
        self._good: dict[str, str] = {}  # read-only: digest -> the stamp it had when last hashed good
        if not read_only:
            self.root.mkdir(parents=True, exist_ok=True)

    def _writable(self) -> None:
        if self.read_only:
            from codellm.errors import ReadOnly

            raise ReadOnly(f"the blob store at {self.root} is read-only here (CODELLM_READ_ONLY)")

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
            self._mark(digest)
            return True
        if not self.read_only:
            path.unlink(missing_ok=True)
        return False

    # A blob's last good hash is recorded with the size and modification time it had then (``.verified/``): a
    # blob whose size or mtime differs from its record, or that has none, is hashed again before it is used.
    def _record(self, digest: str) -> Path:
        return self.root / ".verified" / check_digest(digest).replace(":", "-")

    def _stamp(self, digest: str) -> str | None:
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return None
        return f"{st.st_size} {st.st_mtime_ns}"

    def _mark(self, digest: str) -> None:
        stamp = self._stamp(digest)
        if stamp is None:
            return
        if self.read_only:
            self._good[digest] = stamp
            return
        record = self._record(digest)
        try:
            record.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=".tmp-")
            with os.fdopen(fd, "w") as fh:
                fh.write(stamp)
            os.replace(tmp, record)
        except OSError:  # a read-only or full registry: verification simply happens again next time
            pass

    def check(self, digest: str, size: int | None = None, *, force: bool = False) -> None:
        """Raise Corrupt unless the blob is intact: hashed again where it changed since its last good hash (or
        always, with ``force``). Unlike ``verify``, a damaged blob is left where it is, for the user to see."""
        stamp = self._stamp(digest)
        if stamp is None:
            raise Corrupt(f"blob {digest[:19]} is missing from the blob store")
        if size is not None and int(stamp.split()[0]) != size:
            raise Corrupt(f"blob {digest[:19]} is damaged: {stamp.split()[0]} bytes, the manifest says {size}")
        try:
            known = self._record(digest).read_text()
        except OSError:
            known = None
        if (known == stamp or self._good.get(digest) == stamp) and not force:
            return
        if sha256_file(self.path(digest)) != digest:
            raise Corrupt(f"blob {digest[:19]} is damaged: its content no longer matches its sha256")
        self._mark(digest)

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def add_file(self, src: str | os.PathLike, *, move: bool = False, digest: str | None = None) -> tuple[str, int]:
        """Store a file under its sha256; returns (digest, size). Identical content is stored once."""
        self._writable()
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
        self._mark(digest)
        return digest, size

    def add_bytes(self, data: bytes) -> tuple[str, int]:
        self._writable()
        digest = sha256_bytes(data)
        dest = self.path(digest)
        if not dest.is_file():
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._mark(digest)
        return digest, len(data)

    def writer(self, digest: str) -> "BlobWriter":
        """A blob written piece by piece (an upload) that must hash to ``digest``: nothing is in the store until
        ``commit``, and a failed or abandoned write leaves nothing behind."""
        self._writable()
        return BlobWriter(self, check_digest(digest))

    def read_bytes(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def remove(self, digest: str) -> None:
        self._writable()
        self.path(digest).unlink(missing_ok=True)
        self._record(digest).unlink(missing_ok=True)

    def digests(self) -> set[str]:
        return {p.name.replace("-", ":", 1) for p in self.root.glob("sha256-*") if p.is_file()}


class BlobWriter:
    def __init__(self, store: BlobStore, digest: str):
        self.store, self.digest = store, digest
        fd, self.tmp = tempfile.mkstemp(dir=store.root, prefix=".tmp-")
        self.fh = os.fdopen(fd, "wb")
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.fh.write(data)
        self.size += len(data)

    def commit(self) -> int:
        """Into the store under its digest, if the content matches it; its size."""
        self.fh.close()
        got = "sha256:" + self.hash.hexdigest()
        if got != self.digest:
            self.abort()
            raise Corrupt(f"the content's digest is {got}, not {self.digest}")
        os.replace(self.tmp, self.store.path(self.digest))
        self.store._mark(self.digest)
        return self.size

    def abort(self) -> None:
        self.fh.close()
        Path(self.tmp).unlink(missing_ok=True)
