"""What one split reads (SplitPlan) and the hold-out.

A plan is built once per loader in the main process (every rank builds the
same one without talking to the others) and travels to DataLoader workers by
pickling: the partition table, the sources' weights and text fields, the
cleaning and shuffle settings, the hold-out keys.

Hold-out (holdout: N): one pass over all partitions in order (one virtual
slot, the seeded mixture, each source read once) draws the first 10*N
records; N of them, chosen with Random("holdout:<seed>"), are the
validation documents. Every rank reads those 10*N records once when it
builds the plan (a fixed, small cost); train skips their keys on any number
of slots; validation is those N documents, one partition each.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from shardtune import ShardtuneError
from shardtune.config import CleanConfig, StreamConfig
from shardtune.data.clean import clean_document
from shardtune.data.docstream import SlotStream, fresh_slot
from shardtune.data.packed import open_cache
from shardtune.data.partitions import Part, check_source, partition_table, source_files, table_hash

HOLDOUT_POOL = 10  # the hold-out is sampled from the first HOLDOUT_POOL * N draws


@dataclass
class SplitPlan:
    """What one split reads; small and picklable (it travels to DataLoader workers)."""

    name: str  # "train" or "validation"
    parts: list  # Part, indexed by pid
    weights: list  # per source
    fields: list  # per source: the text field, None = whole records as JSON (SFT)
    clean: Optional[CleanConfig]  # None: raw text (the hold-out pool)
    on_bad: str
    limit: int  # max_record_bytes
    seed: int
    block: int = 0  # shuffle block; 0 = in order
    on_end: str = "stop"
    quota: Optional[int] = None  # max_documents
    held: frozenset = frozenset()  # (pid, rec) keys this split skips
    held_hashes: frozenset = frozenset()  # dedup hashes of the held-out documents (train drops copies)
    held_docs: list = field(default_factory=list)  # validation from the hold-out: [(doc key, text or pretokenized)]
    cache: Any = None  # packed.CacheInfo when the split reads a packed cache
    table: str = ""  # hash of the partition table (what positions mean)
    part_bytes: int = 0  # the partition_bytes the table was cut with

    @property
    def num_sources(self) -> int:
        return len(self.weights)


def source_plan(cfg: StreamConfig, specs: list, name: str, tokenizer) -> SplitPlan:
    record = cfg.sft is not None
    clean = cfg.clean.model_copy(update={"max_chars": None}) if record else cfg.clean
    common = dict(clean=clean, on_bad=cfg.on_bad_record, limit=cfg.max_record_bytes, seed=cfg.seed)
    if any(s.format == "packed" for s in specs):
        if len(specs) != 1:
            raise ShardtuneError("a packed cache must be the only source of its split; build one cache of all the sources with `shardtune preprocess --write`.")
        info = open_cache(specs[0].path, cfg, tokenizer)
        return SplitPlan(name, info.parts, info.weights, info.fields, cache=info, table=info.hash, **common)
    files = source_files(specs, record)
    parts, part_bytes = partition_table(specs, files, cfg.partition_bytes)
    for i, spec in enumerate(specs):
        check_source(spec, [p for p in parts if p.source == i], cfg.max_record_bytes, None if record else spec.text_field)
    fields = [None if record else s.text_field for s in specs]
    return SplitPlan(name, parts, [s.weight for s in specs], fields, table=table_hash(parts), part_bytes=part_bytes, **common)


def build_plan(cfg: StreamConfig, split: str, tokenizer) -> SplitPlan:
    """Resolve and check the sources of a split (fails at once on unusable ones)."""
    if split not in ("train", "validation"):
        raise ShardtuneError(f"unknown data split {split!r}; use train or validation.")
    if split == "validation" and cfg.validation_sources:
        return replace(source_plan(cfg, cfg.validation_sources, "validation", tokenizer), on_end="drop")
    if split == "validation" and not cfg.holdout:
        raise ShardtuneError("there is no validation data; set validation_sources or holdout in the stream config.")
    base = source_plan(cfg, cfg.sources, split, tokenizer)
    if not cfg.holdout:
        return replace(base, block=cfg.shuffle_block, on_end=cfg.on_source_end, quota=cfg.max_documents)
    held, docs, hashes = plan_holdout(cfg, base)
    if split == "validation":
        parts = [Part(j, 0, "held", "", j, 1, 1) for j in range(len(docs))]  # equal weights: dealt evenly, the same from a cache
        return replace(base, parts=parts, weights=[1.0], fields=[base.fields[0]], on_end="drop", held_docs=docs, table=base.table + ":held")
    return replace(base, block=cfg.shuffle_block, on_end=cfg.on_source_end, quota=cfg.max_documents, held=held, held_hashes=hashes)


def plan_holdout(cfg: StreamConfig, base: SplitPlan) -> tuple[frozenset, list, frozenset]:
    """Read the first HOLDOUT_POOL*N draws of one pass and pick the N held-out ones (seeded)."""
    n = cfg.holdout
    pool = replace(base, clean=None, block=0, on_end="drop")
    by_source = [[p.pid for p in base.parts if p.source == i] for i in range(base.num_sources)]
    stream = SlotStream(pool, 0, 1, fresh_slot(by_source, None))
    keys, payloads = [], []
    while len(keys) < HOLDOUT_POOL * n:
        doc = stream.next_doc()
        if doc.end:
            break
        keys.append(doc.key)
        payloads.append(doc.pieces[0] if doc.tokens is None else doc.tokens)
    if len(keys) <= n:
        raise ShardtuneError(f"holdout of {n} documents needs more documents than the sources hold ({len(keys)}); lower holdout.")
    chosen = sorted(random.Random(f"holdout:{cfg.seed}").sample(range(len(keys)), n))
    hashes: set[int] = set()
    for i in chosen:
        if base.cache is None and base.clean.dedup:  # train then drops exact copies of validation documents
            clean_document(payloads[i], base.clean, hashes)
    held = frozenset((keys[i] >> 32, keys[i] & 0xFFFFFFFF) for i in chosen)
    return held, [(keys[i], payloads[i]) for i in chosen], frozenset(hashes)
