"""The registry on disk: ``$CODELLM_HOME/{blobs,manifests,models}``.

Manifests live at ``manifests/<namespace>/<model>/<tag>`` and are always written last and atomically,
so a reader sees either the old model or the complete new one. ``models/<id>/`` is a directory of
symlinks into the blob store that transformers and peft load from, rebuilt on demand.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
from filelock import FileLock

from codellm.errors import Corrupt, InvalidRequest, NotFound, ReadOnly
from codellm.registry import manifest as mt
from codellm.registry.blobs import BlobStore, sha256_bytes
from codellm.registry.names import ModelName


def default_home() -> Path:
    return Path(os.environ.get("CODELLM_HOME") or Path.home() / ".codellm").expanduser()


@dataclass(frozen=True)
class Entry:
    name: ModelName
    manifest: mt.Manifest
    digest: str  # sha256 of the manifest bytes: the model's ID
    modified: float

    @property
    def id(self) -> str:
        return self.digest.split(":", 1)[1][:12]


def read_only_default() -> bool:
    return os.environ.get("CODELLM_READ_ONLY", "").strip().lower() in ("1", "true", "yes", "on")


class Registry:
    """``read_only`` (default: ``CODELLM_READ_ONLY``): the registry is only read, by a serving replica over a shared
    volume that one writer fills. Nothing is written under ``home`` then, not even a lock or a record of a good hash:
    writes raise ``ReadOnly``, and the directories of links that transformers loads from are made in this process's
    own temporary directory where the writer has not made them."""

    def __init__(self, home: str | os.PathLike | None = None, *, read_only: bool | None = None):
        self.home = Path(home) if home else default_home()
        self.read_only = read_only_default() if read_only is None else read_only
        self.blobs = BlobStore(self.home / "blobs", read_only=self.read_only)
        self.manifests = self.home / "manifests"
        self._views: Path | None = None  # read-only: where link directories go
        if not self.read_only:
            self.manifests.mkdir(parents=True, exist_ok=True)

    def writable(self) -> None:
        """Raise ``ReadOnly`` unless this registry may be written."""
        if self.read_only:
            raise ReadOnly(f"the registry at {self.home} is read-only here (CODELLM_READ_ONLY): pull, create, copy "
                           "and remove models where it is writable")

    # -- names and manifests -------------------------------------------------------------
    def _path(self, name: ModelName) -> Path:
        path = self.manifests.joinpath(*name.parts)
        if not path.resolve().is_relative_to(self.manifests.resolve()):
            raise InvalidRequest(f"invalid model name {name}")
        return path

    def lock(self, key: str) -> FileLock:
        self.writable()
        locks = self.home / "locks"
        locks.mkdir(exist_ok=True)
        return FileLock(str(locks / (sha256_bytes(key.encode())[7:23] + ".lock")))

    def exists(self, name: str | ModelName) -> bool:
        return os.path.isfile(self.manifest_path(name))

    def manifest_path(self, name: str | ModelName) -> str:
        """Where ``name``'s manifest is (checked to lie inside the registry): a caller that looks again and again
        whether a model is still there stats this, without resolving the name's path each time."""
        return str(self._path(_name(name)))

    def get(self, name: str | ModelName) -> Entry:
        parsed = _name(name)
        path = self._path(parsed)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"model '{parsed.short}' not found", param="model") from None
        return Entry(parsed, mt.Manifest.decode(data), sha256_bytes(data), path.stat().st_mtime)

    def save(self, name: str | ModelName, manifest: mt.Manifest) -> Entry:
        """Write a manifest atomically, after checking every layer it names is stored."""
        self.writable()
        parsed = _name(name)
        for layer in manifest.layers:
            if not self.blobs.has(layer.digest):
                raise InvalidRequest(f"layer {layer.digest} of {parsed.short} is missing from the blob store")
        path = self._path(parsed)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = manifest.encode()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:  # a full disk, say: the old manifest (or none) stays, and no half-written one
            Path(tmp).unlink(missing_ok=True)
            raise
        return Entry(parsed, manifest, sha256_bytes(data), path.stat().st_mtime)

    def list(self) -> list[Entry]:
        entries = []
        for path in sorted(self.manifests.glob("*/*/*")):
            if path.is_file() and not path.name.startswith("."):
                try:
                    name = ModelName(*path.relative_to(self.manifests).parts)
                    entries.append(self.get(name))
                except (ValueError, msgspec.DecodeError, NotFound):
                    continue
        return sorted(entries, key=lambda e: -e.modified)

    def copy(self, src: str | ModelName, dst: str | ModelName) -> Entry:
        return self.save(dst, self.get(src).manifest)

    def remove(self, name: str | ModelName) -> list[str]:
        """Delete a manifest, then every blob of it that no other manifest references."""
        entry = self.get(name)
        with self.lock("gc"):
            self._path(entry.name).unlink()
            self._prune_dirs(self._path(entry.name).parent)
            referenced = {layer.digest for other in self.list() for layer in other.manifest.layers}
            freed = []
            for layer in entry.manifest.layers:
                if layer.digest not in referenced and layer.digest not in freed:
                    self.blobs.remove(layer.digest)
                    freed.append(layer.digest)
        shutil.rmtree(self.home / "models" / entry.id, ignore_errors=True)
        return freed

    def prune(self, *, grace: float = 600.0, partial: bool = False) -> tuple[list[str], int]:
        """Delete blobs that no manifest names (left by a pull or create stopped before its manifest), and with
        ``partial`` the downloads a stopped pull left to resume from. Blobs newer than ``grace`` seconds are
        kept: a create in progress has written them and not yet its manifest. Returns (digests, bytes freed)."""
        now, freed, nbytes = time.time(), [], 0
        with self.lock("gc"):
            referenced = {layer.digest for entry in self.list() for layer in entry.manifest.layers}
            for path in self.blobs.root.iterdir():
                stray = path.name.startswith(".tmp-")
                if not (stray or path.name.startswith("sha256-")):
                    continue
                try:
                    stat = path.lstat()
                except FileNotFoundError:
                    continue
                digest = path.name.replace("-", ":", 1)
                if (stray or digest not in referenced) and now - stat.st_mtime > grace:
                    nbytes += stat.st_size
                    if stray:
                        path.unlink(missing_ok=True)
                    else:
                        self.blobs.remove(digest)
                        freed.append(digest)
            downloads = self.home / "downloads"
            if partial and downloads.is_dir():
                for path in downloads.rglob("*"):
                    if path.is_file():
                        nbytes += path.stat().st_size
                shutil.rmtree(downloads, ignore_errors=True)
        return freed, nbytes

    def _prune_dirs(self, directory: Path) -> None:
        for d in (directory, directory.parent):
            try:
                d.rmdir()
            except OSError:
                return

    def check(self, manifest: mt.Manifest, *, name: str = "", force: bool = False,
              media_types: frozenset[str] | None = None) -> None:
        """Raise Corrupt naming the file and the fix unless every layer's blob is intact (see ``BlobStore.check``)."""
        for layer in manifest.layers:
            if media_types is not None and layer.media_type not in media_types:
                continue
            try:
                self.blobs.check(layer.digest, layer.size, force=force)
            except Corrupt as exc:
                what = f"{layer.filename or layer.media_type} of {name or 'this model'}"
                raise Corrupt(f"{what}: {exc.message}; pull or create the model again") from None

    # -- building manifests -------------------------------------------------------------
    def add_layer_bytes(self, media_type: str, data: bytes, filename: str | None = None) -> mt.Layer:
        digest, size = self.blobs.add_bytes(data)
        return mt.Layer(media_type, digest, size, filename)

    def add_layer_file(self, media_type: str, path: Path, filename: str | None = None) -> mt.Layer:
        digest, size = self.blobs.add_file(path)
        return mt.Layer(media_type, digest, size, filename or path.name)

    def read_layer(self, layer: mt.Layer) -> bytes:
        return self.blobs.read_bytes(layer.digest)

    def params(self, manifest: mt.Manifest) -> dict:
        layer = manifest.layer(mt.PARAMS)
        return msgspec.json.decode(self.read_layer(layer)) if layer else {}

    def text(self, manifest: mt.Manifest, media_type: str) -> str | None:
        layer = manifest.layer(media_type)
        return self.read_layer(layer).decode() if layer else None

    def messages(self, manifest: mt.Manifest) -> list[dict]:
        layer = manifest.layer(mt.MESSAGES)
        return msgspec.json.decode(self.read_layer(layer)) if layer else []

    # -- loadable directories -----------------------------------------------------------
    def model_dir(self, name: str | ModelName, media_types: frozenset[str] = mt.FILE_LAYERS - {mt.ADAPTER}) -> Path:
        """A directory of the model's files (symlinks into the blob store) for transformers to load."""
        entry = self.get(name)
        return self.files_dir(entry.manifest, media_types, key=entry.id)

    def files_dir(self, manifest: mt.Manifest, media_types: frozenset[str], key: str) -> Path:
        root = self.home / "models"
        target = root / f"{key}-{sha256_bytes(','.join(sorted(media_types)).encode())[7:15]}"
        if target.is_dir():
            return target
        if self.read_only:
            if self._views is None:
                self._views = Path(tempfile.mkdtemp(prefix="codellm-views-"))
            root, target = self._views, self._views / target.name
            if target.is_dir():
                return target
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        try:
            for layer in manifest.layers:
                if layer.media_type in media_types and layer.filename:
                    link = tmp / Path(layer.filename).name
                    if not link.exists():
                        os.symlink(self.blobs.path(layer.digest), link)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.replace(tmp, target)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def adapter_dir(self, name: str | ModelName) -> Path:
        entry = self.get(name)
        return self.files_dir(entry.manifest, frozenset({mt.ADAPTER}), key=entry.id)


def _name(name: str | ModelName) -> ModelName:
    return name if isinstance(name, ModelName) else ModelName.parse(name)


def age(seconds_since_epoch: float) -> str:
    """'3 minutes ago' as Ollama prints it."""
    delta = max(0, time.time() - seconds_since_epoch)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if delta >= size:
            n = int(delta // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "Less than a minute ago" if delta >= 1 else "Just now"


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
