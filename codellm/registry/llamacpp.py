"""llama.cpp's own converter (``convert_hf_to_gguf.py`` with its ``conversion`` package and ``gguf-py``), for GGUF
exports: taken from the ``llama-cpp-python`` source distribution on PyPI, pinned by version and sha256, and kept
under ``$CODELLM_HOME/tools``. Nothing is compiled. A llama.cpp checkout (or that sdist) can be named instead.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

from codellm.errors import CodellmError, DownloadError, InvalidRequest

VERSION = "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def download_sdist(target: Path, progress: Callable[[int, int], None] = lambda done, total: None) -> Path:
    """The pinned sdist, found through PyPI's simple index, written to ``target`` only when its digest matches."""
    import httpx

    index = httpx.get("https://pypi.org/simple/llama-cpp-python/", timeout=60, follow_redirects=True,
                      headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    index.raise_for_status()
    url = next((f["url"] for f in index.json()["files"] if f["filename"] == SDIST), None)
    if url is None:
        raise DownloadError(f"PyPI lists no {SDIST}")
    digest = hashlib.sha256()
    part = target.with_name(target.name + ".part")
    with httpx.stream("GET", url, timeout=120, follow_redirects=True) as r, part.open("wb") as out:
        r.raise_for_status()
        total, done = int(r.headers.get("content-length") or 0), 0
        for chunk in r.iter_bytes(1 << 20):
            digest.update(chunk)
            out.write(chunk)
            done += len(chunk)
            progress(done, total)
    if digest.hexdigest() != SHA256:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{SDIST}: sha256 {digest.hexdigest()}, expected {SHA256}")
    os.replace(part, target)
    return target


def extract(sdist: Path, into: Path, wanted: Callable[[list[str]], str | None]) -> None:
    """Each regular file of the archive for which ``wanted(parts of its path)`` names a path under ``into``."""
    root = into.resolve()
    with tarfile.open(sdist) as tar:
        for member in tar:
            if not member.isfile():
                continue
            rel = wanted(member.name.split("/"))
            if rel is None:
                continue
            out = (root / rel).resolve()
            if not out.is_relative_to(root):
                raise InvalidRequest(f"{sdist.name}: member {member.name!r} leaves the directory")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())


def converter_member(parts: list[str]) -> str | None:
    """vendor/llama.cpp/{convert_hf_to_gguf.py, conversion/..., gguf-py/...} -> the same path under the tool dir."""
    if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or ".." in parts:
        return None
    rel = "/".join(parts[3:])
    return rel if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in CONVERTER_PARTS) else None


def converter(home: Path, source: str | os.PathLike | None = None, *,
              status: Callable[[str], None] = lambda s: None) -> Path:
    """A directory holding ``convert_hf_to_gguf.py`` and ``gguf-py``: ``source`` (a llama.cpp checkout, or the sdist),
    else the one kept under ``home/tools``, fetched from PyPI the first time."""
    if source is not None:
        source = Path(source)
        if source.is_dir():
            if not (source / "convert_hf_to_gguf.py").is_file() or not (source / "gguf-py").is_dir():
                raise InvalidRequest(f"{source} holds no convert_hf_to_gguf.py and gguf-py (a llama.cpp checkout)")
            return source
        sdist = source
    else:
        sdist = None
    tools = home / "tools" / f"llama.cpp-{VERSION}"
    if (tools / "convert_hf_to_gguf.py").is_file():
        return tools
    tools.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tools.parent, prefix=".tmp-") as tmp:
        if sdist is None:
            status(f"fetching llama.cpp's converter ({SDIST} from PyPI, ~77 MB)")
            sdist = download_sdist(Path(tmp) / SDIST)
        staged = Path(tmp) / "tool"
        extract(sdist, staged, converter_member)
        if not (staged / "convert_hf_to_gguf.py").is_file():
            raise InvalidRequest(f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        try:
            os.replace(staged, tools)
        except OSError:  # another export put it there first
            pass
    return tools


def convert(tool: Path, model_dir: Path, out: Path, outtype: str = "auto",
            status: Callable[[str], None] = lambda s: None) -> Path:
    """Run the converter on a Hugging Face directory; ``out`` (a .gguf) appears whole or not at all."""
    try:
        import sentencepiece  # noqa: F401 (the converter imports it before it looks at the tokenizer)
    except ImportError:
        raise CodellmError("GGUF export needs sentencepiece: pip install 'codellm[gguf]'") from None
    part = out.with_name(out.name + ".part")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tool / "gguf-py"), str(tool),
                                                        os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "NO_LOCAL_GGUF": ""}
    cmd = [sys.executable, str(tool / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(part),
           "--outtype", outtype]
    status(f"converting with llama.cpp's convert_hf_to_gguf.py (--outtype {outtype})")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not part.is_file():
        part.unlink(missing_ok=True)
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise CodellmError(f"llama.cpp's converter failed:\n{tail}")
    os.replace(part, out)
    return out


