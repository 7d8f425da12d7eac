"""Pure text cleaning for the streaming stage: NFC, control characters, length limits, exact dedup.

Each step is a plain function (str in, str out) that unit-tests with no files
and no model. `clean_document` applies the configured steps in a fixed order
and returns the text pieces to keep (None = dropped) with counts per reason,
keyed like the metrics they become: "data/dropped/<reason>" for a dropped
document, "data/repaired/<reason>" for a kept document that was changed.

Order: lone surrogates (always removed: tokenizers cannot encode them) ->
NFC -> control characters -> empty -> too short -> duplicate -> too long.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Optional

from shardtune.config import CleanConfig  # noqa: F401  (defined with the config tree)

Counts = dict[str, int]

# C0/C1 control characters except tab, newline and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]+")
_SURROGATE = re.compile(r"[\ud800-\udfff]+")



def add_counts(dst: Counts, src: Counts) -> Counts:
    for key, n in src.items():
        dst[key] = dst.get(key, 0) + n
    return dst


def remove_surrogates(text: str) -> str:
    """Lone UTF-16 surrogates (from JSON escapes like \\ud800) cannot be encoded; drop them."""
    return _SURROGATE.sub("", text)


def nfc(text: str) -> str:
    if text.isascii() or unicodedata.is_normalized("NFC", text):
        return text
    return unicodedata.normalize("NFC", text)


def strip_control(text: str) -> str:
    return _CONTROL.sub("", text)


def split_text(text: str, max_chars: int) -> list[str]:
    """Pieces of at most max_chars characters, cut after a space or newline in the second half when there is one."""
    pieces, i, n = [], 0, len(text)
    while n - i > max_chars:
        j = i + max_chars
        cut = max(text.rfind(" ", i + max_chars // 2, j), text.rfind("\n", i + max_chars // 2, j))
        if cut > i:
            j = cut + 1
        pieces.append(text[i:j])
        i = j
    pieces.append(text[i:])
    return pieces


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _repair(text: str, fn, reason: str, counts: Counts) -> str:
    out = fn(text)
    if out != text:
        counts[f"data/repaired/{reason}"] = counts.get(f"data/repaired/{reason}", 0) + 1
    return out


def normalize(text: str, cfg: CleanConfig, counts: Counts) -> str:
    """The repairing steps; counts each kind of repair once per document."""
    if not text.isascii():
        text = _repair(text, remove_surrogates, "surrogates", counts)
        if cfg.nfc:
            text = _repair(text, nfc, "nfc", counts)
    if cfg.strip_control:
        text = _repair(text, strip_control, "control_chars", counts)
    return text


def clean_document(text: str, cfg: CleanConfig, seen: Optional[set[int]] = None) -> tuple[Optional[list[str]], Counts]:
    """-> (pieces to keep or None when dropped, counts by reason).

    `seen` is the dedup memory (hashes of earlier kept documents); it is
    updated in place, so pass the same set for the whole stream.
    """
    counts: Counts = {}
    text = normalize(text, cfg, counts)
    stripped = len(text.strip())
    if stripped == 0:
        return None, {**counts, "data/dropped/empty": 1}
    if stripped < cfg.min_chars:
        return None, {**counts, "data/dropped/too_short": 1}
    if seen is not None:
        h = text_hash(text)
        if h in seen:
            return None, {**counts, "data/dropped/duplicate": 1}
        seen.add(h)
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        if cfg.too_long == "drop":
            return None, {**counts, "data/dropped/too_long": 1}
        if cfg.too_long == "truncate":
            return [text[: cfg.max_chars]], {**counts, "data/repaired/truncated": 1}
        return split_text(text, cfg.max_chars), {**counts, "data/repaired/split": 1}
    return [text], counts
