"""Turning token ids into text as they come: never a broken UTF-8 character, never stop text.

``IncrementalDetokenizer`` decodes a sliding window of ids (the prefix/read offset scheme of TGI and
vLLM) and holds bytes back while the text ends in a replacement character. ``StopMatcher`` holds
back the tail that could still become a stop string spanning several tokens.
"""

from __future__ import annotations

import threading
import weakref

_pieces: "weakref.WeakKeyDictionary[object, list[str | None] | None]" = weakref.WeakKeyDictionary()
_pieces_lock = threading.Lock()


def pieces_of(tokenizer) -> list[str | None] | None:
    """Each vocabulary token's text where a byte-level BPE decoder makes it whole characters (None elsewhere), or
    None for a tokenizer whose decoding is not a plain concatenation of its tokens' bytes (SentencePiece's leading
    space, added tokens): after text that ended on a character boundary, such a token adds exactly its own text,
    so the common case needs no decode call. Built once a tokenizer (a tenth of a second for 150k tokens)."""
    with _pieces_lock:
        if tokenizer in _pieces:
            return _pieces[tokenizer]
        table = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import decoders

            if isinstance(backend.decoder, decoders.ByteLevel):
                size = backend.get_vocab_size(with_added_tokens=True)
                added = backend.get_added_tokens_decoder()
                texts = backend.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
                table = [t if t and "\ufffd" not in t and i not in added else None for i, t in enumerate(texts)]
        _pieces[tokenizer] = table
        return table


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_tail: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_tail or [])[-6:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.pieces = pieces_of(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        piece = self.known(token_id)
        if piece is not None:
            return piece
        prefix_ids, ids = self.windows(token_id)
        return self.commit(self._decode(prefix_ids), self._decode(ids))

    def known(self, token_id: int) -> str | None:
        """Take ``token_id`` and return its text when that needs no decoding (``pieces_of``: everything so far let
        out, and the token whole characters); None, taking nothing, otherwise."""
        pieces = self.pieces
        if pieces is None or self.read_offset != len(self.ids) or not 0 <= token_id < len(pieces):
            return None
        piece = pieces[token_id]
        if piece is not None:
            self.ids.append(token_id)
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        return piece

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
    """Feeds text in, lets text out, and reports the first stop string found. Only the held-back tail is kept:
    a match ends in the newest piece, so it starts no earlier than that tail."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tail = ""  # text not let out yet: what could still begin a stop string
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        text = self.tail + piece
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            cut, self.matched = min(hits)
            self.tail, self.stopped = "", True
            return text[:cut]
        safe = len(text) - self.hold
        if safe <= 0:
            self.tail = text
            return ""
        self.tail = text[safe:]
        return text[:safe]

    def flush(self) -> str:
        out, self.tail = self.tail, ""
        return out
