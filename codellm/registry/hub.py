"""Pull models from the Hugging Face hub into the registry.

huggingface_hub does the transfer (HF_ENDPOINT, HF_TOKEN, resumable ``.incomplete`` files, retries);
this module chooses the files, verifies each one against the hub's checksum (LFS sha256, or git
sha1 for small files), stores it as a blob, and writes the manifest last. A pull holds a lock per
repo and revision, so two pulls of one model at once both succeed and store it once.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from tqdm.auto import tqdm as _tqdm

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
    family: str | None = None
    revision: str | None = None
    extra: dict = field(default_factory=dict)


def resolve(spec: str, revision: str | None = None) -> PullSpec:
    """``qwen2.5-coder:1.5b`` (catalog) or ``Org/Repo[:tag]`` (hub repo id) -> what to pull and store as."""
    found = catalog.lookup(spec) if "/" not in spec else None
    if found:
        name, entry = found
        return PullSpec(entry.repo, name, entry.family, revision)
    if "/" not in spec:
        known = ", ".join(sorted({k.split(":")[0] for k in catalog.CATALOG}))
        raise NotFound(f"unknown model '{spec}': not in the catalog ({known}); pull a hub repo as org/name")
    repo, _, tag = spec.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise InvalidName(f"invalid hub repo id {repo!r}: expected org/name")
    return PullSpec(repo, ModelName.parse(f"{repo}:{tag or 'latest'}"), None, revision)


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


def _bar_class(hook: Callable[[int], None], visible: bool) -> type:
    """A tqdm class for huggingface_hub's per-file bar that forwards byte counts to ``hook``."""

    class FileBar(_tqdm):
        def __init__(self, *args, **kwargs):
            if not visible:
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if n:
                hook(n)
            return super().update(n) if not self.disable else None

    return FileBar


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
    show_file_bars: bool = False,
) -> Entry:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    progress = progress or SilentProgress()
    target = resolve(spec, revision)
    api = HfApi(endpoint=endpoint, token=token)
    progress.status(f"pulling manifest of {target.repo}")
    try:
        info = api.model_info(target.repo, revision=target.revision)
        sha = info.sha
        tree = list(api.list_repo_tree(target.repo, revision=sha, recursive=True))
    except GatedRepoError as exc:
        raise DownloadError(f"{target.repo} is gated: accept its license on the hub and set HF_TOKEN") from exc
    except RepositoryNotFoundError as exc:
        raise NotFound(f"hub repo {target.repo} not found (or private: set HF_TOKEN)") from exc
    except RevisionNotFoundError as exc:
        raise NotFound(f"revision {target.revision!r} of {target.repo} not found") from exc
    except Exception as exc:  # transport errors come from huggingface_hub's own httpx fork
        raise DownloadError(f"cannot reach the hub for {target.repo}: {_first_line(exc)}") from exc

    is_adapter = any(getattr(f, "path", "") == "adapter_config.json" for f in tree)
    remote = []
    for item in tree:
        if not hasattr(item, "size"):
            continue  # a folder
        media = describe.media_type_of(item.path.rsplit("/", 1)[-1], adapter=is_adapter)
        if media is None:
            continue
        lfs = getattr(item, "lfs", None)
        remote.append(RemoteFile(item.path, item.size, lfs.sha256 if lfs else None, None if lfs else item.blob_id, media))
    chosen = _select(remote, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, repo=target.repo)

    staging = registry.home / "downloads" / target.repo.replace("/", "--") / sha
    with registry.lock(f"pull:{target.repo}@{sha}"):
        staging.mkdir(parents=True, exist_ok=True)
        progress.start(chosen)

        def fetch(f: RemoteFile) -> Path:
            if f.digest and registry.blobs.verify(f.digest):  # already stored (and intact)
                progress.advance(f, f.size)
                progress.done(f)
                return registry.blobs.path(f.digest)
            for attempt in (1, 2):
                bar = _bar_class(lambda n, f=f: progress.advance(f, n), show_file_bars)
                try:
                    local = Path(hf_hub_download(
                        target.repo, f.path, revision=sha, local_dir=staging, endpoint=endpoint,
                        token=token, tqdm_class=bar,
                    ))
                except Exception as exc:
                    raise DownloadError(f"downloading {f.path} from {target.repo} failed: {_first_line(exc)}") from exc
                if _verified(local, f):
                    progress.done(f)
                    return local
                local.unlink(missing_ok=True)  # corrupt: fetch it again, once
                _forget_local_metadata(staging, f.path)
                if attempt == 2:
                    raise DownloadError(f"{f.path} from {target.repo} failed its checksum twice")
            raise AssertionError("unreachable")

        # config files first: they decide whether remote code is needed
        by_name: dict[str, Path] = {}
        for f in sorted(chosen, key=lambda f: f.media_type not in (mt.CONFIG, mt.TOKENIZER)):
            if f.media_type in (mt.WEIGHTS, mt.ADAPTER, mt.CODE) and not by_name.get("__checked__"):
                by_name["__checked__"] = Path()
                if not trust_remote_code and describe.needs_remote_code(
                    _read(by_name.get("config.json")), _read(by_name.get("tokenizer_config.json"))
                ):
                    raise Refused(
                        f"{target.repo} needs custom code from its repo (auto_map): "
                        "pass --trust-remote-code if you trust it"
                    )
            by_name[f.path] = fetch(f)
        by_name.pop("__checked__", None)
        if not trust_remote_code and describe.needs_remote_code(
            _read(by_name.get("config.json")), _read(by_name.get("tokenizer_config.json"))
        ):
            raise Refused(f"{target.repo} needs custom code from its repo (auto_map): pass --trust-remote-code")

        progress.status("verifying sha256 digests and writing manifest")
        config = describe.describe(by_name, source=target.repo, revision=sha)
        if target.family and config.fim is None and catalog.FIM.get(target.family):
            specials = catalog.special_tokens_of(_read(by_name.get("tokenizer.json")), _read(by_name.get("tokenizer_config.json")))
            fim = catalog.FIM[target.family]
            if fim.prefix.strip() in specials or target.family == "codellama":
                config.fim = fim
        config.family = target.family or config.family
        config.trust_remote_code = trust_remote_code
        layers = []
        for f in chosen:
            digest, size = registry.blobs.add_file(by_name[f.path], move=by_name[f.path].is_relative_to(staging), digest=f.digest)
            layers.append(mt.Layer(f.media_type, digest, size, f.path))
        entry = registry.save(target.name, mt.Manifest(config=config, layers=layers))
        shutil.rmtree(staging, ignore_errors=True)
        progress.status("success")
        return entry


def _verified(path: Path, f: RemoteFile) -> bool:
    if path.stat().st_size != f.size:
        return False
    if f.sha256:
        return sha256_file(path) == f.digest
    if f.git_oid:
        return git_blob_sha1(path) == f.git_oid
    return True


def _forget_local_metadata(staging: Path, filename: str) -> None:
    meta = staging / ".cache" / "huggingface" / "download"
    for suffix in (".metadata", ".lock"):
        (meta / (filename + suffix)).unlink(missing_ok=True)


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path and path.is_file() else None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
