"""Token pieces to client text: UTF-8 characters split across pieces and stop strings split across tokens.

A piece may end inside a multibyte character, and a stop string may arrive over several
pieces; text that could still turn into either is held back until the next piece decides.
"""

from __future__ import annotations

import codecs

__all__ = ["TextOut", "stop_split"]


def stop_split(text: str, stops: tuple[str, ...]) -> tuple[str, str, bool]:
    """Split held text into (emit now, keep holding, a stop string was hit)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[: min(hits)], "", True
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return text[: len(text) - keep], text[len(text) - keep :], False


class TextOut:
    """One sequence's text assembly: bytes in, releasable text out."""

    __slots__ = ("_utf8", "_held", "_stops", "hit")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._held = ""
        self._stops = tuple(s for s in stops if s)
        self.hit: str | None = None  # the stop string found, once one is

    def push(self, piece: bytes) -> tuple[str, bool]:
        """Add a token's bytes; return (text to release now, whether a stop string was hit).

        On a hit the text before the stop is returned and everything after it is dropped.
        """
        text = self._utf8.decode(piece)
        if not self._stops:
            return text, False
        held = self._held + text
        emit, self._held, hit = stop_split(held, self._stops)
        if hit:  # the one that cut the text: the earliest, as stop_split cuts at the earliest
            self.hit = min((s for s in self._stops if s in held), key=held.find)
        return emit, hit

    def flush(self) -> str:
        """What was held back (a possible stop's start, a cut character), as final output."""
        tail = self._held + self._utf8.decode(b"", final=True)
        self._held = ""
        return tail
