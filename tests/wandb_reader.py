"""Read back what a run logged to an offline W&B run file (`run-*.wandb`).

The file is the LevelDB log format: a 7-byte header (":W&B", magic 0xBEE1,
version 0 or 1), then 32 KiB blocks of records, each with a 4-byte CRC, a 2-byte
length and a 1-byte type (FULL/FIRST/MIDDLE/LAST); a record's payload is a
`wandb_internal_pb2.Record` protobuf.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1 and version in (0, 1), "not a W&B run file"
    out, pos, parts = [], HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        parts.append(payload)
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            out.append(rec)
            parts = []
    return out


def run_file(run_dir: Path) -> Path:
    """The newest offline run file under run_dir. A run finished in this process may still be in W&B's service's
    write buffer (run.finish() returns before the service closes the file): the service is stopped first, as the
    end of a real `shardtune` process stops it."""
    if "WANDB_SERVICE" in os.environ:
        import wandb

        wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run file under {run_dir}"
    return files[-1]


def _put(row: dict, item) -> None:
    """A flat key, or a nested one (a logged table arrives as ["eval/generations", "nrows"], ...)."""
    path = [item.key] if item.key else list(item.nested_key)
    for part in path[:-1]:
        row = row.setdefault(part, {})
    row[path[-1]] = json.loads(item.value_json)


def history(path: Path) -> list[dict]:
    """One dict per logged step: {"_step": n, key: value, ...}."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in rec.history.item:
                _put(row, item)
            rows.append(row)
    return rows


def config(path: Path) -> dict:
    out = {}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        updates = rec.config.update if kind == "config" else rec.run.config.update if kind == "run" else []
        for item in updates:
            key = item.key or "/".join(item.nested_key)
            out[key] = json.loads(item.value_json)
    return out


def summary(path: Path) -> dict:
    out = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                key = item.key or "/".join(item.nested_key)
                out[key] = json.loads(item.value_json)
    return out


def run_info(path: Path) -> pb.RunRecord:
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            return rec.run
    raise AssertionError("no run record")
