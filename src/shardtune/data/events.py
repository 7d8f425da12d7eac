"""What a reader yields (readers.py, hub.py): the event kinds, where a record is, and the sentence of a bad one.

A leaf, so that the readers of files (readers.py) and of hub data sets (hub.py) share it without importing
each other.
"""

from __future__ import annotations

from shardtune import storage

OK, BAD, SKIP = "ok", "bad", "skip"
BOM = b"\xef\xbb\xbf"
Event = tuple


class Where:
    """Where a record is, for messages: `path line N` (counted lazily), `path row N` or `path record N`."""

    __slots__ = ("path", "pos", "unit")

    def __init__(self, path: str, pos: int, unit: str = "byte"):
        self.path, self.pos, self.unit = path, pos, unit

    def __str__(self) -> str:
        if self.unit != "byte":
            return f"{storage.display(self.path)} {self.unit} {self.pos}"
        if storage.is_url(self.path):  # counting lines would download the object up to there
            return f"{storage.display(self.path)} (the line at byte {self.pos})"
        return f"{self.path} line {line_number(self.path, self.pos)}"


def line_number(path: str, pos: int) -> int:
    """1-based number of the line starting at byte `pos` (reads the file up to there: for messages only)."""
    newlines, left = 0, pos
    with storage.open_input(path) as f:
        while left > 0 and (chunk := f.read(min(1 << 20, left))):
            newlines += chunk.count(b"\n")
            left -= len(chunk)
    return newlines + 1


def sentence(event: Event) -> str:
    """The message of a BAD event: where + what + the fix."""
    return f"{event[2]}{event[3]}"


def bad(reason: str, where, detail: str) -> Event:
    return (BAD, reason, where, detail)
