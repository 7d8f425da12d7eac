"""Compressed data files (`.gz`, `.zst`, `.bz2`, `.xz`): which codec a name has, and a seekable decompressed stream.

A compressed file cannot be split by byte ranges (a range of compressed bytes starts mid-stream), so it is one
partition whose positions count *decompressed* bytes, like an uncompressed file's. Resuming at position P
decompresses from the start and drops P bytes: the price of a format without an index. gzip, bz2 and xz come
with Python; zstd with the `zstandard` package (Python 3.11 has no zstd module).

Hand-written because the four decompressors differ in what they can do (zstandard's reader has no readline and
no backward seek, and ends a truncated frame as a plain EOF): `Decompressed` gives the readers one raw stream for
all of them, forward seek by reading, backward seek by reopening, and one sentence for a truncated or corrupt file.
"""

from __future__ import annotations

import io
from typing import Callable, Optional

from shardtune import ShardtuneError

CODECS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}


def codec(path: str) -> Optional[str]:
    """The codec a file name says (`d.jsonl.gz` -> gzip), or None."""
    for suffix, name in CODECS.items():
        if str(path).lower().endswith(suffix):
            return name
    return None


def strip_codec(name: str) -> str:
    """`d.jsonl.gz` -> `d.jsonl` (the name whose extension gives the text format)."""
    for suffix in CODECS:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _decompressor(name: str, raw):
    if name == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")
    if name == "bz2":
        import bz2

        return bz2.BZ2File(raw, mode="rb")
    if name == "xz":
        import lzma

        return lzma.LZMAFile(raw, mode="rb")
    return _Zstd(raw)


class _Zstd:
    """zstd frames one after another, through decompressobj: zstandard's stream_reader ends a truncated frame
    as a plain EOF, and a truncated file must be an error."""

    def __init__(self, raw):
        import zstandard

        self.raw, self.zstd, self.buf, self.done, self.fed = raw, zstandard.ZstdDecompressor(), b"", False, False
        self.obj = self.zstd.decompressobj()

    def read(self, n: int) -> bytes:
        while len(self.buf) < n and not self.done:
            chunk = self.raw.read(1 << 20)
            if not chunk:
                if self.fed and not self.obj.eof:
                    raise EOFError("the file ends inside a zstd frame")
                self.done = True
                break
            self.fed = True
            while chunk:
                if self.obj.eof:
                    self.obj = self.zstd.decompressobj()
                self.buf += self.obj.decompress(chunk)
                chunk = self.obj.unused_data if self.obj.eof else b""
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def close(self) -> None:
        pass


class PositionedRaw(io.RawIOBase):
    """A readable, seekable raw stream that keeps its position in `pos` (Decompressed, storage.RangeReader)."""

    pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos


class Decompressed(PositionedRaw):
    """The decompressed bytes of `open_raw()` (a binary file of compressed bytes) as a seekable raw stream."""

    def __init__(self, path: str, name: str, open_raw: Callable[[], io.IOBase]):
        self.path, self.name, self.open_raw = path, name, open_raw
        self.pos, self.raw, self.stream = 0, None, None
        self._reopen()

    def _reopen(self) -> None:
        self._close_streams()
        self.raw = self.open_raw()
        self.stream, self.pos = _decompressor(self.name, self.raw), 0

    def _close_streams(self) -> None:
        for s in (self.stream, self.raw):
            if s is not None:
                s.close()

    def readinto(self, buffer) -> int:
        try:
            data = self.stream.read(len(buffer))
        except ShardtuneError:
            raise
        except Exception as exc:  # EOFError (truncated), OSError (not gzip), zstandard.ZstdError, lzma.LZMAError
            raise ShardtuneError(
                f"{self.path} is a truncated or corrupt {self.name} file ({exc}) after {self.pos} decompressed bytes; "
                "download or compress it again, or remove it from the source."
            ) from None
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self.pos + offset}.get(whence)
        if target is None:
            raise io.UnsupportedOperation("a compressed stream seeks from its start or the current position only")
        if target < self.pos:
            self._reopen()
        scratch = bytearray(1 << 20)
        while self.pos < target:
            n = self.readinto(memoryview(scratch)[: min(len(scratch), target - self.pos)])
            if n == 0:
                break
        return self.pos

    def close(self) -> None:
        if not self.closed:
            self._close_streams()
        super().close()
