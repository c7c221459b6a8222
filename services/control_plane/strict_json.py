"""Request bodies are JSON in UTF-8 with every key once: what the YAML loader refuses, the API refuses.

Starlette's `Request.json()` is `json.loads(bytes)`, which also takes UTF-16 and UTF-32 and keeps
the last of two equal keys, so `{"steps": 10, "steps": 10000}` would run 10,000 steps while a
reviewer reading the body saw 10. Routers that take bodies use `StrictJSONRoute`: a body that is
not UTF-8 becomes FastAPI's parse error (the 422 of errors.py), a repeated key a JSON decode error
naming it (also a 422).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from fastapi import Request
from fastapi.routing import APIRoute


def _refuse_duplicates(text: str) -> Callable[[list[tuple[str, Any]]], dict]:
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise json.JSONDecodeError(f"duplicate key {key!r}", text, 0)
            seen.add(key)
        return dict(pairs)

    return hook


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            text = (await self.body()).decode("utf-8")  # UnicodeDecodeError: FastAPI's body parse error
            self._json = json.loads(text, object_pairs_hook=_refuse_duplicates(text))
        return self._json


class StrictJSONRoute(APIRoute):
    """An APIRoute whose handler reads the body as strict JSON (`StrictJSONRequest`)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
