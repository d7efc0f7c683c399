"""Turning token ids into text as they come: never a broken UTF-8 character, never stop text.

``IncrementalDetokenizer`` decodes a sliding window of ids (the prefix/read offset scheme of TGI and
vLLM) and holds bytes back while the text ends in a replacement character. ``StopMatcher`` holds
back the tail that could still become a stop string spanning several tokens.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_tail: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_tail or [])[-6:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        prefix_ids, ids = self.windows(token_id)
        return self.commit(self._decode(prefix_ids), self._decode(ids))

    def windows(self, token_id: int) -> tuple[list[int], list[int]]:
        """Take ``token_id``; the two id windows to decode (the engine decodes many sequences' at once)."""
        self.ids.append(token_id)
        return self.ids[self.prefix_offset:self.read_offset], self.ids[self.prefix_offset:]

    def commit(self, prefix_text: str, text: str) -> str:
        """The new text, given the decoded windows; nothing while a character is incomplete."""
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            new = text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """What is left at the end (a dangling partial character becomes U+FFFD, as the model emitted it)."""
        text = self._decode(self.ids[self.prefix_offset:])
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix_text):] if len(text) > len(prefix_text) else ""


class StopMatcher:
    """Feeds text in, lets text out, and reports the first stop string found."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        if self.stops:
            start = max(0, self.emitted - self.hold)
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                cut, self.matched = min(hits)
                out = self.text[self.emitted:cut]
                self.text = self.text[:cut]
                self.emitted = cut
                self.stopped = True
                return out
        safe = len(self.text) - self.hold if self.stops else len(self.text)
        if safe > self.emitted:
            out = self.text[self.emitted:safe]
            self.emitted = safe
            return out
        return ""

    def flush(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out
