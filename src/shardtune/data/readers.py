"""The one reader layer: the records of one partition of one file, with an exact, JSON-small position.

Every task reads through here: the stream (docstream.py), classification and
`shardtune predict` (records.py), and the cache builder (cache.py). Files are
opened through storage.open_input, so a path may be an object-store URL
(ranged GETs of the partition's bytes only) and a `.gz`/`.zst`/`.bz2`/`.xz`
file is read decompressed (one partition; positions count decompressed
bytes; compression.py). Files are parsed here, not through `datasets`, because a partition must start at a
byte offset or row group and resume at an exact position (a `datasets`
IterableDataset over a local file gives neither cheaply). Hub data sets
stream through `datasets` (hub.py; their position is a row count in a shard).

A partition (partitions.Part) is read from `cur["pos"]`, which the reader keeps
exact after every event:

    lines    jsonl, txt (one record per line), csv, tsv: the byte range [start, end)
             owns the lines whose first byte lies in it. A range that starts
             inside the file begins after the first newline at or after
             start - 1 (as input splits do); a record that starts before `end`
             is read to its end. pos = byte offset of the next line.
    file     txt with txt_unit: file, and JSON arrays: the whole file (pos = 0/1,
             or the next array element)
    parquet  one row group (pos = the next row in it)
    hub      one shard of a hub data set (pos = rows of the shard already read)

Real files are accepted as they come: a UTF-8 byte-order mark at the start of
a file is dropped (spreadsheet exports), CRLF line ends are handled (txt
lines lose their "\\r\\n"; JSON and CSV parsers accept them).

A reader yields events: (OK, value, where) for a record (value: a dict of its
fields, or the text for txt), (BAD, reason, where, detail) for a record that
cannot be used, (SKIP, reason) for something that is not a record (a blank
line, an empty file). The caller decides whether BAD raises or is counted
(`sentence(event)` is the one-sentence message). `where` is lazy: the line
number of a record in a range that starts mid-file is counted from the file
start only when a message is printed.

CSV caveat: a line break inside a quoted field cannot be told from a record
boundary without reading from the file start, so a split CSV file must not
have a quoted line break across a partition boundary; the partition that owns
such a record stops the run with one sentence naming `split: false`.
"""

from __future__ import annotations

import csv
import json
from typing import Any, Iterator, Optional

from shardtune import ShardtuneError, storage
from shardtune.data.events import BAD, BOM, OK, SKIP, Event, Where, bad, line_number, sentence  # noqa: F401  (the readers' vocabulary)
from shardtune.data.hub import read_hub

def field_text(value: Any, field: Optional[str], where) -> Event:
    """(OK, text) of `field` in a record; field None = the whole record as JSON text (SFT, parsed in sft.py)."""
    if isinstance(value, str):
        return (OK, value)  # txt records are their text
    if not isinstance(value, dict):
        return bad("not_object", where, f" is a JSON {type(value).__name__}, not an object with named fields; fix or remove that record")
    if field is None:
        return (OK, json.dumps(value, ensure_ascii=False))
    if field not in value:
        names = ", ".join(map(str, list(value)[:8])) or "none"
        return bad("missing_field", where, f" has no field {field!r} (it has: {names}); fix that record or set the source's text_field")
    text = value[field]
    if not isinstance(text, str):
        return bad("not_text", where, f": field {field!r} holds {type(text).__name__} {str(text)[:40]!r}, not text; fix or remove that record")
    return (OK, text)


def _too_large(where, limit: int) -> Event:
    return bad("too_large", where, f" is longer than max_record_bytes ({limit}); split that record or raise max_record_bytes")


def _decode(line: bytes, where) -> tuple[Optional[str], Optional[Event]]:
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, bad("invalid_utf8", where, f" is not valid UTF-8 (byte {exc.start + 1} of the record); re-save the file as UTF-8")


# ---------------------------------------------------------------- byte ranges of line files


def _skip_line(f, pos: int) -> int:
    """Read to just past the next newline from `pos`, in chunks (a line may be huge); -> the new offset."""
    f.seek(pos)
    while True:
        chunk = f.readline(1 << 20)
        if not chunk or chunk.endswith(b"\n"):
            return f.tell()


def _align(f, start: int, end: int) -> int:
    """The first line start in [start, end), or end when there is none: a line starts after a newline, so
    read from start - 1 to the first newline, but not past end - 1. Reads at most the range's own bytes (a long
    record that began before the range is not read to its end here: its owner reads it)."""
    f.seek(start - 1)
    pos = start - 1
    while pos < end - 1:
        chunk = f.readline(min(1 << 20, end - 1 - pos))
        if not chunk:
            break
        pos += len(chunk)
        if chunk.endswith(b"\n"):
            return pos
    return end


def _open_range(part, cur: dict):
    """The file, positioned at the first line the range owns (aligning once at a mid-file start)."""
    f = storage.open_input(part.path, part.end)
    if cur["pos"] == part.start and part.start > 0:
        cur["pos"] = _align(f, part.start, part.end)
    f.seek(cur["pos"])
    return f


def _lines(f, cur: dict, end: int, limit: int) -> Iterator[tuple[int, Optional[bytes]]]:
    """(start offset, line) for each line starting before `end`; line None when it is over `limit` bytes."""
    while cur["pos"] < end:
        start = cur["pos"]
        line = f.readline(limit + 1)
        if not line:
            return
        size = len(line)
        if size > limit and not line.endswith(b"\n"):
            size = _skip_line(f, start + size) - start
            line = None
        cur["pos"] = start + size
        if start == 0 and line is not None and line.startswith(BOM):
            line = line[len(BOM):]
        yield start, line


def _text_lines(part, cur: dict, limit: int) -> Iterator[tuple[Where, Optional[str], Optional[Event]]]:
    """(where, text, None) per non-blank line of the range, or (where, None, event) for a bad or blank one."""
    with _open_range(part, cur) as f:
        for start, line in _lines(f, cur, part.end, limit):
            where = Where(part.path, start)
            if line is None:
                yield where, None, _too_large(where, limit)
                continue
            text, err = _decode(line, where)
            if err:
                yield where, None, err
            elif not text.strip():
                yield where, None, (SKIP, "blank_line")
            else:
                yield where, text, None


def read_jsonl(part, cur: dict, limit: int) -> Iterator[Event]:
    for where, text, event in _text_lines(part, cur, limit):
        if event:
            yield event
            continue
        try:
            obj = json.loads(text, strict=False)  # raw tabs/NULs inside strings: keep, clean decides
        except json.JSONDecodeError as exc:
            yield bad("invalid_json", where, f" is not valid JSON ({exc.msg} at column {exc.colno}); fix or remove that line")
            continue
        yield (OK, obj, where)


def read_txt_lines(part, cur: dict, limit: int) -> Iterator[Event]:
    for where, text, event in _text_lines(part, cur, limit):
        yield event if event else (OK, text.rstrip("\r\n"), where)


class _TooLarge(Exception):
    pass


class _CsvLines:
    """Decoded lines for csv.reader. csv pulls exactly the lines of one record, so offsets stay exact; a
    record's first line must start before `end`, its continuation lines may not (see the module docstring)."""

    def __init__(self, f, cur: dict, end: int, limit: int):
        self.lines, self.cur, self.end = _lines(f, cur, float("inf"), limit), cur, end
        self.first, self.crossed, self.bad_utf8 = True, False, False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.cur["pos"] >= self.end:
            if self.first:
                raise StopIteration
            self.crossed = True
        self.first = False
        _, line = next(self.lines)
        if line is None:
            raise _TooLarge
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            self.bad_utf8 = True
            return line.decode("utf-8", "replace")


def csv_header(path: str, delimiter: str, limit: int) -> tuple[list[str], int]:
    """The header row (BOM dropped) and the offset of the first body line."""
    cur = {"pos": 0}
    with storage.open_input(path, end_hint=1) as f:  # a URL: small GETs to the header's end, not a partition's worth
        header = next(csv.reader(_CsvLines(f, cur, 1, limit), delimiter=delimiter), [])
    return header, cur["pos"]


def read_csv(part, cur: dict, limit: int, columns: Optional[list[str]], delimiter: str) -> Iterator[Event]:
    csv.field_size_limit(max(limit, csv.field_size_limit()))
    header, body = csv_header(part.path, delimiter, limit)
    missing = [c for c in columns or () if c not in header]
    if missing:
        cur["pos"] = part.end
        yield bad("missing_field", Where(part.path, 0), f" has no column {missing[0]!r} (it has: {', '.join(header)}); set the source's text_field")
        return
    keep = [(c, header.index(c)) for c in (columns or header)]
    with _open_range(part, cur) as f:
        if cur["pos"] < body:
            cur["pos"] = body
            f.seek(body)
        lines = _CsvLines(f, cur, part.end, limit)
        reader = csv.reader(lines, delimiter=delimiter)
        while True:
            start = cur["pos"]
            lines.first = True
            try:
                row = next(reader)
            except StopIteration:
                return
            except (_TooLarge, csv.Error) as exc:
                reader = csv.reader(lines, delimiter=delimiter)  # resync on the next line
                where = Where(part.path, start)
                yield _too_large(where, limit) if isinstance(exc, _TooLarge) else bad("csv_error", where, f": {exc}; fix that row")
                continue
            where = Where(part.path, start)
            if lines.crossed:
                raise ShardtuneError(
                    f"{where} has a quoted field with a line break across byte {part.end}, where the file is split into partitions; "
                    "set split: false on this source (one partition per file)."
                )
            if lines.bad_utf8:
                lines.bad_utf8 = False
                yield bad("invalid_utf8", where, " is not valid UTF-8; re-save the file as UTF-8")
            elif not row:
                yield (SKIP, "blank_line")
            elif len(row) != len(header):
                yield bad("ragged_row", where, f" has {len(row)} fields where the header has {len(header)}; quote fields that contain the delimiter")
            else:
                yield (OK, {c: row[i] for c, i in keep}, where)


# ---------------------------------------------------------------- whole files, row groups


def read_txt_file(part, cur: dict, limit: int) -> Iterator[Event]:
    if cur["pos"] > 0:
        return
    cur["pos"] = 1
    where = part.path
    if part.end > limit:
        yield _too_large(where, limit)
        return
    with storage.open_input(part.path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # a compressed file: its decompressed size shows only now
        yield _too_large(where, limit)
        return
    text, err = _decode(data[len(BOM):] if data.startswith(BOM) else data, part.path)
    yield err or ((OK, text, where) if text.strip() else (SKIP, "empty_file"))


def read_json_array(part, cur: dict) -> Iterator[Event]:
    """A JSON array (one record per element) or a single object (one record); the whole file at once."""
    try:
        with storage.open_input(part.path) as f:
            data = f.read()
        items = json.loads(data[len(BOM):] if data.startswith(BOM) else data, strict=False)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        cur["pos"] = 1 << 62
        yield bad("invalid_json", part.path, f" is not a valid UTF-8 JSON array ({exc}); fix it or save it as JSON Lines")
        return
    items = [items] if isinstance(items, dict) else items
    for i in range(cur["pos"], len(items)):
        cur["pos"] = i + 1
        yield (OK, items[i], Where(part.path, i + 1, "record"))


def read_parquet(part, cur: dict, columns: Optional[list[str]]) -> Iterator[Event]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(storage.open_input(part.path) if storage.is_url(part.path) else part.path)
    missing = [c for c in columns or () if c not in pf.schema_arrow.names]
    if missing:
        cur["pos"] = part.end
        yield bad("missing_field", part.path, f" has no column {missing[0]!r} (it has: {', '.join(pf.schema_arrow.names)}); set the source's text_field")
        return
    first_row = sum(pf.metadata.row_group(g).num_rows for g in range(part.start))
    row = 0
    for batch in pf.iter_batches(batch_size=1024, row_groups=[part.start], columns=columns):
        skip = min(max(cur["pos"] - row, 0), batch.num_rows)  # resume: rows already read
        row += skip
        for values in batch.slice(skip).to_pylist():
            row += 1
            cur["pos"] = row
            where = Where(part.path, first_row + row, "row")
            nulls = [k for k, v in values.items() if v is None]
            yield bad("not_text", where, f": {nulls[0]!r} is null; fix or remove that row") if nulls else (OK, values, where)


# ---------------------------------------------------------------- dispatch


def _empty(cur: dict) -> Iterator[Event]:
    if cur["pos"] == 0:
        cur["pos"] = 1
        yield (SKIP, "empty_file")


def read_part(part, cur: dict, limit: int, columns: Optional[list[str]] = None) -> Iterator[Event]:
    """The events of one partition from cur["pos"]; `columns`: the fields needed (None = all)."""
    fmt = part.fmt
    if fmt == "empty":
        return _empty(cur)
    if fmt == "jsonl":
        return read_jsonl(part, cur, limit)
    if fmt in ("csv", "tsv"):
        return read_csv(part, cur, limit, columns, "\t" if fmt == "tsv" else ",")
    if fmt == "txt":
        return read_txt_lines(part, cur, limit)
    if fmt == "txtfile":
        return read_txt_file(part, cur, limit)
    if fmt == "json":
        return read_json_array(part, cur)
    if fmt == "parquet":
        return read_parquet(part, cur, columns)
    if fmt == "hub":
        return read_hub(part, cur)
    raise AssertionError(f"no reader for partition format {fmt}")
