"""The documents one slot reads: its partitions only, mixed by weight, resumable per partition.

    slot's partitions --records--> hold-out skip --> clean (+ dedup per partition)
        --> block shuffle (per partition) --> weighted mixture over sources --> Doc

- Partitions (partitions.py) are dealt to slots; a slot reads each source's
  partitions one after the other (in pid order; after a re-deal, started ones
  first). It never opens another slot's bytes.
- Mixture: draw d of slot j picks a source among those the slot holds
  partitions of, with a counter-based random number u(seed, slot, S, d,
  attempt): no RNG state beyond the draw counter. An exhausted source is
  rejected and the draw retried with attempt+1 (`drop`), ends the slot's
  stream (`stop`), or is rewound for another epoch (`repeat`). The weights
  hold per slot; globally they hold when every source has at least S
  partitions (a source held by k slots makes at most k/S of the draws; lower
  partition_bytes for a small source that must weigh more).
- Hold-out (plan.py): N documents chosen (seeded) among the first 10*N
  draws of one pass over all partitions; they are keys (partition, record),
  so train skips them on any number of slots, in every epoch.
- Block shuffle: the documents of a partition are permuted within
  consecutive blocks of B by a permutation seeded with (seed, partition,
  epoch, block start). Without shuffle the blocks (of UNSHUFFLED_BLOCK) keep
  their order. A resume re-reads at most the current block of each open
  partition; no state beyond the block start and the count consumed.
- Dedup (clean.dedup) is exact within a partition: a hash set per open
  partition, seeded with the hashes of the held-out documents (train drops
  copies of validation documents). Its costs: duplicates in different
  partitions are kept (a global exact dedup would need every slot to see
  every hash, i.e. all-to-all traffic or a second pass); and resuming a
  partition re-reads (parses, cleans, hashes, never tokenizes) its part
  before the saved position, at most one partition per source per slot. A
  packed cache (cache.py) is deduplicated when built and replays nothing.
- Bad records (and blank lines, empty files) never become documents: the
  records that do keep their index in a partition whether or not bad ones
  sit between them. Their counts travel with the next document of the same
  partition, or are added when the partition ends.

State per partition (PState): pos (reader position of the current block's
first record), rec (records of the partition before pos), taken (documents
of that block consumed), offset (tokens already emitted of the next one:
the carried-over tokens), epoch, done. Per slot: the draw counter, what is
left of the slot's max_documents quota, and per source its partitions in
reading order with the index of the current one. stream.py saves it as JSON.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Optional

from shardtune import ShardtuneError
from shardtune.data.clean import Counts, add_counts, clean_document
from shardtune.data.readers import BAD, OK, field_text, read_part, sentence

_M = (1 << 64) - 1
UNSHUFFLED_BLOCK = 64  # without shuffle, documents are still read in blocks: a resume re-reads at most this many


def _mix(z: int) -> int:
    """splitmix64 finalizer: a fast, well-spread integer hash."""
    z = (z + 0x9E3779B97F4A7C15) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


def uniform(seed: int, d: int, attempt: int) -> float:
    return _mix(_mix(_mix(seed & _M) ^ d) ^ attempt) / 2.0**64


class PState(NamedTuple):
    """A partition's position (see the module docstring); JSON as [pos, rec, taken, offset, epoch, done].
    A NamedTuple, not a dataclass: two are made per document."""

    pos: int
    rec: int = 0
    taken: int = 0
    offset: int = 0
    epoch: int = 0
    done: bool = False

    def to_json(self) -> list[int]:
        return [self.pos, self.rec, self.taken, self.offset, self.epoch, int(self.done)]

    @classmethod
    def from_json(cls, v: list[int]) -> "PState":
        return cls(v[0], v[1], v[2], v[3], v[4], bool(v[5]))


@dataclass
class Doc:
    key: int  # the document's id (doc_ids): unique in the split, the same on any number of slots
    pieces: Optional[list[str]]  # cleaned text pieces; None: dropped, pretokenized, or the end marker
    counts: Counts
    offset: int = 0  # tokens already emitted (a resumed, carried-over document)
    source: int = -1
    tokens: Optional[tuple] = None  # pretokenized (cache): (ids, piece starts, labels or None, counts)
    mark: Any = None  # where to resume while it is partly emitted (SlotStream.state_json)
    after: Any = None  # the slot's snapshot once it is fully emitted
    end: bool = False


def doc_key(pid: int, rec: int, epoch: int, num_parts: int) -> int:
    return (((epoch * num_parts + pid) << 32) | rec) & ((1 << 63) - 1)


# ---------------------------------------------------------------- one partition


def raw_records(plan, part, cur: dict) -> Iterator[tuple[str, Any]]:
    """("doc", text) per record of a partition of the sources, ("count", counts) for what is not a document."""
    fld = plan.fields[part.source]
    for event in read_part(part, cur, plan.limit, None if fld is None else [fld]):
        if event[0] == OK:
            if type(event[1]) is str:  # txt: the record is its text (the common case, kept fast)
                yield ("doc", event[1])
                continue
            event = field_text(event[1], fld, event[2])
            if event[0] == OK:
                yield ("doc", event[1])
                continue
        if event[0] == BAD and plan.on_bad == "error":
            raise ShardtuneError(f"{sentence(event)} (or set on_bad_record: skip to drop and count such records).")
        yield ("count", {f"data/{'dropped' if event[0] == BAD else 'skipped'}/{event[1]}": 1})


class PartDocs:
    """The documents of one partition from a PState: next(counts) -> (rec, pieces, tokens, counts), before, after."""

    def __init__(self, plan, part, state: PState):
        self.plan, self.part, self.epoch = plan, part, state.epoch
        dedup = plan.clean is not None and plan.clean.dedup and part.fmt != "held" and plan.cache is None
        self.seen: Optional[set[int]] = set(plan.held_hashes) if dedup else None
        self.cur = {"pos": state.pos}
        self.rec = state.rec
        if self.seen is not None and state.rec > 0:
            self.cur["pos"] = part.initial_pos()
            self.rec = 0
        self.items = self._records()
        self._fast_forward(state.rec)
        self.block: list[tuple] = []
        self.k, self.skip, self.first_offset = 0, state.taken, state.offset
        self.start = self.end = (state.pos, state.rec)
        self.tail: Counts = {}

    def _records(self) -> Iterator[tuple[str, Any]]:
        plan, part = self.plan, self.part
        if part.fmt == "held":
            if self.cur["pos"] == 0:
                self.cur["pos"] = 1
                yield ("doc", plan.held_docs[part.start][1])
            return
        if plan.cache is not None:  # a packed cache (packed.CacheInfo) reads its own partitions
            yield from plan.cache.records(part, self.cur)
            return
        yield from raw_records(plan, part, self.cur)

    def _fast_forward(self, upto: int) -> None:
        """Dedup: rebuild the hash set from the records before `upto` (already consumed)."""
        while self.rec < upto:
            kind, payload = next(self.items)
            if kind == "doc":
                if (self.part.pid, self.rec) not in self.plan.held:
                    clean_document(payload, self.plan.clean, self.seen)
                self.rec += 1

    def _shape(self, payload) -> tuple[Optional[list[str]], Optional[tuple], Counts]:
        if not isinstance(payload, str):  # pretokenized: cleaning happened when the cache was built
            return None, payload, dict(payload[3])
        if self.plan.clean is None:  # the hold-out pool: raw text
            return [payload], None, {}
        pieces, counts = clean_document(payload, self.plan.clean, self.seen)
        return pieces, None, counts

    def _fill(self) -> bool:
        """Read the next block; False at the end of the partition."""
        self.start = self.end
        docs, carry = [], {}
        held, pid, size = self.plan.held, self.part.pid, self.plan.block or UNSHUFFLED_BLOCK
        for kind, payload in self.items:
            if kind == "count":
                add_counts(carry, payload)
                continue
            rec, self.rec = self.rec, self.rec + 1
            if held and (pid, rec) in held:
                continue  # a held-out record: invisible to this split; counts before it carry on
            pieces, tokens, counts = self._shape(payload)
            if carry:
                add_counts(counts, carry)
                carry = {}
            docs.append((rec, pieces, tokens, counts))
            if len(docs) >= size:
                break
        add_counts(self.tail, carry)
        self.end = (self.cur["pos"], self.rec)
        if self.plan.block > 1:
            random.Random(f"shuffle:{self.plan.seed}:{self.part.pid}:{self.epoch}:{self.start[1]}").shuffle(docs)
        self.block, self.k = docs, self.skip
        self.skip = 0
        return bool(docs)

    def next(self, counts: Counts) -> Optional[tuple[tuple, PState, PState, int]]:
        """-> (document, state before it, state after it, tokens already emitted), or None at the end."""
        if self.k >= len(self.block) and not self._fill():
            add_counts(counts, self.tail)
            return None
        k = self.k
        self.k += 1
        before = PState(self.start[0], self.start[1], k, 0, self.epoch)
        if self.k < len(self.block):
            after = PState(self.start[0], self.start[1], self.k, 0, self.epoch)
        else:
            after = PState(self.end[0], self.end[1], 0, 0, self.epoch)
        offset, self.first_offset = self.first_offset, 0
        return self.block[k], before, after, offset


# ---------------------------------------------------------------- one slot


@dataclass
class _Source:
    order: tuple  # ((pid, PState), ...) in reading order
    cur: int
    state: Optional[PState]  # of order[cur]
    reader: Optional[PartDocs] = None
    exhausted: bool = False


class SlotStream:
    """One slot's documents (see the module docstring); restore from a JSON slot state or fresh."""

    def __init__(self, plan, slot: int, num_slots: int, state: dict):
        self.plan = plan
        self.seed = _mix(_mix(plan.seed & _M) ^ (num_slots << 32 | slot))
        self.d, self.quota, self.ended = state["draw"], state["quota"], state["ended"]
        self.sources = [self._restore(s) for s in state["sources"]]
        active = [i for i, s in enumerate(self.sources) if s.order]
        self.active = active
        total = sum(plan.weights[i] for i in active) or 1.0
        self.cum = list(itertools.accumulate(plan.weights[i] / total for i in active))
        self._after: Optional[tuple] = None
        self.live = len(active)  # active sources not found exhausted yet

    def _initial(self, pid: int) -> PState:
        return PState(self.plan.parts[pid].initial_pos())

    def _restore(self, s: dict) -> _Source:
        order = tuple((pid, PState.from_json(s["states"][str(pid)]) if str(pid) in s["states"] else self._initial(pid)) for pid in s["parts"])
        cur = s["cur"]
        return _Source(order, cur, order[cur][1] if cur < len(order) else None)

    def snapshot(self) -> tuple:
        return (self.d, self.quota, self.ended, tuple((s.order, s.cur, s.state) for s in self.sources))

    def state_json(self, snap: tuple, partial: Optional[tuple] = None) -> dict:
        """A snapshot as JSON; partial = (source, partition index, state before the doc, tokens emitted of it)."""
        d, quota, ended, sources = snap
        if partial is not None:
            i, cur, before, offset = partial
            sources = sources[:i] + ((sources[i][0], cur, before._replace(offset=offset)),) + sources[i + 1:]
        out = []
        for order, cur, state in sources:
            states = {}
            for j, (pid, st) in enumerate(order):
                st = st._replace(done=True) if j < cur else (state if j == cur else st)
                if st != self._initial(pid):
                    states[str(pid)] = st.to_json()
            out.append({"parts": [pid for pid, _ in order], "cur": cur, "states": states})
        return {"draw": d, "quota": quota, "ended": ended, "sources": out}

    def _pick(self, attempt: int) -> int:
        if len(self.active) == 1:
            return self.active[0]
        return self.active[min(bisect.bisect_right(self.cum, uniform(self.seed, self.d, attempt)), len(self.cum) - 1)]

    def _read(self, i: int, counts: Counts):
        s = self.sources[i]
        while s.cur < len(s.order):
            if s.reader is None and not s.state.done:
                s.reader = PartDocs(self.plan, self.plan.parts[s.order[s.cur][0]], s.state)
            got = s.reader.next(counts) if s.reader is not None else None
            if got is not None:
                s.state = got[2]
                return got, s.cur
            s.cur, s.reader = s.cur + 1, None
            s.state = s.order[s.cur][1] if s.cur < len(s.order) else None
        return None

    def _rewind(self, i: int) -> None:
        """repeat: every partition of source i in this slot starts its next epoch."""
        s = self.sources[i]
        order = sorted(((pid, PState(self._initial(pid).pos, epoch=st.epoch + 1)) for pid, st in s.order), key=lambda x: (x[1].epoch, x[0]))
        s.order, s.cur, s.reader = tuple(order), 0, None
        s.state = s.order[0][1] if order else None

    def _draw(self, counts: Counts):
        attempt = 0
        while not self.ended:
            if self.quota == 0 or self.live == 0:
                self.ended = True
                break
            i = self._pick(attempt)
            if self.sources[i].exhausted:
                if self.plan.on_end == "stop":
                    self.ended = True
                    break
                attempt += 1
                continue
            got = self._read(i, counts)
            if got is None and self.plan.on_end == "repeat":
                self._rewind(i)
                got = self._read(i, counts)
            if got is None:
                self.sources[i].exhausted = True
                self.live -= 1
                continue
            return i, got
        return None

    def next_doc(self) -> Doc:
        """The next document, or the end marker (end=True, with the counts met on the way)."""
        before = self._after or self.snapshot()  # nothing moves between two documents
        counts: Counts = {}
        got = self._draw(counts)
        if got is None:
            self._after = None
            return Doc(-1, None, counts, after=self.snapshot(), end=True)
        i, ((item, pbefore, _, offset), cur) = got
        rec, pieces, tokens, doc_counts = item
        self.d += 1
        if self.quota is not None:
            self.quota -= 1
        part = self.plan.parts[self.sources[i].order[cur][0]]
        key = self.plan.held_docs[part.start][0] if part.fmt == "held" else doc_key(part.pid, rec, pbefore.epoch, len(self.plan.parts))
        self._after = self.snapshot()
        return Doc(key, pieces, add_counts(doc_counts, counts) if counts else doc_counts, offset, i, tokens, (before, i, cur, pbefore), self._after)

    def documents(self) -> Iterator[Doc]:
        while True:
            doc = self.next_doc()
            yield doc
            if doc.end:
                return


def fresh_slot(sources: list[list[int]], quota: Optional[int]) -> dict:
    """A slot state at the start: its partitions per source, in pid order."""
    return {"draw": 0, "quota": quota, "ended": False, "sources": [{"parts": sorted(p), "cur": 0, "states": {}} for p in sources]}
