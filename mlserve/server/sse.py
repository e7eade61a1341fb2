"""Streaming responses: Server-Sent Events and NDJSON framing, and a stream that always releases its generation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def event(data: dict[str, Any]) -> bytes:
    """One ``data:`` event holding JSON."""
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def named(name: str, data: dict[str, Any]) -> bytes:
    """One ``event: NAME`` event holding JSON (Anthropic's framing: clients dispatch on the name)."""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    return b"event: " + name.encode() + b"\ndata: " + body + b"\n\n"


def ndjson(data: dict[str, Any]) -> bytes:
    """One line of newline-delimited JSON (Ollama's streaming framing, ``application/x-ndjson``)."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class EventStream(StreamingResponse):
    """A stream whose ``release`` runs however it ends, even if the client left before it began."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        release: Callable[[], Awaitable[None]],
        media_type: str = "text/event-stream",
    ) -> None:
        super().__init__(chunks, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self._chunks = chunks
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            closer = getattr(self._chunks, "aclose", None)
            if closer is not None:
                await closer()
            await self._release()
