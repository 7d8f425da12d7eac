"""The global document order of one split, and the documents one slot owns.

    sources --draws--> mixture --split--> hold-out filter --limit--> block shuffle --> global index g

- Mixture: draw d picks a source with a counter-based random number
  u(seed, d, attempt), so no RNG state exists beyond the draw counter. An
  exhausted source is rejected and the draw retried with attempt+1
  (`drop`), ends the stream (`stop`), or restarts (`repeat`); rejection gives
  the same result whether or not a resumed run already knows the source is
  exhausted.
- Hold-out: a seeded sample of N draws among the first 10*N is validation;
  train skips them (and, with `repeat`, skips those records in later epochs).
- Block shuffle: documents are permuted within consecutive blocks of B by a
  permutation seeded with (seed, block). It needs no buffer state: resuming
  re-reads the block from its start snapshot. Without shuffle, blocks of 64
  only bound how far a resume re-reads.
- Bad records never get an index: the clean file and the dirty file give the
  same g for every valid record. Every slot reads (and parses) every record,
  and owns g round-robin; this is what makes positions global and exact.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional

from shardtune import ShardtuneError
from shardtune.data.clean import CleanConfig, Counts, add_counts, clean_document
from shardtune.data.readers import BAD, OK, SourceReader, new_position

if TYPE_CHECKING:
    from shardtune.data.stream import StreamConfig

UNSHUFFLED_BLOCK = 64
HOLDOUT_POOL = 10  # the hold-out is sampled from the first HOLDOUT_POOL * N draws
_M = (1 << 64) - 1


def _mix(z: int) -> int:
    """splitmix64 finalizer: a fast, well-spread integer hash."""
    z = (z + 0x9E3779B97F4A7C15) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


def uniform(seed: int, d: int, attempt: int) -> float:
    return _mix(_mix(_mix(seed & _M) ^ d) ^ attempt) / 2.0**64


@dataclass
class Draw:
    d: int
    src: int
    text: str
    ordinal: int
    epoch: int
    counts: Counts = field(default_factory=dict)  # skipped/bad records met while drawing this one


class DrawStream:
    """The weighted mixture; snapshot() is its whole state (draw counter + source positions)."""

    def __init__(self, readers: list[SourceReader], weights: list[float], seed: int, on_end: str, on_bad: str):
        self.readers, self.seed, self.on_end, self.on_bad = readers, seed, on_end, on_bad
        total = sum(weights)
        self.cum = list(itertools.accumulate(w / total for w in weights))
        self.restore(None)

    def restore(self, snap: Optional[dict]) -> None:
        snap = snap or {"draw": 0, "sources": None, "exhausted": [False] * len(self.readers), "ended": False}
        self.d, self.ended, self.exhausted = snap["draw"], snap["ended"], list(snap["exhausted"])
        for reader, pos in zip(self.readers, snap["sources"] or [None] * len(self.readers)):
            reader.restore(pos or new_position())
        self.tail_counts: Counts = {}

    def snapshot(self) -> dict:
        return {"draw": self.d, "sources": [r.snapshot() for r in self.readers], "exhausted": list(self.exhausted), "ended": self.ended}

    def _pick(self, attempt: int) -> int:
        if len(self.cum) == 1:
            return 0
        return min(bisect.bisect_right(self.cum, uniform(self.seed, self.d, attempt)), len(self.cum) - 1)

    def _read(self, i: int, counts: Counts) -> Optional[tuple[str, int, int]]:
        reader = self.readers[i]
        while True:
            event = reader.next_event()
            if event is None:
                return None
            if event[0] == OK:
                return event[1], reader.pos["ordinal"] - 1, reader.pos["epoch"]
            kind = "dropped" if event[0] == BAD else "skipped"
            if event[0] == BAD and self.on_bad == "error":
                raise ShardtuneError(f"{event[2]} (or set on_bad_record: skip to drop and count such records).")
            key = f"data/{kind}/{event[1]}"
            counts[key] = counts.get(key, 0) + 1

    def next(self) -> Optional[Draw]:
        counts: Counts = {}
        attempt = 0
        while not self.ended:
            if all(self.exhausted):
                self.ended = True
                break
            i = self._pick(attempt)
            if self.exhausted[i]:
                if self.on_end == "stop":
                    self.ended = True
                    break
                attempt += 1
                continue
            got = self._read(i, counts)
            if got is None and self.on_end == "repeat" and self.readers[i].pos["ordinal"] > 0:
                self.readers[i].rewind()
                got = self._read(i, counts)
            if got is None:
                self.exhausted[i] = True
                continue
            self.d += 1
            return Draw(self.d - 1, i, got[0], got[1], got[2], counts)
        add_counts(self.tail_counts, counts)
        return None


# ---------------------------------------------------------------- one split


@dataclass
class SplitPlan:
    """What one split reads; small and picklable (it travels to DataLoader workers)."""

    name: str  # "train" or "validation"
    specs: list  # SourceSpec
    files: list  # resolved files per source
    held: frozenset = frozenset()  # hold-out draw indices (< pool)
    held_ordinals: list = field(default_factory=list)  # per source: ordinals of held-out records
    pool: int = 0
    held_hashes: frozenset = frozenset()  # dedup hashes of the held-out documents (train skips copies)
    from_holdout: bool = False  # validation made of the held-out draws
    limit: Optional[int] = None
    block: int = UNSHUFFLED_BLOCK
    shuffle: bool = False
    on_end: str = "stop"
    record: bool = False  # read whole records as JSON text (SFT), not the sources' text_field


def make_readers(plan: SplitPlan, max_record_bytes: int) -> list[SourceReader]:
    readers = [SourceReader(spec, max_record_bytes, files, plan.record) for spec, files in zip(plan.specs, plan.files)]
    for reader, ordinals in zip(readers, plan.held_ordinals or [set()] * len(readers)):
        reader.held = set(ordinals)
    return readers


def plan_holdout(cfg: "StreamConfig", files: list) -> tuple[frozenset, list, int, frozenset]:
    """Read the first HOLDOUT_POOL*N draws once and pick the N held-out ones (seeded)."""
    n = cfg.holdout
    readers = [SourceReader(spec, cfg.max_record_bytes, f, cfg.sft is not None) for spec, f in zip(cfg.sources, files)]
    draws = DrawStream(readers, [s.weight for s in cfg.sources], cfg.seed, cfg.on_source_end, cfg.on_bad_record)
    keys, texts = [], []
    while len(keys) < HOLDOUT_POOL * n and (draw := draws.next()) is not None:
        keys.append((draw.src, draw.ordinal, draw.epoch))
        texts.append(draw.text)
    if len(keys) <= n:
        raise ShardtuneError(f"holdout of {n} documents needs more documents than the sources hold ({len(keys)}); lower holdout.")
    held = sorted(random.Random(f"holdout:{cfg.seed}").sample(range(len(keys)), n))
    if any(keys[i][2] > 0 for i in held):
        raise ShardtuneError(f"the hold-out pool ({HOLDOUT_POOL}x{n} documents) is larger than a repeated source; lower holdout or give validation_sources.")
    ordinals = [set() for _ in cfg.sources]
    hashes: set[int] = set()
    for i in held:
        ordinals[keys[i][0]].add(keys[i][1])
        if cfg.clean.dedup:  # train then drops exact copies of validation documents
            clean_document(texts[i], cfg.clean, hashes)
    return frozenset(held), ordinals, len(keys), frozenset(hashes)


class DocStream:
    """Global order of one split: iterate(snapshot) yields (g, draw, block snapshot), then (end, None, snapshot)."""

    def __init__(self, plan: SplitPlan, seed: int, on_bad: str, max_record_bytes: int):
        self.plan, self.seed = plan, seed
        weights = [s.weight for s in plan.specs]
        self.draws = DrawStream(make_readers(plan, max_record_bytes), weights, seed, plan.on_end, on_bad)

    def _wanted(self, draw: Draw) -> Optional[bool]:
        """True = in this split, False = not, None = this split has ended."""
        plan = self.plan
        if plan.from_holdout:
            if draw.d >= plan.pool:
                return None
            draw.counts = {}  # bad records are counted by the train split only
            return draw.d in plan.held
        if plan.name == "validation":
            draw.counts = {}
        return draw.d >= plan.pool or draw.d not in plan.held

    def iterate(self, snap: Optional[dict]) -> Iterator[tuple[int, Optional[Draw], dict]]:
        plan, B = self.plan, self.plan.block
        self.draws.restore(snap["draws"] if snap else None)
        t = snap["t"] if snap else 0
        carry: Counts = {}
        ended = False
        while True:
            start = {"draws": self.draws.snapshot(), "t": t}
            items: list[Draw] = []
            while len(items) < B and not ended and (plan.limit is None or t + len(items) < plan.limit):
                draw = self.draws.next()
                wanted = None if draw is None else self._wanted(draw)
                if wanted is None:
                    ended = True
                elif not wanted:
                    add_counts(carry, draw.counts)
                else:
                    if carry:
                        draw.counts, carry = add_counts(carry, draw.counts), {}
                    items.append(draw)
            order = list(range(len(items)))
            if plan.shuffle:
                random.Random(f"shuffle:{self.seed}:{t // B}").shuffle(order)
            for i, j in enumerate(order):
                yield t + i, items[j], start
            t += len(items)
            if len(items) < B:
                tail = add_counts(carry, self.draws.tail_counts) if plan.name == "train" else {}
                yield t, Draw(-1, -1, "", -1, -1, tail), start
                return


# ---------------------------------------------------------------- one slot


@dataclass
class Doc:
    g: int
    pieces: Optional[list[str]]  # None: dropped (or the end marker)
    counts: Counts
    offset: int  # tokens of this document already emitted (resume mid-document)
    replay: Optional[dict]  # snapshot to re-read from if this is the earliest unfinished document
    pending_after: list  # the slot's pending documents after this one
    cursor_after: int  # the slot's next global index to consider after this one
    end: bool = False


def slot_documents(stream: DocStream, clean: CleanConfig, num_slots: int, slot: int, base: int, sstate: dict) -> Iterator[Doc]:
    """The documents of one slot, in order: its pending (carried-over) ones, then g >= cursor it owns."""
    pending = [tuple(p) for p in sstate["pending"]]
    index = {g: i for i, (g, _) in enumerate(pending)}
    cursor = sstate["cursor"]
    seen: Optional[set[int]] = None
    if clean.dedup:
        seen = set(stream.plan.held_hashes) if stream.plan.name == "train" else set()
    # Dedup needs the hashes of every earlier document: replay from the start (documented cost).
    start = None if seen is not None else sstate["replay"]
    for g, draw, snap in stream.iterate(start):
        mine = g >= cursor and (g - base) % num_slots == slot
        if draw.d < 0:  # end of the split: every slot learns it; its owner gets the tail counts
            yield Doc(g, None, draw.counts if mine else {}, 0, snap, [], max(cursor, g + 1), end=True)
            return
        held = g in index
        if not (mine or held or seen is not None):
            continue
        pieces, counts = clean_document(draw.text, clean, seen)
        if not (mine or held):
            continue
        counts = add_counts(counts, draw.counts)
        if pieces is not None:
            counts["data/documents"] = 1
            counts[f"data/source{draw.src}/documents"] = 1
        if held:
            i = index[g]
            yield Doc(g, pieces, counts, pending[i][1], sstate["replay"], [list(p) for p in pending[i + 1 :]], cursor)
        else:
            yield Doc(g, pieces, counts, 0, snap, [], g + 1)
