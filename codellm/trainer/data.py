"""Training data: read JSON / JSONL / CSV files, detect the format (Alpaca, chat messages, plain
completion), and turn records into (prompt messages or text, response) examples. Every malformed
record is reported with its line or row, never skipped silently."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from codellm.errors import InvalidRequest

FORMATS = ("auto", "alpaca", "chat", "completion")


@dataclass
class Example:
    messages: list[dict] | None  # chat: the conversation up to (not including) the answer
    prompt: str | None  # alpaca / completion: instruction + input, or the text before the completion
    instruction: str | None
    context: str | None
    response: str


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line or row number, record) for every record of a .json, .jsonl or .csv file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequest(f"no such data file: {path}", param="data")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
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
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InvalidRequest(f"{path.name}: not valid JSON ({exc.msg}, line {exc.lineno})", param="data") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise InvalidRequest(f"{path.name}: expected a list of objects", param="data")
        return list(enumerate(data, 1))
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            return [(n, dict(row)) for n, row in enumerate(reader, 2)]  # row 1 is the header
    raise InvalidRequest(f"{path.name}: unsupported data format {suffix!r} (use .jsonl, .json or .csv)", param="data")


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
            for m in messages:
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


def load_examples(path: str | Path, fmt: str = "auto") -> tuple[list[Example], str, str]:
    """(examples, the format used, sha256 of the data file)."""
    records = read_records(path)
    if not records:
        raise InvalidRequest(f"{Path(path).name}: no records", param="data")
    if fmt == "auto":
        try:
            fmt = detect(records[0][1])
        except InvalidRequest as exc:
            raise InvalidRequest(f"{Path(path).name}:{records[0][0]}: {exc.message}", param="data") from None
    examples = [to_example(rec, fmt, f"{Path(path).name}:{n}") for n, rec in records]
    digest = "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return examples, fmt, digest
