"""Model names as Ollama spells them: ``[namespace/]model[:tag]``.

Names are case-insensitive (stored lower-case) and every part must match a strict pattern, so that
a name maps to exactly one manifest path inside the registry and can never climb out of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from codellm.errors import InvalidName

DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
_PART = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")
_TAG = re.compile(r"[a-z0-9_][a-z0-9._-]{0,79}")


@dataclass(frozen=True, order=True)
class ModelName:
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> "ModelName":
        if not isinstance(text, str):
            raise InvalidName(f"model name must be a string, not {type(text).__name__}")
        raw = text.strip()
        if not raw:
            raise InvalidName("model name is empty")
        if not raw.isascii():  # lower() would fold look-alikes into ASCII (the KELVIN SIGN becomes 'k')
            raise InvalidName(f"invalid model name {text!r}: names are ASCII (a-z, 0-9, '.', '_', '-', '/', ':')")
        lowered = raw.lower()
        base, sep, tag = lowered.rpartition(":")
        if not sep:
            base, tag = lowered, DEFAULT_TAG
        parts = base.split("/")
        if len(parts) == 1:
            namespace, model = DEFAULT_NAMESPACE, parts[0]
        elif len(parts) == 2:
            namespace, model = parts
        else:
            raise InvalidName(f"invalid model name {text!r}: use [namespace/]model[:tag]")
        for label, value, pattern in (("namespace", namespace, _PART), ("model", model, _PART), ("tag", tag, _TAG)):
            if not pattern.fullmatch(value) or ".." in value:
                raise InvalidName(
                    f"invalid model name {text!r}: {label} {value!r} must be 1-80 characters of "
                    "a-z, 0-9, '.', '_' or '-', starting with a letter or digit"
                )
        return cls(namespace, model, tag)

    @property
    def parts(self) -> tuple[str, str, str]:
        return (self.namespace, self.model, self.tag)

    def __str__(self) -> str:
        prefix = "" if self.namespace == DEFAULT_NAMESPACE else f"{self.namespace}/"
        return f"{prefix}{self.model}:{self.tag}"

    @property
    def short(self) -> str:
        """The name without a ``:latest`` tag, as users type it."""
        text = str(self)
        return text[: -len(":latest")] if self.tag == DEFAULT_TAG else text


def is_valid(text: str) -> bool:
    try:
        ModelName.parse(text)
    except InvalidName:
        return False
    return True
