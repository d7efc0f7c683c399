"""The server's Request: a JSON body nested too deeply to decode is the client's error (400), not a
RecursionError from inside the decoder (500)."""

from __future__ import annotations

from typing import Any

from litestar import Request as _Request

from codellm.errors import InvalidRequest


class Request(_Request):
    async def json(self) -> Any:
        try:
            return await super().json()
        except RecursionError:
            raise InvalidRequest("request body is not valid JSON: it is nested too deeply") from None
