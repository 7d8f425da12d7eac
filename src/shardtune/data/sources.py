"""Open local record files (CSV, TSV, JSONL, JSON, parquet) with line numbers.

Errors name the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from shardtune import ShardtuneError
from shardtune.assets import PACKAGED_DATA, packaged_data

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}

Record = tuple[int, dict[str, Any]]  # (1-based line or row number, fields)


HUB_PREFIX = "hub:"


def open_records(spec: str) -> tuple[str, list[Record]]:
    """A file path, packaged data set name, or `hub:NAME[:CONFIG][@SPLIT]` -> (name for messages, records)."""
    if spec.startswith(HUB_PREFIX):
        return spec, _hub(spec)
    path = resolve_data_path(spec)
    return str(path), read_records(path)


def resolve_data_path(name: str) -> Path:
    """A local file path or a packaged data set name -> an existing file."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    packaged = packaged_data(name)
    if packaged is not None:
        return packaged
    known = ", ".join(PACKAGED_DATA)
    raise ShardtuneError(
        f"data file {name} does not exist; give a CSV/TSV/JSONL/parquet path, a packaged data set ({known}) or hub:NAME[:CONFIG][@SPLIT]."
    )


def _hub(spec: str) -> list[Record]:
    import datasets

    ref, _, split = spec[len(HUB_PREFIX) :].partition("@")
    name, _, config = ref.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # offline, unknown name, unknown split: all one message for the user
        known = ", ".join(PACKAGED_DATA)
        raise ShardtuneError(
            f"could not load hub data set {spec} ({type(exc).__name__}); without hub access use a local file or a packaged data set ({known})."
        ) from None
    return [(i, row) for i, row in enumerate(ds, 1)]


def read_records(path: Path) -> list[Record]:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ShardtuneError(f"data file {path} has an unknown extension; use one of {', '.join(FORMATS)}.")
    reader = {"csv": _csv, "tsv": _csv, "jsonl": _jsonl, "json": _json, "parquet": _parquet}[fmt]
    try:
        records = list(reader(path))
    except UnicodeDecodeError as exc:
        raise ShardtuneError(f"data file {path} is not UTF-8 (byte {exc.start}); re-save it as UTF-8.") from None
    if not records:
        raise ShardtuneError(f"data file {path} has no records; point the config at a file with data.")
    return records


def _csv(path: Path) -> Iterator[Record]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise ShardtuneError(
                    f"{path} line {reader.line_num}: {len(row)} fields where the header has {len(header)}; "
                    "quote fields that contain the delimiter."
                )
            yield reader.line_num, dict(zip(header, row))


def _jsonl(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            yield n, _json_object(path, n, line)


def _json_object(path: Path, n: int, text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ShardtuneError(f"{path} line {n}: invalid JSON ({exc.msg}); fix or remove that line.") from None
    if not isinstance(obj, dict):
        raise ShardtuneError(f"{path} line {n}: expected a JSON object with named fields, found {type(obj).__name__}.")
    return obj


def _json(path: Path) -> Iterator[Record]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        yield from _jsonl(path)  # JSON Lines saved as .json
        return
    if isinstance(data, dict):
        data = [data]
    for i, obj in enumerate(data, 1):
        if not isinstance(obj, dict):
            raise ShardtuneError(f"{path} record {i}: expected a JSON object with named fields.")
        yield i, obj


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
        yield i, row
