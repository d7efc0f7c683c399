"""Fetch the real vocabularies and chat templates that tests build tiny models on (not kept in git).

llama.cpp vendors them, and the ``llama-cpp-python`` source distribution on PyPI carries llama.cpp: its
``models/ggml-vocab-*.gguf`` are real tokenizers (with llama.cpp's tokenization test vectors beside them) and its
``models/templates/*.jinja`` real chat templates, and its ``convert_hf_to_gguf.py`` the converter that GGUF exports
run. Only the files the tests use are kept, under ``tests/.assets``. Nothing is compiled or installed. Run by
``scripts/setup.sh``; again it does nothing.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from codellm.registry import llamacpp

VERSION = llamacpp.VERSION
STAMP = f"{VERSION} vocab templates convert"
VOCABS = ["qwen2", "llama-bpe", "llama-spm", "deepseek-coder", "starcoder", "phi-3"]
TEMPLATES = [
    "Qwen-Qwen2.5-7B-Instruct", "Qwen3-Coder", "meta-llama-Llama-3.2-3B-Instruct", "meta-llama-Llama-3.1-8B-Instruct",
    "unsloth-mistral-Devstral-Small-2507", "mistralai-Mistral-Nemo-Instruct-2407",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use", "microsoft-Phi-3.5-mini-instruct",
]
ROOT = Path(__file__).resolve().parent.parent / "tests" / ".assets" / "llama.cpp"


def wanted(parts: list[str]) -> str | None:
    """The path under ROOT of an archive member the tests use, else None."""
    converter = llamacpp.converter_member(parts)
    if converter is not None:
        return f"convert/{converter}"
    if len(parts) < 4 or parts[-3:-1] not in (["llama.cpp", "models"], ["models", "templates"]):
        return None
    name = parts[-1]
    if parts[-2] == "templates":
        return f"templates/{name}" if name.removesuffix(".jinja") in TEMPLATES else None
    for vocab in VOCABS:
        if name in (f"ggml-vocab-{vocab}.gguf", f"ggml-vocab-{vocab}.gguf.inp", f"ggml-vocab-{vocab}.gguf.out"):
            return f"vocab/{name}"
    return None


def main() -> int:
    stamp = ROOT / "VERSION"
    if stamp.is_file() and stamp.read_text().strip() == STAMP:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching llama.cpp's vocabularies and templates (llama-cpp-python {VERSION} sdist, ~77 MB)", flush=True)
        archive = llamacpp.download_sdist(Path(tmp) / llamacpp.SDIST)
        llamacpp.extract(archive, ROOT, wanted)
    missing = [v for v in VOCABS if not (ROOT / f"vocab/ggml-vocab-{v}.gguf").is_file()] + \
        [t for t in TEMPLATES if not (ROOT / f"templates/{t}.jinja").is_file()]
    if missing:
        print(f"not in the archive: {', '.join(missing)}", file=sys.stderr)
        return 1
    if not (ROOT / "convert" / "convert_hf_to_gguf.py").is_file():
        print("not in the archive: convert_hf_to_gguf.py", file=sys.stderr)
        return 1
    stamp.write_text(STAMP + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
