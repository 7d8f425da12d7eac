"""A packed cache read back as a training source (`format: packed`): open it, check it fits, read its records.

The folder is what `shardtune preprocess --write` builds (cache.py describes
its layout and the parallel build). This module holds what reading and
building share: the format, the file names, and SHAPING, the settings that
shaped the stored tokens; a config whose shaping settings differ is refused
with one sentence naming the first difference, so is a stale cache (a source
file changed since the build). Reading memory-maps each open partition's
arrays; a position is a record index.

A cache at a URL (`path: s3://bucket/cache`: a folder built locally and
uploaded as it is, manifest.json last; a cache is never written to a store
directly) is read through storage.py: the manifest when a loader opens it,
then each partition's files whole (one GET each) when a slot first reads
that partition, so a slot fetches only its own partitions. A source file at
a URL is checked for staleness by its size, in one listing per source (a
store keeps no mtime that survives a copy; an object rewritten at the same
size goes unseen).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from shardtune import ShardtuneError, storage
from shardtune.config import StreamConfig
from shardtune.data.pack import IGNORE, special_ids
from shardtune.data.partitions import Part
from shardtune.data.settings import first_difference, flat, tokenizer_id

FORMAT = "shardtune.cache/1"
BUILD, MANIFEST, PARTS = "build.json", "manifest.json", "parts"
OPEN_PARTS = 64
OPEN_URL_PARTS = 4  # partitions of a cache at a URL are held in memory, not mapped: keep fewer
# The settings that shape the stored tokens (a packed source's config must agree on them).
SHAPING = ("max_record_bytes", "on_bad_record", "clean", "sft", "eos_token_id", "tokenizer", "seq_len", "holdout", "seed")


def shaping(cfg: StreamConfig, tokenizer, eos: int) -> dict[str, Any]:
    """The settings of a config that shape cached tokens (seq_len only for SFT; hold-out only with dedup)."""
    out = {"max_record_bytes": cfg.max_record_bytes, "on_bad_record": cfg.on_bad_record, "clean": cfg.clean.model_dump(mode="json"),
           "sft": cfg.sft.model_dump(mode="json") if cfg.sft else None, "eos_token_id": eos, "tokenizer": tokenizer_id(tokenizer)}
    if cfg.sft is not None:
        out["seq_len"] = cfg.seq_len
    if cfg.clean.dedup:  # train drops copies of the held-out documents
        out |= {"holdout": cfg.holdout, "seed": cfg.seed}
    return out


@dataclass
class CacheInfo:
    """An open, complete cache: what a SplitPlan needs (picklable; arrays are mapped per process)."""

    root: str
    hash: str
    parts: list  # Part(fmt="packed", start = the partition, end = its records)
    weights: list
    fields: list
    sft: bool
    _open: dict = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def arrays(self, pid: int) -> tuple:
        """A partition's arrays and meta, mapped (a URL: fetched whole); a few stay open: a slot reads one
        partition per source at a time."""
        if pid not in self._open:
            url = storage.is_url(self.root)
            if url:
                base = storage.join(self.root, PARTS, f"{pid:06d}")
                load = lambda ext: np.load(io.BytesIO(storage.read_bytes(f"{base}.{ext}.npy")))  # noqa: E731
                meta = json.loads(storage.read_bytes(f"{base}.json"))
            else:
                base = Path(self.root) / PARTS / f"{pid:06d}"
                load = lambda ext: np.load(f"{base}.{ext}.npy", mmap_mode="r")  # noqa: E731
                meta = json.loads(Path(f"{base}.json").read_text())
            if len(self._open) >= (OPEN_URL_PARTS if url else OPEN_PARTS):
                self._open.pop(next(iter(self._open)))
            self._open[pid] = (load("tok"), load("idx"), load("pcs"), load("msk") if self.sft else None, meta)
        return self._open[pid]

    def records(self, part: Part, cur: dict) -> Iterator[tuple[str, Any]]:
        """The records of a cached partition from cur["pos"] (a record index), as docstream.raw_records gives them."""
        tok, idx, pcs, msk, meta = self.arrays(part.start)
        n = len(idx) - 1
        while cur["pos"] < n:
            r = cur["pos"]
            cur["pos"] = r + 1
            if str(r) in meta["carry"]:
                yield ("count", meta["carry"][str(r)])
            (t0, p0), (t1, p1) = idx[r], idx[r + 1]
            ids = tok[t0:t1].tolist()
            labels = None if msk is None else [i if m else IGNORE for i, m in zip(ids, msk[t0:t1].tolist())]
            yield ("doc", (ids, pcs[p0:p1].tolist(), labels, meta["counts"].get(str(r), {})))
        if cur["pos"] == n:
            cur["pos"] = n + 1
            if meta["tail"]:
                yield ("count", meta["tail"])


def _rebuild(root) -> str:
    """How to (re)build the cache at root: in place, or locally and then uploaded for a URL."""
    if storage.is_url(root):
        return f"`shardtune preprocess CONFIG --write DIR` in a local folder, then upload DIR to {storage.display(root)}"
    return f"`shardtune preprocess CONFIG --write {root}`"


def _refuse(root, what: str) -> ShardtuneError:
    shown = storage.display(root) if storage.is_url(root) else root
    return ShardtuneError(f"the cache {shown} {what}; rebuild it with {_rebuild(root)} from this config, or use the cache's settings.")


def _gone(exc: ShardtuneError) -> bool:
    return "does not exist" in str(exc)


def _manifest(root: str) -> tuple[str, dict]:
    """-> (the cache's folder or URL, its manifest); one sentence when there is no complete cache."""
    if not storage.is_url(root):
        path = Path(os.path.expanduser(root))
        try:
            return str(path), json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            built = (path / BUILD).is_file()
            done = len(list((path / PARTS).glob("*.json"))) if (path / PARTS).is_dir() else 0
    else:
        root = root.rstrip("/")
        try:
            return root, json.loads(storage.read_bytes(storage.join(root, MANIFEST)))
        except ShardtuneError as exc:
            if not _gone(exc):
                raise
        except ValueError:
            pass
        built = storage.exists(storage.join(root, BUILD))
        done = sum(1 for f, _ in storage.listing(storage.join(root, PARTS) + "/", fresh=True) if f.endswith(".json")) if built else 0
    shown = storage.display(root) if storage.is_url(root) else root
    if built:
        again = f"run {_rebuild(root)} again to finish it" if not storage.is_url(root) else f"finish it with {_rebuild(root)} (the whole folder, manifest.json last)"
        raise ShardtuneError(f"the cache {shown} is not complete ({done} partitions built); {again}.")
    raise ShardtuneError(f"{shown} holds no cache ({MANIFEST}); write one with {_rebuild(root)}.")


def _url_sizes(cached: dict) -> dict[str, int]:
    """The size of every object now under the URL sources a cache was built from: one listing per source (a source
    that cannot be listed any more, like a local file that is gone, is not checked)."""
    sizes: dict[str, int] = {}
    for spec in cached.get("sources", []):
        if storage.is_url(spec["path"]):
            try:
                sizes.update(storage.listing(spec["path"], fresh=True))
            except ShardtuneError as exc:
                if "did not serve" in str(exc):  # the store is down: say so, don't skip the check
                    raise
    return sizes


def stale_file(cached: dict) -> Optional[str]:
    """The first source file of a cache that changed since the build (local: size or mtime; URL: size), or None."""
    files = cached["files"]
    urls = _url_sizes(cached) if any(storage.is_url(f[0]) for f in files) else {}
    for name, size, mtime in files:
        if storage.is_url(name):
            if name in urls and urls[name] != size:
                return storage.display(name)
        elif os.path.exists(name) and (os.path.getsize(name), os.stat(name).st_mtime_ns) != (size, mtime):
            return name
    return None


def open_cache(root: str, cfg: StreamConfig, tokenizer) -> CacheInfo:
    """A complete cache that fits this config (one sentence naming what differs otherwise) and is not stale."""
    path, manifest = _manifest(root)
    if manifest.get("format") != FORMAT:
        raise _refuse(root, f"has format {manifest.get('format')!r}, not {FORMAT}")
    cached = manifest["shaped_by"]
    now = shaping(cfg, tokenizer, special_ids(cfg, tokenizer)[0])
    if cached["tokenizer"] != now["tokenizer"]:
        raise _refuse(root, "was built with another tokenizer than this config's model")
    pick = lambda d: flat({k: d.get(k) for k in SHAPING if k != "tokenizer"}, "data")  # noqa: E731
    diff = first_difference(pick(cached), pick(now), "in the cache", "here")
    if diff:
        raise _refuse(root, f"was built with other data settings ({diff})")
    stale = stale_file(cached)
    if stale:
        raise _refuse(root, f"is stale: its source file {stale} changed since it was built (size or modification time)")
    sizes = manifest["partitions"]
    parts = [Part(pid, src, "packed", path, pid, sizes[pid]["records"], size) for pid, (src, size) in enumerate(manifest["table"])]
    return CacheInfo(path, manifest["hash"], parts, manifest["weights"], manifest["fields"], cached["sft"] is not None)
