"""Pull models from the Hugging Face hub into the registry.

huggingface_hub does the transfer (HF_ENDPOINT, HF_TOKEN, resumable ``.incomplete`` files, retries);
this module chooses the files, verifies each one against the hub's checksum (LFS sha256, or git
sha1 for small files), stores it as a blob, and writes the manifest last. A pull holds a lock per
repo and revision, so two pulls of one model at once both succeed and store it once.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import os

from codellm.errors import DownloadError, InvalidName, NotFound, Refused
from codellm.registry import catalog, describe
from codellm.registry import manifest as mt
from codellm.registry.blobs import git_blob_sha1, sha256_file
from codellm.registry.names import ModelName
from codellm.registry.store import Entry, Registry


class Progress(Protocol):
    """What a pull reports; the CLI draws bars from it, the server streams it as NDJSON."""

    def status(self, message: str) -> None: ...
    def start(self, files: list["RemoteFile"]) -> None: ...
    def advance(self, file: "RemoteFile", nbytes: int) -> None: ...
    def done(self, file: "RemoteFile") -> None: ...


class SilentProgress:
    def status(self, message: str) -> None: ...
    def start(self, files: list["RemoteFile"]) -> None: ...
    def advance(self, file: "RemoteFile", nbytes: int) -> None: ...
    def done(self, file: "RemoteFile") -> None: ...


@dataclass
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files
    git_oid: str | None  # other files
    media_type: str

    @property
    def digest(self) -> str | None:
        return f"sha256:{self.sha256}" if self.sha256 else None


@dataclass
class PullSpec:
    repo: str
    name: ModelName
    revision: str | None = None


def resolve(spec: str, revision: str | None = None) -> PullSpec:
    """``qwen2.5-coder:1.5b`` (catalog) or ``Org/Repo[:tag]`` (hub repo id) -> what to pull and store as."""
    found = catalog.lookup(spec) if "/" not in spec else None
    if found:
        name, entry = found
        return PullSpec(entry.repo, name, revision)
    if "/" not in spec:
        known = ", ".join(sorted({k.split(":")[0] for k in catalog.CATALOG}))
        raise NotFound(f"unknown model '{spec}': not in the catalog ({known}); pull a hub repo as org/name")
    repo, _, tag = spec.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise InvalidName(f"invalid hub repo id {repo!r}: expected org/name")
    return PullSpec(repo, ModelName.parse(f"{repo}:{tag or 'latest'}"), revision)


def _select(files: list[RemoteFile], *, allow_pickle: bool, trust_remote_code: bool, repo: str) -> list[RemoteFile]:
    top = [f for f in files if "/" not in f.path]
    chosen = [f for f in top if f.media_type != mt.WEIGHTS and (f.media_type != mt.CODE or trust_remote_code)]
    safetensors = [f for f in top if f.media_type == mt.WEIGHTS and not describe.is_pickle(f.path)]
    pickles = [f for f in top if f.media_type == mt.WEIGHTS and describe.is_pickle(f.path)]
    if safetensors:
        chosen += safetensors
    elif pickles:
        if not allow_pickle:
            raise Refused(
                f"{repo} has only pickle weights ({', '.join(f.path for f in pickles[:3])}); "
                "pickle can run arbitrary code when loaded: pass --allow-pickle to accept them"
            )
        chosen += [f for f in pickles if f.path.startswith("pytorch_model")] or pickles
    elif not any(f.media_type == mt.ADAPTER for f in top):
        raise DownloadError(f"{repo} has no safetensors weights")
    return chosen


CHUNK = 1 << 20


def download(url: str, dest: Path, *, headers: dict, size: int, on_bytes: Callable[[int], None], attempts: int = 3) -> None:
    """GET ``url`` into ``dest``, resuming from a ``dest.partial`` left by an earlier (killed) run.

    huggingface_hub downloads into a fresh per-process temp file and resumes only within one process;
    a pull must survive being killed, so the ranged transfer is ours. Each chunk is flushed to disk
    as it arrives, so a kill loses at most one chunk.
    """
    import httpx

    partial = dest.with_name(dest.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:
            partial.unlink()
            have = 0
        if have:
            on_bytes(have)
        if have == size:
            break
        request_headers = {**headers, **({"Range": f"bytes={have}-"} if have else {})}
        try:
            with httpx.stream("GET", url, headers=request_headers, follow_redirects=True, timeout=httpx.Timeout(30, read=120)) as resp:
                if resp.status_code == 416:  # nothing left to send: start over
                    partial.unlink(missing_ok=True)
                    on_bytes(-have)
                    continue
                if resp.status_code not in (200, 206):
                    raise DownloadError(f"HTTP {resp.status_code} for {url}")
                mode = "ab" if resp.status_code == 206 else "wb"
                if mode == "wb" and have:
                    on_bytes(-have)  # the server ignored our Range: count from zero again
                with open(partial, mode) as fh:
                    for chunk in resp.iter_bytes(CHUNK):
                        fh.write(chunk)
                        fh.flush()
                        on_bytes(len(chunk))
        except httpx.HTTPError as exc:
            got = partial.stat().st_size if partial.exists() else 0
            on_bytes(-got)
            if attempt == attempts:
                raise DownloadError(f"downloading {url} failed: {_first_line(exc)}") from exc
            continue
        if partial.stat().st_size == size:
            break
        on_bytes(-partial.stat().st_size)
    else:
        raise DownloadError(f"downloading {url} failed after {attempts} attempts")
    os.replace(partial, dest)


def pull(
    registry: Registry,
    spec: str,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    progress: Progress | None = None,
) -> Entry:
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    from codellm import __version__
    from huggingface_hub.errors import (
        GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    registry.writable()
    progress = progress or SilentProgress()
    target = resolve(spec, revision)
    api = HfApi(endpoint=endpoint, token=token)
    headers = build_hf_headers(token=token, library_name="codellm", library_version=__version__)
    progress.status(f"pulling manifest of {target.repo}")
    try:
        info = api.model_info(target.repo, revision=target.revision)
        sha = _check_remote(_SHA1, info.sha, f"commit id of {target.repo}")  # it becomes part of a path
        tree = list(api.list_repo_tree(target.repo, revision=sha, recursive=True))
    except GatedRepoError as exc:
        raise DownloadError(f"{target.repo} is gated: accept its license on the hub and set HF_TOKEN") from exc
    except RepositoryNotFoundError as exc:
        raise NotFound(f"hub repo {target.repo} not found (or private: set HF_TOKEN)") from exc
    except RevisionNotFoundError as exc:
        raise NotFound(f"revision {target.revision!r} of {target.repo} not found") from exc
    except DownloadError:
        raise
    except Exception as exc:  # transport errors come from huggingface_hub's own httpx fork
        if getattr(getattr(exc, "response", None), "status_code", None) == 404:
            raise NotFound(f"hub repo {target.repo} not found (or private: set HF_TOKEN)") from exc
        raise DownloadError(f"cannot reach the hub for {target.repo}: {_first_line(exc)}") from exc

    is_adapter = any(getattr(f, "path", "") == "adapter_config.json" for f in tree)
    remote = []
    for item in tree:
        path = getattr(item, "path", None)
        if not isinstance(path, str) or any(part in ("", ".", "..") for part in path.split("/")) or "\\" in path \
                or "\0" in path:
            raise DownloadError(f"the hub sent an invalid path in {target.repo}: {str(path)[:80]!r}")
        if not hasattr(item, "size"):
            continue  # a folder
        media = describe.media_type_of(item.path.rsplit("/", 1)[-1], adapter=is_adapter)
        if media is None or "/" in item.path:
            continue  # only the repo's top-level files are ever taken
        remote.append(_remote_file(item, media, target.repo))
    chosen = _select(remote, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, repo=target.repo)

    staging = registry.home / "downloads" / _SAFE_PART.sub("-", target.repo.replace("/", "--")) / sha
    if not staging.resolve().is_relative_to((registry.home / "downloads").resolve()):
        raise DownloadError(f"refusing to stage {target.repo} outside the registry")
    with registry.lock(f"pull:{target.repo}@{sha}"):
        staging.mkdir(parents=True, exist_ok=True)
        progress.start(chosen)

        def fetch(f: RemoteFile) -> Path:
            if f.digest and registry.blobs.verify(f.digest):  # already stored (and intact)
                progress.advance(f, f.size)
                progress.done(f)
                return registry.blobs.path(f.digest)
            dest = staging / f.path
            if dest.is_file() and _verified(dest, f):  # finished by a pull that was stopped later
                progress.advance(f, f.size)
                progress.done(f)
                return dest
            url = hf_hub_url(target.repo, f.path, revision=sha, endpoint=endpoint)
            for attempt in (1, 2):
                download(url, dest, headers=headers, size=f.size, on_bytes=lambda n, f=f: progress.advance(f, n))
                if _verified(dest, f):
                    progress.done(f)
                    return dest
                progress.advance(f, -f.size)
                dest.unlink(missing_ok=True)  # corrupt: fetch it again, once
                if attempt == 2:
                    raise DownloadError(f"{f.path} from {target.repo} failed its checksum twice")
            raise AssertionError("unreachable")

        # small files first: config.json and tokenizer_config.json decide whether remote code is needed,
        # and that is refused before any weights are downloaded
        by_name: dict[str, Path] = {}
        heavy = (mt.WEIGHTS, mt.ADAPTER, mt.CODE)
        for f in [f for f in chosen if f.media_type not in heavy]:
            by_name[f.path] = fetch(f)
        if not trust_remote_code and describe.needs_remote_code(
            _read(by_name.get("config.json")), _read(by_name.get("tokenizer_config.json"))
        ):
            raise Refused(f"{target.repo} needs custom code from its repo (auto_map): "
                          "pass --trust-remote-code if you trust it")
        for f in [f for f in chosen if f.media_type in heavy]:
            by_name[f.path] = fetch(f)

        progress.status("verifying sha256 digest")  # Ollama's status lines, which its clients show as they are
        config = describe.describe(by_name, source=target.repo, revision=sha)  # family and FIM from the catalog
        config.trust_remote_code = trust_remote_code
        layers = []
        with registry.lock("gc"):  # blobs and the manifest naming them land together: prune never sees them apart
            for f in chosen:
                digest, size = registry.blobs.add_file(by_name[f.path], move=by_name[f.path].is_relative_to(staging),
                                                       digest=f.digest)
                layers.append(mt.Layer(f.media_type, digest, size, f.path))
            progress.status("writing manifest")
            entry = registry.save(target.name, mt.Manifest(config=config, layers=layers))
        shutil.rmtree(staging, ignore_errors=True)
        progress.status("success")
        return entry


_SHA1 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")
_SAFE_PART = re.compile(r"[^A-Za-z0-9._-]")


def _check_remote(pattern: re.Pattern, value, what: str) -> str:
    """A value the hub sent that becomes part of a path or a digest: exactly of its form, or the pull stops."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise DownloadError(f"the hub sent an invalid {what}: {str(value)[:80]!r}")
    return value


def _remote_file(item, media: str, repo: str) -> RemoteFile:
    _check_remote(_FILE_NAME, item.path, f"file name in {repo}")
    if ".." in item.path:
        raise DownloadError(f"the hub sent an invalid file name in {repo}: {item.path[:80]!r}")
    if not isinstance(item.size, int) or isinstance(item.size, bool) or not 0 <= item.size < 1 << 42:
        raise DownloadError(f"the hub sent an invalid size for {item.path} in {repo}: {item.size!r}")
    lfs = getattr(item, "lfs", None)
    if lfs:
        return RemoteFile(item.path, item.size, _check_remote(_SHA256, lfs.sha256, f"sha256 for {item.path}"), None, media)
    return RemoteFile(item.path, item.size, None, _check_remote(_SHA1, item.blob_id, f"blob id for {item.path}"), media)


def _verified(path: Path, f: RemoteFile) -> bool:
    if path.stat().st_size != f.size:
        return False
    if f.sha256:
        return sha256_file(path) == f.digest
    if f.git_oid:
        return git_blob_sha1(path) == f.git_oid
    return True


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path and path.is_file() else None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
