"""The pretokenized cache: built in parallel without collectives (read back as a training source by packed.py).

`shardtune preprocess CONFIG --write DIR` stores, for every partition of the
split's sources (partitions.py), its records in reading order, cleaned and
tokenized: what the stream would tokenize, so training from the cache
(`data.sources: [{path: DIR, format: packed}]`) gives the same documents,
hence with the same packing, shuffle and mixture settings the same rows and
losses as training from the sources, on any number of slots. Packing
(seq_len, split_documents, doc_positions), shuffle, mixture, hold-out and
max_documents are applied when the cache is read, so they can change without
a rebuild; what shaped the stored tokens cannot (see packed.SHAPING).

    DIR/build.json           format, what shaped it (`shaped_by`: source specs, every file with its size
                             and mtime, partition_bytes, cleaning, SFT shaping, EOS id, tokenizer hash,
                             hold-out with dedup) and its hash, the partition table, source weights
    DIR/parts/<pid>.tok.npy  token ids of the partition's documents, concatenated (uint16 or int32)
    DIR/parts/<pid>.idx.npy  int64 [records + 1, 2]: each record's first token and first piece start
    DIR/parts/<pid>.pcs.npy  int32: piece starts within each document (EOS-separated pieces)
    DIR/parts/<pid>.msk.npy  uint8, SFT only: 1 where the label is the token (responses)
    DIR/parts/<pid>.json     records, tokens, counts per record (bad records before it, drops and
                             repairs), counts after the last record, which builder wrote it;
                             written last: the partition is done
    DIR/manifest.json        build.json plus the per-partition sizes and totals; written when every
                             partition is done: the cache is complete

A cache lives in a local folder while it is built (builders coordinate by
renaming files in it); to train from an object store, build it locally and
upload the folder as it is (`aws s3 cp --recursive DIR s3://bucket/cache`,
manifest.json last), then read `path: s3://bucket/cache` (packed.py). Its
sources may be URLs: a source object is recorded with its size and no mtime.

Parallel build: builder b of N builds deal(partitions, N)[b] (the same deal as
the stream's, over all partitions, so any N splits the work disjointly), each
partition written to temporary names and renamed; builders share nothing but
the folder. Whoever finds every partition done writes the manifest (the same
bytes whoever does). An interrupted build is resumed by running it again
with any number of builders: done partitions are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from shardtune import ShardtuneError, failpoints, storage
from shardtune.config import StreamConfig
from shardtune.data.clean import Counts, add_counts, clean_document
from shardtune.data.docstream import Doc, raw_records
from shardtune.data.pack import IGNORE, PackOptions, special_ids, tokenize_documents
from shardtune.data.packed import BUILD, FORMAT, MANIFEST, PARTS, shaping
from shardtune.data.partitions import Part, deal
from shardtune.data.plan import build_plan
from shardtune.data.settings import first_difference, flat
from shardtune.data.sft import shape_document


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _tokenized(plan, part: Part, cfg: StreamConfig, tokenizer, opt: PackOptions) -> tuple[list, Counts]:
    """-> ([(counts before it, TokDoc)] per record, counts after the last), as the stream would make them."""
    seen = set(plan.held_hashes) if plan.clean.dedup else None
    records, carry = [], {}
    for kind, payload in raw_records(plan, part, {"pos": part.initial_pos()}):
        if kind == "count":
            add_counts(carry, payload)
            continue
        held = (part.pid, len(records)) in plan.held  # validation's: stored whole, never a dedup key
        pieces, counts = clean_document(payload, plan.clean, None if held else seen)
        records.append((carry, Doc(len(records), pieces, counts, source=part.source)))
        carry = {}
    docs = [d for _, d in records]
    if cfg.sft is not None:
        toks = [shape_document(d, tokenizer, cfg.sft, cfg.clean, opt) for d in docs]
    else:
        toks = list(tokenize_documents(iter(docs), tokenizer, opt.eos_id, cfg.tokenize_batch, finished=False))
    return [(c, td) for (c, _), td in zip(records, toks)], carry


def _save(base: Path, ext: str, arr: np.ndarray) -> None:
    tmp = base.with_name(f".{base.name}.{ext}.tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, f"{base}.{ext}.npy")


def build_part(plan, part: Part, cfg: StreamConfig, tokenizer, opt: PackOptions, root: Path, dtype, builder: int) -> dict:
    """Write one partition's arrays, then its .json (the done marker); -> its summary."""
    recs, tail = _tokenized(plan, part, cfg, tokenizer, opt)
    ids = [td.ids for _, td in recs]
    idx = np.zeros((len(recs) + 1, 2), dtype=np.int64)
    idx[1:, 0] = np.cumsum([len(x) for x in ids])
    idx[1:, 1] = np.cumsum([len(td.starts) for _, td in recs])
    base = root / PARTS / f"{part.pid:06d}"
    _save(base, "tok", np.array([t for x in ids for t in x], dtype=dtype))
    _save(base, "idx", idx)
    _save(base, "pcs", np.array([s for _, td in recs for s in td.starts], dtype=np.int32))
    if cfg.sft is not None:
        _save(base, "msk", np.array([lab != IGNORE for _, td in recs for lab in (td.labels or [])], dtype=np.uint8))
    totals: Counts = dict(tail)
    for carry, td in recs:
        add_counts(add_counts(totals, carry), td.doc.counts)
        if td.ids:
            add_counts(totals, {"data/documents": 1, "data/tokens": len(td.ids)})
    meta = {"records": len(recs), "tokens": int(idx[-1, 0]), "builder": builder, "totals": totals, "tail": tail,
            "carry": {str(r): c for r, (c, _) in enumerate(recs) if c}, "counts": {str(r): td.doc.counts for r, (_, td) in enumerate(recs) if td.doc.counts}}
    tmp = base.with_name(f".{base.name}.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, f"{base}.json")
    return meta


def _build_record(cfg: StreamConfig, plan, tokenizer, eos: int, split: str) -> dict:
    files = sorted({p.path for p in plan.parts if p.fmt != "hub"})
    shaped = shaping(cfg, tokenizer, eos) | {
        "split": split, "partition_bytes": plan.part_bytes,
        "sources": [s.model_dump(mode="json", exclude={"weight"}) for s in (cfg.sources if split == "train" else cfg.validation_sources)],
        "files": [[f, storage.size(f), None] if storage.is_url(f) else [f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files],
    }
    return {"format": FORMAT, "hash": _hash(shaped), "shaped_by": shaped, "table": [[p.source, p.size] for p in plan.parts],
            "weights": plan.weights, "fields": plan.fields, "dtype": "uint16" if max(len(tokenizer), eos + 1) <= 1 << 16 else "int32"}


def _claim_folder(root: Path, record: dict) -> None:
    """Start or join a build in root: write build.json unless there is one, then check that it is this build.
    Builders may start at the same moment: what one of them may see of another's start (its build.json, being
    written, or parts/) counts as a build, anything else in the folder is refused."""
    build_file = root / BUILD
    if not build_file.is_file():
        if root.exists() and not root.is_dir():
            raise ShardtuneError(f"--write {root} is a file; choose a folder.")
        root.mkdir(parents=True, exist_ok=True)
        other = [p.name for p in root.iterdir() if p.name != PARTS and not p.name.startswith(f".{BUILD}.tmp")]
        if other and not build_file.is_file():
            raise ShardtuneError(f"--write {root} already exists and is neither empty nor a cache build; remove it or choose another folder.")
        tmp = root / f".{BUILD}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, build_file)
    there = json.loads(build_file.read_text())
    if there.get("hash") != record["hash"]:
        diff = first_difference(flat(there.get("shaped_by", {}), "data"), flat(record["shaped_by"], "data"))
        raise ShardtuneError(f"{root} holds a cache build with other data settings ({diff}); remove it or choose another folder.")
    (root / PARTS).mkdir(exist_ok=True)


@dataclass
class BuildReport:
    built: list  # pids built by this builder now
    mine: int  # partitions dealt to this builder
    total: int
    done: int  # partitions done in the folder now
    seconds: float
    complete: bool
    totals: Counts


def finish_if_done(root: Path) -> Optional[dict]:
    """Write the manifest when every partition is done (whoever gets here first; the same bytes anyway)."""
    record = json.loads((root / BUILD).read_text())
    metas = []
    for pid in range(len(record["table"])):
        meta = root / PARTS / f"{pid:06d}.json"
        if not meta.is_file():
            return None
        metas.append(json.loads(meta.read_text()))
    totals: Counts = {}
    for m in metas:
        add_counts(totals, m["totals"])
    manifest = {**record, "partitions": [{"records": m["records"], "tokens": m["tokens"]} for m in metas], "totals": dict(sorted(totals.items()))}
    tmp = root / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, root / MANIFEST)
    return manifest


def build(cfg: StreamConfig, tokenizer, root: Path, split: str = "train", builder: int = 0, builders: int = 1) -> BuildReport:
    """Build builder `builder`'s share of the cache of `split` in root (see the module docstring)."""
    if storage.is_url(str(root).replace(":/", "://", 1)):  # (a Path turns s3://b into s3:/b)
        raise ShardtuneError(f"--write {root} is a URL; a cache is built in a local folder: write it to a local DIR, upload DIR "
                             "to the store (manifest.json last), and train from the URL with format: packed.")
    if any(s.format == "packed" for s in cfg.sources + cfg.validation_sources):
        raise ShardtuneError("this config's sources are already a packed cache; --write builds a cache from raw sources.")
    if split == "validation" and not cfg.validation_sources:
        raise ShardtuneError("--split validation builds a cache of data.validation_sources, and this config has none (a hold-out is read from the train cache).")
    start = time.perf_counter()
    eos, pad = special_ids(cfg, tokenizer)
    plan = build_plan(cfg, split, tokenizer)
    record = _build_record(cfg, plan, tokenizer, eos, split)
    _claim_folder(root, record)
    opt = PackOptions(cfg.seq_len, eos, pad)
    mine = deal([(p.pid, p.source, p.size) for p in plan.parts], builders)[builder]
    built, totals = [], {}
    for pid in sorted(mine):
        if not (root / PARTS / f"{pid:06d}.json").is_file():
            add_counts(totals, build_part(plan, plan.parts[pid], cfg, tokenizer, opt, root, np.dtype(record["dtype"]), builder)["totals"])
            built.append(pid)
            failpoints.hit("cache", builder, len(built))  # tests: kill@cache=K,rank=B kills builder B after its K-th partition
    manifest = finish_if_done(root)
    done = len(record["table"]) if manifest else sum(1 for _ in (root / PARTS).glob("*.json"))
    return BuildReport(built, len(mine), len(record["table"]), done, time.perf_counter() - start, manifest is not None, totals)
