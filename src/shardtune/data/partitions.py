"""Sources -> a fixed table of logical partitions, and the deal of partitions to slots.

The partition table of a split depends on its sources (files, their sizes,
parquet metadata) and `partition_bytes` only, never on the number of ranks or
workers:

- a jsonl, txt (one record per line), csv or tsv file larger than
  partition_bytes is cut into byte ranges of about that size (readers.py
  aligns each range to record boundaries); smaller files are one partition
- a compressed file (.gz, .zst, .bz2, .xz): one partition, whatever its size
  (a range of compressed bytes cannot be decoded on its own)
- a parquet file: one partition per row group
- a JSON array, a txt file with txt_unit: file, an empty file: the whole file
- a hub data set: one partition per shard of its streaming IterableDataset
- a packed cache (format: packed): its partitions (packed.py)

partition_bytes None = the split's source bytes / 16384, clamped to
[4 KiB, 64 MiB]: ~16K partitions for a terabyte, a few per slot for a
test corpus of a few tens of KB.

The deal (`deal`) gives each slot a disjoint set of partitions: per source,
largest first, to the slot that holds the fewest bytes of that source (ties:
the fewest bytes in all, then the lowest slot). Every slot then holds about
1/S of every source, and at most the average plus one partition in bytes
(the LPT bound). It is a pure function of (weights, S), so every rank and
worker computes the same deal without talking to the others.
"""

from __future__ import annotations

import glob
import hashlib
import heapq
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from shardtune import ShardtuneError, storage
from shardtune.compression import CODECS, codec, strip_codec
from shardtune.config import SourceSpec
from shardtune.data import hub
from shardtune.data.hub import HUB
from shardtune.data.readers import BAD, BOM, OK, read_part

EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".txt": "txt"}
SPLITTABLE = ("jsonl", "txt", "csv", "tsv")
MIN_PART, MAX_PART, TARGET_PARTS = 4 << 10, 64 << 20, 16384
HUB_SHARD_WEIGHT = 1 << 20  # a hub shard's size is unknown: all shards weigh the same
TO_END = 1 << 62  # the end of a compressed file's partition: its decompressed size is unknown


@dataclass(frozen=True)
class Part:
    """One logical partition. fmt names its reader (readers.read_part): jsonl, csv, tsv, txt (lines), txtfile,
    json (array), parquet (start = row group, end = its rows), hub (start = shard, end = shards), empty,
    packed (packed.py), held (a held-out document, docstream.py)."""

    pid: int
    source: int
    fmt: str
    path: str
    start: int
    end: int
    size: int  # bytes, the deal's weight

    def initial_pos(self) -> int:
        return self.start if self.fmt in SPLITTABLE else 0

    def remaining(self, pos: int) -> int:
        """Bytes left to read from `pos` (an estimate for whole-file and row formats)."""
        if self.end == TO_END:
            return self.size if pos == 0 else self.size // 2  # a compressed file: how far it is read is unknown
        if self.fmt in SPLITTABLE:
            return max(0, self.end - pos)
        span = max(1, self.end if self.fmt in ("parquet", "json", "packed") else 1)
        return max(0, self.size - self.size * min(pos, span) // span)


def auto_partition_bytes(total: int) -> int:
    return min(MAX_PART, max(MIN_PART, total // TARGET_PARTS))


# ---------------------------------------------------------------- files of a source


def text_format(name: str) -> Optional[str]:
    """The format a file name says, a codec suffix dropped (`d.jsonl.gz` -> jsonl); None when unknown."""
    return EXTENSIONS.get(os.path.splitext(strip_codec(name))[1].lower())


def _listed(spec: SourceSpec) -> list[str]:
    """The files of a source at a URL: an object, a glob, or a prefix taken as a folder (one listing, storage.py)."""
    found = storage.listing(spec.path)
    shown = storage.display(spec.path)
    if not found:
        raise ShardtuneError(f"data source {shown} matches no objects; fix the URL, the pattern or the prefix.")
    if storage.has_magic(spec.path) or [f for f, _ in found] == [spec.path]:
        return [f for f, _ in found]
    root = spec.path.rstrip("/") + "/"
    files = [f for f, _ in found if text_format(f) and not any(x.startswith(".") for x in f[len(root):].split("/"))]
    if not files:
        raise ShardtuneError(f"data prefix {shown} holds no {'/'.join(EXTENSIONS)} objects; point the source at a prefix with data.")
    return files


def _local_files(spec: SourceSpec) -> list[str]:
    raw = os.path.expanduser(spec.path)
    if any(c in raw for c in "*?["):
        files = sorted(f for f in glob.glob(raw, recursive=True) if os.path.isfile(f))
        if not files:
            raise ShardtuneError(f"data source {spec.path!r} matches no files (relative to {os.getcwd()}); fix the pattern or the folder.")
        return files
    if os.path.isdir(raw):
        files = sorted(
            str(p) for p in Path(raw).rglob("*")
            if p.is_file() and text_format(p.name) and not any(part.startswith(".") for part in p.relative_to(raw).parts)
        )
        if not files:
            raise ShardtuneError(f"data folder {spec.path} holds no {'/'.join(EXTENSIONS)} files; point the source at a folder with data.")
        return files
    if os.path.isfile(raw):
        return [raw]
    raise ShardtuneError(f"data source {spec.path} does not exist; give a file, folder, glob, object-store URL or hub:NAME[:CONFIG][@SPLIT].")


def resolve_files(spec: SourceSpec) -> list[tuple[str, str]]:
    """-> [(file, format)] in a fixed (sorted) order; one clear error when nothing usable matches."""
    files = _listed(spec) if storage.is_url(spec.path) else _local_files(spec)
    out = []
    for f in files:
        fmt = spec.format or text_format(f)
        if fmt is None:
            raise ShardtuneError(f"data file {storage.display(f)} has an unknown extension; use one of {', '.join(EXTENSIONS)} "
                                 f"(compressed: {', '.join(CODECS)} after it) or set the source's format.")
        out.append((f, fmt))
    if all(storage.size(f) == 0 for f, _ in out):
        raise ShardtuneError(f"data source {storage.display(spec.path)} has only empty files; point it at files with data.")
    return out


def _json_kind(path: str) -> str:
    """json (an array, or one object over several lines: read whole) or jsonl (JSON Lines saved as .json)."""
    with storage.open_input(path, end_hint=1) as f:
        first = f.readline().removeprefix(BOM).strip()
    if first.startswith(b"["):
        return "json"
    try:
        json.loads(first)
        return "jsonl"
    except ValueError:
        return "json"


def file_parts(path: str, fmt: str, spec: SourceSpec, part_bytes: int) -> list[tuple[str, str, int, int, int]]:
    """(fmt, path, start, end, size) for each partition of one file."""
    size = storage.size(path)
    if size == 0:
        return [("empty", path, 0, 0, 0)]
    if fmt == "json":
        fmt = _json_kind(path)
    if fmt == "txt" and spec.txt_unit == "file":
        return [("txtfile", path, 0, size, size)]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        if codec(path):
            raise ShardtuneError(f"{storage.display(path)} is a compressed parquet file; parquet compresses its own pages: use the .parquet file.")
        meta = pq.ParquetFile(storage.open_input(path) if storage.is_url(path) else path).metadata
        return [("parquet", path, g, meta.row_group(g).num_rows, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]
    if codec(path) and fmt in SPLITTABLE:
        return [(fmt, path, 0, TO_END, size)]
    if fmt not in SPLITTABLE or not spec.split or size <= part_bytes:
        return [(fmt, path, 0, size, size)]
    n = -(-size // part_bytes)
    cuts = [i * size // n for i in range(n + 1)]
    return [(fmt, path, a, b, b - a) for a, b in zip(cuts, cuts[1:])]


def source_files(specs: list[SourceSpec], record: bool) -> list[list[tuple[str, str]]]:
    """The files of each (non-hub) source, checked: SFT records cannot come from txt files."""
    out = []
    for spec in specs:
        files = [] if spec.path.startswith(HUB) else resolve_files(spec)
        if record and any(fmt == "txt" for _, fmt in files):
            raise ShardtuneError(f"{spec.path} is txt; SFT records (messages or prompt/response) are read from jsonl, json, csv, tsv or parquet files or hub data sets.")
        out.append(files)
    return out


def partition_table(specs: list[SourceSpec], files: list[list[tuple[str, str]]], part_bytes: Optional[int]) -> tuple[list[Part], int]:
    """All partitions of a split's sources, in source and file order -> (parts, the partition_bytes used)."""
    total = sum(storage.size(f) for fs in files for f, _ in fs)
    part_bytes = part_bytes or auto_partition_bytes(total)
    rows: list[tuple[int, tuple]] = []
    for i, (spec, fs) in enumerate(zip(specs, files)):
        if spec.path.startswith(HUB):
            n = max(1, int(getattr(hub.open_hub(spec.path), "n_shards", 1) or 1))
            rows += [(i, ("hub", spec.path, k, n, HUB_SHARD_WEIGHT)) for k in range(n)]
        for path, fmt in fs:
            rows += [(i, row) for row in file_parts(path, fmt, spec, part_bytes)]
    return [Part(pid, src, *row) for pid, (src, row) in enumerate(rows)], part_bytes


def table_hash(parts: list[Part]) -> str:
    """What positions in the table mean: every partition and the size of every file."""
    rows = [(p.source, p.fmt, p.path, p.start, p.end) for p in parts]
    sizes = sorted({(p.path, storage.size(p.path)) for p in parts if p.fmt not in ("hub", "held", "packed")})
    return hashlib.sha256(json.dumps([rows, sizes]).encode()).hexdigest()[:16]


def check_source(spec: SourceSpec, parts: list[Part], limit: int, field: Optional[str]) -> None:
    """Fail at once on a source that cannot work: a text_field that its first records do not have."""
    if spec.path.startswith(HUB):
        features = getattr(hub.open_hub(spec.path), "features", None)
        if features and field is not None and field not in features:
            raise ShardtuneError(f"hub data set {spec.path} has no column {field!r} (it has: {', '.join(features)}); set the source's text_field.")
        return
    from shardtune.data.readers import field_text, sentence

    first = next((p for p in parts if p.fmt != "empty"), None)
    if first is None:
        return
    events = []
    for event in read_part(first, {"pos": first.initial_pos()}, limit, None if field is None else [field]):
        events.append(field_text(event[1], field, event[2]) if event[0] == OK else event)
        if len(events) >= 100:
            break
    bads = [e for e in events if e[0] == BAD]
    if bads and not any(e[0] == OK for e in events) and all(e[1] == "missing_field" for e in bads):
        raise ShardtuneError(sentence(bads[0]) + ".")


# ---------------------------------------------------------------- the deal


def deal(weights: list[tuple[int, int, int]], num_slots: int) -> list[list[int]]:
    """(pid, source, weight) items -> the pids of each slot (see the module docstring)."""
    total = [0] * num_slots
    out: list[list[int]] = [[] for _ in range(num_slots)]
    by_source: dict[int, list[tuple[int, int]]] = {}
    for pid, src, w in weights:
        by_source.setdefault(src, []).append((pid, w))
    for src in sorted(by_source):
        heap = [(0, total[j], j) for j in range(num_slots)]
        heapq.heapify(heap)
        for pid, w in sorted(by_source[src], key=lambda x: (-x[1], x[0])):
            load, _, j = heapq.heappop(heap)
            out[j].append(pid)
            total[j] += w
            heapq.heappush(heap, (load + w, total[j], j))
    return out
