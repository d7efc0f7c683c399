"""Training data: read JSON / JSONL / CSV / Parquet files, a folder of them, or a dataset repo on the
Hugging Face hub; detect the format (Alpaca, chat messages, plain completion), and turn records into
(prompt messages or text, response) examples. Every malformed record is reported with its file and line
or row, never skipped silently."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from codellm.errors import InvalidRequest

FORMATS = ("auto", "alpaca", "chat", "completion")
SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
_HUB_ID = re.compile(r"^(?:hf://datasets/)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")


@dataclass
class Example:
    messages: list[dict] | None  # chat: the conversation up to (not including) the answer
    prompt: str | None  # alpaca / completion: instruction + input, or the text before the completion
    instruction: str | None
    context: str | None
    response: str


def _text(path: Path) -> str:
    """A data file's text; bytes that are not UTF-8 are an error naming their line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InvalidRequest(f"{path.name}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x})", param="data") from None


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line or row number, record) for every record of a .json, .jsonl or .csv file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequest(f"no such data file: {path}", param="data")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        out = []
        for n, line in enumerate(_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise InvalidRequest(f"{path.name}:{n}: not valid JSON ({exc.msg})", param="data") from None
            if not isinstance(rec, dict):
                raise InvalidRequest(f"{path.name}:{n}: each line must be a JSON object", param="data")
            out.append((n, rec))
        return out
    if suffix == ".json":
        try:
            data = json.loads(_text(path))
        except ValueError as exc:
            raise InvalidRequest(f"{path.name}: not valid JSON ({exc.msg}, line {exc.lineno})", param="data") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise InvalidRequest(f"{path.name}: expected a list of objects", param="data")
        return list(enumerate(data, 1))
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(_text(path), newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            return [(n, dict(row)) for n, row in enumerate(reader, 2)]  # row 1 is the header
        except csv.Error as exc:
            raise InvalidRequest(f"{path.name}:{reader.line_num}: not valid CSV ({exc})", param="data") from None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise InvalidRequest(f"{path.name}: not a readable Parquet file ({exc})", param="data") from None
        return list(enumerate(table.to_pylist(), 1))
    raise InvalidRequest(f"{path.name}: unsupported data format {suffix!r} (use {', '.join(SUFFIXES)})", param="data")


def data_files(source: str | Path, status: Callable[[str], None] = lambda s: None) -> list[Path]:
    """The files behind ``--data``: a file, a folder of data files, or a hub dataset repo (``owner/name``,
    ``hf://datasets/owner/name``, optionally ``@revision``) fetched through huggingface_hub. Folders and
    repos with split files use the train split."""
    path = Path(source).expanduser()
    if not path.exists():
        match = _HUB_ID.match(str(source))
        if not match:
            raise InvalidRequest(f"no such data file: {source}", param="data")
        from huggingface_hub import snapshot_download

        repo, revision = match.groups()
        status(f"downloading dataset {repo} from the hub")
        try:
            path = Path(snapshot_download(repo, repo_type="dataset", revision=revision,
                                          allow_patterns=[f"*{s}" for s in SUFFIXES]))
        except Exception as exc:  # not found, gated, offline: all mean no data
            raise InvalidRequest(f"no such data file, and no dataset {repo} on the hub ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})", param="data") from None
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    train = [p for p in files if re.search(r"(^|[^a-z])train([^a-z]|$)", str(p.relative_to(path)).lower())]
    if not (train or files):
        raise InvalidRequest(f"{source}: no data files ({', '.join(SUFFIXES)})", param="data")
    return train or files


def detect(record: dict) -> str:
    if "messages" in record or "conversations" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record or ("prompt" in record and "completion" in record):
        return "completion"
    raise InvalidRequest(f"cannot tell the format of a record with keys {sorted(record)}: expected Alpaca "
                         "(instruction/input/output), chat (messages) or completion (text, or prompt/completion)")


def to_example(record: dict, fmt: str, where: str) -> Example:
    try:
        if fmt == "alpaca":
            instruction, output = record.get("instruction"), record.get("output")
            if not isinstance(instruction, str) or not instruction.strip() or not isinstance(output, str):
                raise ValueError("needs string fields 'instruction' and 'output'")
            context = record.get("input") or ""
            return Example(None, None, instruction, str(context), output)
        if fmt == "chat":
            messages = record.get("messages") or record.get("conversations")
            if not isinstance(messages, list) or not messages:
                raise ValueError("'messages' must be a non-empty list")
            norm = []
            for i, m in enumerate(messages):
                if not isinstance(m, dict):
                    raise ValueError(f"message {i} must be an object with role and content, not {type(m).__name__}")
                role = m.get("role") or {"human": "user", "gpt": "assistant"}.get(m.get("from", ""), m.get("from"))
                content = m.get("content", m.get("value"))
                if role not in ("system", "user", "assistant", "tool") or not isinstance(content, str):
                    raise ValueError(f"bad message {m!r}")
                norm.append({"role": role, "content": content})
            if norm[-1]["role"] != "assistant":
                raise ValueError("the last message must be the assistant's answer")
            return Example(norm[:-1], None, None, None, norm[-1]["content"])
        if fmt == "completion":
            if "text" in record:
                text = record["text"]
                if not isinstance(text, str) or not text:
                    raise ValueError("'text' must be a non-empty string")
                return Example(None, "", None, None, text)
            prompt, completion = record.get("prompt"), record.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise ValueError("needs string fields 'prompt' and 'completion'")
            return Example(None, prompt, None, None, completion)
    except ValueError as exc:
        raise InvalidRequest(f"{where}: {exc}", param="data") from None
    raise InvalidRequest(f"unknown data format {fmt!r} (use one of {', '.join(FORMATS)})", param="format")


def load_examples(source: str | Path, fmt: str = "auto", status: Callable[[str], None] = lambda s: None
                  ) -> tuple[list[Example], str, str]:
    """(examples, the format used, sha256 over the data files' bytes)."""
    files = data_files(source, status)
    records = [(f"{f.name}:{n}", rec) for f in files for n, rec in read_records(f)]
    if not records:
        raise InvalidRequest(f"{Path(source).name}: no records", param="data")
    if fmt == "auto":
        try:
            fmt = detect(records[0][1])
        except InvalidRequest as exc:
            raise InvalidRequest(f"{records[0][0]}: {exc.message}", param="data") from None
    examples = [to_example(rec, fmt, where) for where, rec in records]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return examples, fmt, "sha256:" + digest.hexdigest()
