"""Fetch the real vocabularies and chat templates that tests build tiny models on (not kept in git).

llama.cpp vendors them, and the ``llama-cpp-python`` source distribution on PyPI carries llama.cpp: its
``models/ggml-vocab-*.gguf`` are real tokenizers (with llama.cpp's tokenization test vectors beside them) and its
``models/templates/*.jinja`` real chat templates. Only the files the tests use are kept, under ``tests/.assets``.
Nothing is compiled or installed. Run by ``scripts/setup.sh``; again it does nothing.
"""

from __future__ import annotations

import hashlib
import sys
import tarfile
import tempfile
from pathlib import Path

import httpx

VERSION = "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VOCABS = ["qwen2", "llama-bpe", "llama-spm", "deepseek-coder", "starcoder", "phi-3"]
TEMPLATES = [
    "Qwen-Qwen2.5-7B-Instruct", "Qwen3-Coder", "meta-llama-Llama-3.2-3B-Instruct", "meta-llama-Llama-3.1-8B-Instruct",
    "unsloth-mistral-Devstral-Small-2507", "mistralai-Mistral-Nemo-Instruct-2407",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use", "microsoft-Phi-3.5-mini-instruct",
]
ROOT = Path(__file__).resolve().parent.parent / "tests" / ".assets" / "llama.cpp"


def wanted(member: str) -> str | None:
    """The path under ROOT of an archive member the tests use, else None."""
    parts = member.split("/")
    if len(parts) < 4 or parts[-3:-1] not in (["llama.cpp", "models"], ["models", "templates"]):
        return None
    name = parts[-1]
    if parts[-2] == "templates":
        return f"templates/{name}" if name.removesuffix(".jinja") in TEMPLATES else None
    for vocab in VOCABS:
        if name in (f"ggml-vocab-{vocab}.gguf", f"ggml-vocab-{vocab}.gguf.inp", f"ggml-vocab-{vocab}.gguf.out"):
            return f"vocab/{name}"
    return None


def download(target: Path) -> None:
    """The sdist, found through PyPI's simple index and checked against the digest pinned here."""
    index = httpx.get("https://pypi.org/simple/llama-cpp-python/", timeout=60, follow_redirects=True,
                      headers={"Accept": "application/vnd.pypi.simple.v1+json"}).raise_for_status().json()
    url = next(f["url"] for f in index["files"] if f["filename"] == f"llama_cpp_python-{VERSION}.tar.gz")
    digest = hashlib.sha256()
    with httpx.stream("GET", url, timeout=120, follow_redirects=True) as r, target.open("wb") as out:
        r.raise_for_status()
        for chunk in r.iter_bytes(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != SHA256:
        raise SystemExit(f"{url}: sha256 {digest.hexdigest()}, expected {SHA256}")


def main() -> int:
    stamp = ROOT / "VERSION"
    if stamp.is_file() and stamp.read_text().strip() == VERSION:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching llama.cpp's vocabularies and templates (llama-cpp-python {VERSION} sdist, ~77 MB)", flush=True)
        archive = Path(tmp) / "sdist.tar.gz"
        download(archive)
        ROOT.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            for member in tar:
                target = wanted(member.name) if member.isfile() else None
                if target:
                    out = ROOT / target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(tar.extractfile(member).read())
    missing = [v for v in VOCABS if not (ROOT / f"vocab/ggml-vocab-{v}.gguf").is_file()] + \
        [t for t in TEMPLATES if not (ROOT / f"templates/{t}.jinja").is_file()]
    if missing:
        print(f"not in the archive: {', '.join(missing)}", file=sys.stderr)
        return 1
    stamp.write_text(VERSION + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
