"""A line of JSON per engine step, for finding where a burst's time goes on a real server: with
``CODELLM_STEP_LOG=FILE`` every engine (each model's, in the server or its engine process) appends to FILE, per step,
when it began (``time.perf_counter``: CLOCK_MONOTONIC, the same clock in every process of the machine), the
sequences it admitted, the prompt tokens and chunks it prefilled, the rows it decoded, and the host's milliseconds in
the prefill and the decode halves (a half that waits for the device shows it there). Off, it costs one test a step."""

from __future__ import annotations

import os
import time

import msgspec


class Step(msgspec.Struct):
    model: str
    t: float
    admitted: int
    prefill_tokens: int
    chunks: int
    decoded: int
    prefill_ms: float
    decode_ms: float


class StepLog:
    """Engines of several models (and processes) may share FILE: it is opened to append, unbuffered, so each line is
    one write that lands whole at the end."""

    def __init__(self, path: str, model: str):
        self.model = model
        self._file = open(path, "ab", buffering=0)
        self._encode = msgspec.json.Encoder().encode

    def record(self, begun: float, admitted: int, chunks: list, decoded: int, prefilled: float) -> None:
        now = time.perf_counter()
        line = self._encode(Step(self.model, round(begun, 6), admitted, sum(end - start for _, start, end in chunks),
                                 len(chunks), decoded, round(1000 * (prefilled - begun), 3),
                                 round(1000 * (now - prefilled), 3))) + b"\n"
        self._file.write(line)

    def close(self) -> None:
        self._file.close()


def from_env(model: str) -> StepLog | None:
    path = os.environ.get("CODELLM_STEP_LOG")
    return StepLog(path, model) if path else None
