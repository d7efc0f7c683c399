"""JSON mode (``response_format: json_object``): every emitted token keeps the text a valid prefix of
one JSON object, and generation stops when that object closes.

The check is a character-level JSON prefix machine; the engine tries the sampled token first and,
if it would break the JSON, the most likely tokens in order until one fits. Cheap per step, and
the output parses whenever it finishes with ``stop``.
"""

from __future__ import annotations

_WS = " \t\n\r"
_NUM = "0123456789+-.eE"
_ESC = '"\\/bfnrtu'
_HEX = "0123456789abcdefABCDEF"


class JsonPrefix:
    __slots__ = ("stack", "expect", "in_string", "is_key", "escape", "hex_left", "literal", "in_number", "blank")
    MAX_BLANK = 32  # whitespace in a row outside strings: more is a model stuck, not formatting

    def __init__(self):
        self.stack: list[str] = []
        self.expect = "top"  # top | key_or_end | key | colon | value | value_or_end | comma_or_end | done
        self.in_string = self.is_key = self.escape = self.in_number = False
        self.hex_left = 0
        self.literal = ""
        self.blank = 0

    def clone(self) -> "JsonPrefix":
        other = JsonPrefix.__new__(JsonPrefix)
        for name in self.__slots__:
            setattr(other, name, getattr(self, name))
        other.stack = list(self.stack)
        return other

    @property
    def done(self) -> bool:
        return self.expect == "done"

    def _after_value(self) -> None:
        self.expect = "done" if not self.stack else "comma_or_end"

    def feed(self, text: str) -> bool:
        """Advance over ``text``; False (state undefined) if it cannot continue a JSON object."""
        for ch in text:
            if not self._char(ch):
                return False
        return True

    def _char(self, ch: str) -> bool:
        if self.in_string:
            if self.hex_left:
                if ch not in _HEX:
                    return False
                self.hex_left -= 1
            elif self.escape:
                if ch not in _ESC:
                    return False
                self.escape = False
                self.hex_left = 4 if ch == "u" else 0
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
                if self.is_key:
                    self.expect = "colon"
                else:
                    self._after_value()
            elif ord(ch) < 0x20:
                return False
            return True
        if self.literal:
            if ch != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self._after_value()
            return True
        if self.in_number:
            if ch in _NUM:
                return True
            self.in_number = False
            self._after_value()
        if ch in _WS:
            self.blank += 1
            return self.expect != "top" and self.blank <= self.MAX_BLANK
        self.blank = 0
        e = self.expect
        if e == "done":
            return False
        if e == "top":
            if ch != "{":
                return False
            self.stack.append("{")
            self.expect = "key_or_end"
            return True
        if e in ("key_or_end", "key"):
            if ch == '"':
                self.in_string, self.is_key = True, True
                return True
            if ch == "}" and e == "key_or_end":
                self.stack.pop()
                self._after_value()
                return True
            return False
        if e == "colon":
            if ch != ":":
                return False
            self.expect = "value"
            return True
        if e in ("value", "value_or_end"):
            if ch == "]" and e == "value_or_end":
                self.stack.pop()
                self._after_value()
                return True
            if ch == "{":
                self.stack.append("{")
                self.expect = "key_or_end"
            elif ch == "[":
                self.stack.append("[")
                self.expect = "value_or_end"
            elif ch == '"':
                self.in_string, self.is_key = True, False
            elif ch in "-0123456789":
                self.in_number = True
            elif ch in "tfn":
                self.literal = {"t": "rue", "f": "alse", "n": "ull"}[ch]
            else:
                return False
            return True
        if e == "comma_or_end":
            top = self.stack[-1]
            if ch == ",":
                self.expect = "key" if top == "{" else "value"
                return True
            if (ch == "}" and top == "{") or (ch == "]" and top == "["):
                self.stack.pop()
                self._after_value()
                return True
            return False
        return False
