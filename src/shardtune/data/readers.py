"""Record readers for the streaming stage, each with an exact, JSON-small position.

Local files are read here, not through `datasets`: resume needs a position we
can seek to (byte offset for jsonl/csv/txt lines, row for parquet, element for
JSON arrays) and per-line handling of bad bytes; a `datasets` streaming
IterableDataset over a local file gives neither cheaply. Hub data sets
(`hub:NAME[:CONFIG][@SPLIT]`) stream through `datasets`; their position is a
row count, so resuming one re-streams (and skips) the rows before it.

A reader yields events: (OK, text), (BAD, reason, sentence) for a record that
cannot be used, (SKIP, reason) for something that is not a record (blank line,
empty file). The caller decides whether BAD raises or is counted.
"""

from __future__ import annotations

import csv
import glob
import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from shardtune import ShardtuneError
from shardtune.config import SourceSpec  # noqa: F401  (defined with the config tree)

OK, BAD, SKIP = "ok", "bad", "skip"
EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".txt": "txt"}
HUB = "hub:"
Event = tuple



def new_position() -> dict[str, Any]:
    return {"file": 0, "offset": 0, "line": 0, "ordinal": 0, "epoch": 0}


# ---------------------------------------------------------------- resolving paths


def resolve_files(spec: SourceSpec) -> list[tuple[str, str]]:
    """-> [(file, format)] in a fixed (sorted) order; one clear error when nothing usable matches."""
    raw = os.path.expanduser(spec.path)
    if any(c in raw for c in "*?["):
        files = sorted(f for f in glob.glob(raw, recursive=True) if os.path.isfile(f))
        if not files:
            raise ShardtuneError(f"data source {spec.path!r} matches no files (relative to {os.getcwd()}); fix the pattern or the folder.")
    elif os.path.isdir(raw):
        files = sorted(
            str(p) for p in Path(raw).rglob("*")
            if p.is_file() and p.suffix.lower() in EXTENSIONS and not any(part.startswith(".") for part in p.relative_to(raw).parts)
        )
        if not files:
            raise ShardtuneError(f"data folder {spec.path} holds no {'/'.join(EXTENSIONS)} files; point the source at a folder with data.")
    elif os.path.isfile(raw):
        files = [raw]
    else:
        raise ShardtuneError(f"data source {spec.path} does not exist; give a file, folder, glob or hub:NAME[:CONFIG][@SPLIT].")
    out = []
    for f in files:
        fmt = spec.format or EXTENSIONS.get(Path(f).suffix.lower())
        if fmt is None:
            raise ShardtuneError(f"data file {f} has an unknown extension; use one of {', '.join(EXTENSIONS)} or set the source's format.")
        out.append((f, fmt))
    if all(os.path.getsize(f) == 0 for f, _ in out):
        raise ShardtuneError(f"data source {spec.path} has only empty files; point it at files with data.")
    return out


# ---------------------------------------------------------------- per-format readers


def _field(obj: Any, field: Optional[str], where: str) -> Event:
    """The text of `field`; field None = the whole record as JSON text (SFT records, parsed in data/sft.py)."""
    if not isinstance(obj, dict):
        return (BAD, "not_object", f"{where} is a JSON {type(obj).__name__}, not an object with named fields; fix or remove that record")
    if field is None:
        return (OK, json.dumps(obj, ensure_ascii=False))
    if field not in obj:
        names = ", ".join(map(str, list(obj)[:8])) or "none"
        return (BAD, "missing_field", f"{where} has no field {field!r} (it has: {names}); fix that record or set the source's text_field")
    value = obj[field]
    if not isinstance(value, str):
        return (BAD, "not_text", f"{where}: field {field!r} holds {type(value).__name__} {str(value)[:40]!r}, not text; fix or remove that record")
    return (OK, value)


def _too_large(where: str, limit: int) -> Event:
    return (BAD, "too_large", f"{where} is longer than max_record_bytes ({limit}); split that record or raise max_record_bytes")


def _lines(f, pos: dict, limit: int) -> Iterator[Optional[bytes]]:
    """Binary lines from the current offset, keeping pos['offset'/'line'] exact; None for a line over `limit` bytes."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        pos["line"] += 1
        size = len(line)
        if size > limit and not line.endswith(b"\n"):
            while True:  # skip the rest of the oversized line without holding it
                more = f.readline(1 << 20)
                size += len(more)
                if not more or more.endswith(b"\n"):
                    break
            pos["offset"] += size
            yield None
            continue
        pos["offset"] += size
        yield line


def _decode(line: bytes, where: str) -> tuple[Optional[str], Optional[Event]]:
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, (BAD, "invalid_utf8", f"{where} is not valid UTF-8 (byte {exc.start + 1} of the line); re-save the file as UTF-8")


def _nonblank_lines(path: str, pos: dict, limit: int) -> Iterator[tuple[str, Optional[str], Optional[Event]]]:
    """(where, text, None) per non-blank line from pos on, or (where, None, event) for a bad or blank one."""
    with open(path, "rb") as f:
        f.seek(pos["offset"])
        for line in _lines(f, pos, limit):
            where = f"{path} line {pos['line']}"
            if line is None:
                yield where, None, _too_large(where, limit)
                continue
            text, bad = _decode(line, where)
            if bad:
                yield where, None, bad
            elif not text.strip():
                yield where, None, (SKIP, "blank_line")
            else:
                yield where, text, None


def _jsonl(path: str, pos: dict, field: str, limit: int) -> Iterator[Event]:
    for where, text, event in _nonblank_lines(path, pos, limit):
        if event:
            yield event
            continue
        try:
            obj = json.loads(text, strict=False)  # raw tabs/NULs inside strings: keep, clean decides
        except json.JSONDecodeError as exc:
            yield (BAD, "invalid_json", f"{where} is not valid JSON ({exc.msg} at column {exc.colno}); fix or remove that line")
            continue
        yield _field(obj, field, where)


def _txt_lines(path: str, pos: dict, limit: int) -> Iterator[Event]:
    for _, text, event in _nonblank_lines(path, pos, limit):
        yield event if event else (OK, text.rstrip("\r\n"))


def _txt_file(path: str, pos: dict, limit: int) -> Iterator[Event]:
    if pos["offset"] > 0:
        return
    pos["offset"], pos["line"] = 1, 1
    if os.path.getsize(path) > limit:
        yield _too_large(path, limit)
        return
    with open(path, "rb") as f:
        text, bad = _decode(f.read(), path)
    yield bad or ((OK, text) if text.strip() else (SKIP, "empty_file"))


class _TooLarge(Exception):
    pass


class _CsvLines:
    """Decoded lines for csv.reader; csv pulls exactly the lines of one record, so offsets stay exact."""

    def __init__(self, f, pos: dict, limit: int):
        self.lines, self.bad_utf8 = _lines(f, pos, limit), False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        if line is None:
            raise _TooLarge
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            self.bad_utf8 = True
            return line.decode("utf-8", "replace")


def _csv_header(path: str, delimiter: str, limit: int) -> tuple[list[str], int, int]:
    pos = {"offset": 0, "line": 0}
    with open(path, "rb") as f:
        header = next(csv.reader(_CsvLines(f, pos, limit), delimiter=delimiter), [])
    return header, pos["offset"], pos["line"]


def _csv(path: str, pos: dict, field: str, limit: int, delimiter: str) -> Iterator[Event]:
    csv.field_size_limit(max(limit, csv.field_size_limit()))
    header, body, body_line = _csv_header(path, delimiter, limit)
    if field not in header:
        pos["offset"] = os.path.getsize(path)
        yield (BAD, "missing_field", f"{path} has no column {field!r} (it has: {', '.join(header)}); set the source's text_field")
        return
    col = header.index(field)
    if pos["offset"] < body:
        pos["offset"], pos["line"] = body, body_line
    with open(path, "rb") as f:
        f.seek(pos["offset"])
        lines = _CsvLines(f, pos, limit)
        reader = csv.reader(lines, delimiter=delimiter)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except (_TooLarge, csv.Error) as exc:
                reader = csv.reader(lines, delimiter=delimiter)  # resync on the next line
                where = f"{path} line {pos['line']}"
                yield _too_large(where, limit) if isinstance(exc, _TooLarge) else (BAD, "csv_error", f"{where}: {exc}; fix that row")
                continue
            where = f"{path} line {pos['line']}"
            if lines.bad_utf8:
                lines.bad_utf8 = False
                yield (BAD, "invalid_utf8", f"{where} is not valid UTF-8; re-save the file as UTF-8")
            elif not row:
                yield (SKIP, "blank_line")
            elif len(row) != len(header):
                yield (BAD, "ragged_row", f"{where} has {len(row)} fields where the header has {len(header)}; quote fields that contain the delimiter")
            else:
                yield (OK, row[col])


def _json(path: str, pos: dict, field: str, limit: int) -> Iterator[Event]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _jsonl(path, pos, field, limit)  # JSON Lines saved as .json
        return
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f, strict=False)  # a JSON array cannot be streamed: one file at a time
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        pos["offset"] = 1 << 62
        yield (BAD, "invalid_json", f"{path} is not a valid UTF-8 JSON array ({exc}); fix it or save it as JSON Lines")
        return
    for i in range(pos["offset"], len(items)):
        pos["offset"] = pos["line"] = i + 1
        yield _field(items[i], field, f"{path} record {i + 1}")


def _parquet(path: str, pos: dict, field: str) -> Iterator[Event]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    if field not in schema.names or not (pa.types.is_string(schema.field(field).type) or pa.types.is_large_string(schema.field(field).type)):
        pos["offset"] = pf.metadata.num_rows
        what = f"has no column {field!r} (it has: {', '.join(schema.names)})" if field not in schema.names else f"column {field!r} is not text"
        yield (BAD, "missing_field", f"{path} {what}; set the source's text_field")
        return
    start, first_rg = 0, 0
    while first_rg < pf.num_row_groups and start + pf.metadata.row_group(first_rg).num_rows <= pos["offset"]:
        start += pf.metadata.row_group(first_rg).num_rows
        first_rg += 1
    row = start
    for batch in pf.iter_batches(batch_size=1024, row_groups=range(first_rg, pf.num_row_groups), columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if row <= pos["offset"]:
                continue
            pos["offset"] = pos["line"] = row
            yield (OK, value) if isinstance(value, str) else (BAD, "not_text", f"{path} row {row}: {field!r} is null; fix or remove that row")


def parse_hub(spec: str) -> tuple[str, Optional[str], str]:
    ref, _, split = spec[len(HUB):].partition("@")
    name, _, config = ref.partition(":")
    return name, config or None, split or "train"


def open_hub(spec: str):
    import datasets

    name, config, split = parse_hub(spec)
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # offline, unknown name or split: one message for the user
        raise ShardtuneError(
            f"could not open hub data set {spec} for streaming ({type(exc).__name__}); without hub access use local files (jsonl, csv, parquet, txt)."
        ) from None


def _hub_rows(spec: str) -> Iterator[dict]:
    # ds.iter(), not iter(ds): inside a DataLoader worker iter(ds) keeps only that worker's shards,
    # and every slot must see every row.
    for batch in open_hub(spec).iter(batch_size=256):
        for i in range(len(next(iter(batch.values()), ()))):
            yield {k: v[i] for k, v in batch.items()}


def _hub(spec: str, pos: dict, field: str) -> Iterator[Event]:
    for row in itertools.islice(_hub_rows(spec), pos["offset"], None):
        pos["offset"] += 1
        pos["line"] = pos["offset"]
        yield _field(row, field, f"{spec} row {pos['offset']}")


# ---------------------------------------------------------------- one source


class SourceReader:
    """The records of one source (its files in order), with a position that restores exactly."""

    def __init__(self, spec: SourceSpec, max_record_bytes: int, files: Optional[list[tuple[str, str]]] = None, record: bool = False):
        self.spec, self.limit = spec, max_record_bytes
        self.record = record  # whole records as JSON text (SFT) instead of spec.text_field
        self.hub = spec.path.startswith(HUB)
        self.files = [] if self.hub else (files if files is not None else resolve_files(spec))
        self.held: set[int] = set()  # ordinals held out for validation; skipped in later epochs
        self.restore(new_position())

    def restore(self, pos: dict) -> None:
        self.pos = dict(pos)
        self._events: Optional[Iterator[Event]] = None

    def snapshot(self) -> dict:
        return dict(self.pos)

    def rewind(self) -> None:
        """Start the next epoch (on_source_end: repeat)."""
        self.restore({**new_position(), "epoch": self.pos["epoch"] + 1})

    def _file_events(self, path: str, fmt: str) -> Iterator[Event]:
        p, field = self.pos, (None if self.record else self.spec.text_field)
        if self.record and fmt not in ("jsonl", "json"):
            raise ShardtuneError(f"{path} is {fmt}; SFT records (messages or prompt/response) are read from jsonl or json files or hub data sets.")
        if os.path.getsize(path) == 0:
            if p["offset"] == 0:
                p["offset"] = 1
                yield (SKIP, "empty_file")
            return
        if fmt == "jsonl":
            yield from _jsonl(path, p, field, self.limit)
        elif fmt in ("csv", "tsv"):
            yield from _csv(path, p, field, self.limit, "\t" if fmt == "tsv" else ",")
        elif fmt == "json":
            yield from _json(path, p, field, self.limit)
        elif fmt == "parquet":
            yield from _parquet(path, p, field)
        elif self.spec.txt_unit == "file":
            yield from _txt_file(path, p, self.limit)
        else:
            yield from _txt_lines(path, p, self.limit)

    def _all_events(self) -> Iterator[Event]:
        if self.hub:
            yield from _hub(self.spec.path, self.pos, None if self.record else self.spec.text_field)
            return
        while self.pos["file"] < len(self.files):
            yield from self._file_events(*self.files[self.pos["file"]])
            self.pos.update(file=self.pos["file"] + 1, offset=0, line=0)

    def next_event(self) -> Optional[Event]:
        """The next event, or None at the end of the source. OK events advance the ordinal."""
        if self._events is None:
            self._events = self._all_events()
        for event in self._events:
            if event[0] != OK:
                return event
            ordinal = self.pos["ordinal"]
            self.pos["ordinal"] = ordinal + 1
            if self.pos["epoch"] > 0 and ordinal in self.held:
                continue
            return event
        return None


def check_source(spec: SourceSpec, max_record_bytes: int, record: bool = False) -> list[tuple[str, str]]:
    """Fail at once on a source that cannot work (no files, wrong text_field, hub unreachable)."""
    if spec.path.startswith(HUB):
        features = getattr(open_hub(spec.path), "features", None)
        if features and not record and spec.text_field not in features:
            raise ShardtuneError(f"hub data set {spec.path} has no column {spec.text_field!r} (it has: {', '.join(features)}); set the source's text_field.")
        return []
    files = resolve_files(spec)
    reader = SourceReader(spec, max_record_bytes, files, record)
    first = next((i for i, (f, _) in enumerate(files) if os.path.getsize(f) > 0), 0)
    reader.files = files[first : first + 1]
    events = [e for e in itertools.islice(iter(reader.next_event, None), 100)]
    if events and not any(e[0] == OK for e in events):
        fields = [e for e in events if e[0] == BAD and e[1] == "missing_field"]
        if len(fields) == len([e for e in events if e[0] == BAD]) and fields:
            raise ShardtuneError(fields[0][2] + ".")
    return files
