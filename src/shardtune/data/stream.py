"""Streaming preprocessing for causal-LM training: partitions -> clean -> tokenize -> pack -> batches, resumable exactly.

Public API
----------
StreamConfig (+ SourceSpec, CleanConfig)   the config section; unknown keys are errors
StreamLoader(cfg, tokenizer, *, split="train", rank=0, world_size=1, num_workers=0,
             batch_size=8, state=None, sync=None, uneven=None)
    for batch in loader      dicts of LongTensor [batch_size, seq_len]: input_ids, labels (-100 on
                             padding), attention_mask, or position_ids instead with doc_positions;
                             doc_ids (document id per token, -1 on padding) with emit_doc_ids
    loader.state_dict()      this rank's part of the state; JSON-serializable, no collective
    loader.snapshot()        a cheap handle on the position now; state_dict(snapshot) later
    loader.stats()           counts for this rank's consumed batches ("data/dropped/empty", ...)
    loader.peek(), .next()   step-wise consumption without sync (what lockstep uses)
    loader.last_slot         the slot the batch last returned came from (tests, tools)
    loader.endless           the train stream repeats its sources without end
merge_states(parts)          the whole state from every rank's state_dict()
lockstep(loaders, uneven)    drive several ranks' loaders in one process (tests, tools)
preview(cfg, tokenizer, n)   -> (first n packed rows as dicts, stats)

Rank and world size are arguments; nothing here reads RANK/LOCAL_RANK/SLURM_*
or makes a collective. Do not pass the loader through accelerator.prepare
(it would shard again); move batches to the device in the loop.

Slots. A slot is one (rank, worker): slot = rank * W + worker with
W = max(1, num_workers), S = world_size * W. The sources' fixed partition
table (partitions.py) is dealt to the S slots; each slot reads, cleans,
tokenizes and packs only its own partitions (docstream.py). The rows a slot
produces depend only on (slot, S) and the data settings, not on how slots
map to ranks and workers: 1 rank x 2 workers and 2 ranks x 0 workers give
the same rows per slot. With one slot per rank a worker yields whole
batches; with several, each worker yields single rows, which the rank takes
from its workers in turn (DataLoader order, starting with the worker after
the one consumed last) and stacks into batches. So the rows of a step are
the same whatever the step's split into micro-batches and ranks, as long as
S is: 1 rank x 2 workers x (1 x 8), the same x (4 x 2) and 2 ranks x 0
workers x (2 x 2) train on the same rows.

Iteration. Train split, sync=None: the rank yields its batches until it has
no more, then stops (StopIteration); no collective. The trainer agrees on
"every rank still has data" in its own per-step collective; to lose
nothing when it stops there, save the state_dict(snapshot) taken before the
step's micro-batches. With sync (a function that all-gathers each rank's
"I have a batch" flag: sync(has: bool) -> list[bool]) the loader agrees per
batch: uneven "stop" (train default) steps only while every rank has a
batch; "pad" (validation default) steps until all have run out, giving a
rank with nothing left a batch of pure padding (every label -100). The
validation split with world_size > 1 needs sync. With on_source_end: repeat
and no max_documents the train stream never ends.

State (JSON):
    {"format": "shardtune.stream/2", "settings": {"data.seed": 0, ...}, "table": <partition table hash>,
     "split": "train", "world_size": 2, "workers": 2,
     "ranks": {"<rank>": {"rotation": <worker whose batch comes next>}},
     "slots": {"<slot>": {"draw": d, "quota": q | null, "ended": false, "counts": {...},
                          "sources": [{"parts": [pid, ...], "cur": i,
                                       "states": {"<pid>": [pos, rec, taken, offset, epoch, done]}}]}}}
per source the slot's partitions in reading order, the current one, and the
state of every partition not at its start (docstream.PState). It tracks
consumed batches only: batches prefetched by workers do not move it.
Resuming with the same S continues each slot exactly (bit for bit; the
same world size and workers keep the rotation too): a slot re-reads at most
its current shuffle block, or one document, per source, never the stream
before it (with clean.dedup: the open partitions before their position,
docstream.py). With another S (merge_states of every rank first) every
partition keeps its state and the partitions are dealt anew by the bytes
they have left: every document is read exactly once across the runs. Done
partitions leave the state unless the stream repeats.
"""

from __future__ import annotations

import copy
import json
from typing import Callable, Iterator, Literal, Optional, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from shardtune import ShardtuneError, storage
from shardtune.config import CleanConfig, SourceSpec, StreamConfig  # noqa: F401  (defined with the config tree)
from shardtune.data.clean import add_counts
from shardtune.data.docstream import PState, SlotStream, fresh_slot
from shardtune.data.pack import PackOptions, make_batches, pack_rows, pad_batch, special_ids, tokenize_documents
from shardtune.data.partitions import deal
from shardtune.data.plan import SplitPlan, build_plan
from shardtune.data.settings import first_difference, stream_settings
from shardtune.data.sft import tokenize_examples
from shardtune.data.workers import StopSafeLoader

__all__ = ["StreamConfig", "SourceSpec", "CleanConfig", "StreamLoader", "merge_states", "lockstep", "preview"]

FORMAT = "shardtune.stream/2"
Sync = Callable[[bool], Sequence[bool]]


# ---------------------------------------------------------------- the deal of partitions to slots


def _quota(total: Optional[int], num_slots: int, j: int) -> Optional[int]:
    return None if total is None else total // num_slots + (1 if j < total % num_slots else 0)


def _slots_from(plan: SplitPlan, pids: list[list[int]], states: dict[int, PState], quota: Optional[int]) -> dict[str, dict]:
    out = {}
    for j, mine in enumerate(pids):
        slot = fresh_slot([[p for p in mine if plan.parts[p].source == i] for i in range(plan.num_sources)], _quota(quota, len(pids), j))
        for src in slot["sources"]:
            started = lambda p: p in states and not states[p].done  # noqa: E731
            key = lambda p: (states[p].epoch + states[p].done if p in states else 0, not started(p), p)  # noqa: E731
            src["parts"] = sorted(src["parts"], key=key)
            src["states"] = {str(p): states[p].to_json() for p in src["parts"] if p in states}
        out[str(j)] = {**slot, "counts": {}}
    return out


def fresh_slots(plan: SplitPlan, num_slots: int) -> dict[str, dict]:
    return _slots_from(plan, deal([(p.pid, p.source, p.size) for p in plan.parts], num_slots), {}, plan.quota)


def reshard(state: dict, plan: SplitPlan, num_slots: int) -> dict[str, dict]:
    """Deal every partition of a complete state anew onto num_slots slots, each keeping its state."""
    states: dict[int, PState] = {}
    quota, counts = None, {}
    for st in state["slots"].values():
        quota = None if st["quota"] is None else (quota or 0) + st["quota"]
        add_counts(counts, st["counts"])
        for src in st["sources"]:
            for j, pid in enumerate(src["parts"]):
                raw = src["states"].get(str(pid))
                if raw is not None:
                    states[pid] = PState.from_json(raw)
    repeat = plan.on_end == "repeat"
    live = [pid for st in state["slots"].values() for src in st["sources"] for pid in src["parts"] if repeat or not (pid in states and states[pid].done)]
    weight = lambda p: plan.parts[p].size if p not in states or states[p].done else plan.parts[p].remaining(states[p].pos)  # noqa: E731
    slots = _slots_from(plan, deal([(p, plan.parts[p].source, weight(p)) for p in live], num_slots), states, quota)
    slots["0"]["counts"] = counts
    return slots


def merge_states(parts: Sequence[dict] | dict) -> dict:
    """Combine every rank's state_dict() into the whole state (needed to resume on another layout)."""
    parts = [parts] if isinstance(parts, dict) else list(parts)
    if not parts:
        raise ShardtuneError("merge_states needs at least one rank's data state.")
    head = parts[0]
    out = {**copy.deepcopy(head), "ranks": {}, "slots": {}}
    for p in parts:
        if any(p.get(k) != head.get(k) for k in ("format", "settings", "table", "split", "world_size", "workers")):
            raise ShardtuneError("the data states to merge come from different runs or layouts; pass the states saved at one step.")
        out["ranks"].update(copy.deepcopy(p["ranks"]))
        out["slots"].update(copy.deepcopy(p["slots"]))
    return out


def _start(state, settings: dict, plan: SplitPlan, world: int, per_rank: int, rank: int) -> tuple[dict, int]:
    """-> (this rank's slot states, rotation) from a saved state or fresh."""
    mine = [str(rank * per_rank + w) for w in range(per_rank)]
    num_slots = world * per_rank
    if state is None:
        slots = fresh_slots(plan, num_slots)
        return {s: slots[s] for s in mine}, 0
    state = merge_states(state) if not isinstance(state, dict) else state
    if state.get("format") != FORMAT:
        raise ShardtuneError(f"the data state has format {state.get('format')!r}, not {FORMAT}; it was not saved by this version's StreamLoader.")
    diff = first_difference(state["settings"], settings)
    if diff:
        raise ShardtuneError(f"the data state was saved with different data settings ({diff}); resume with the same ones or start fresh.")
    if state["table"] != plan.table:
        raise ShardtuneError("the data state was saved over other source files (a file was added, removed or changed size); resume with the same files or start fresh.")
    old = state["world_size"] * state["workers"]
    if old == num_slots and all(s in state["slots"] for s in mine):
        same_layout = (state["world_size"], state["workers"]) == (world, per_rank)
        rotation = state["ranks"].get(str(rank), {}).get("rotation", 0) if same_layout else 0
        return {s: copy.deepcopy(state["slots"][s]) for s in mine}, rotation
    if len(state["slots"]) != old:
        raise ShardtuneError(f"the data state holds {len(state['slots'])} of {old} slots; pass merge_states() of every rank's state to resume on another layout.")
    slots = reshard(state, plan, num_slots)
    return {s: slots[s] for s in mine}, 0


# ---------------------------------------------------------------- worker side


def _passthrough(item):
    return item


class _SlotDataset(IterableDataset):
    """Runs in each DataLoader worker: yields (kind, slot, batch, slot state after it)."""

    def __init__(self, loader: "StreamLoader"):
        self.cfg, self.plan, self.tokenizer, self.opt = loader.cfg, loader.plan, loader.tokenizer, loader.opt
        self.rank, self.per_rank, self.num_slots = loader.rank, loader.per_rank, loader.num_slots
        self.slots, self.rotation = copy.deepcopy(loader.slots), loader.rotation
        self.batch_size = loader.batch_size if loader.per_rank == 1 else 1  # several workers: rows, stacked by the rank

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        slot = self.rank * self.per_rank + ((info.id if info else 0) + self.rotation) % self.per_rank
        try:
            for batch, state in self._batches(slot):
                yield ("batch" if batch is not None else "state", slot, batch, state)
        except ShardtuneError as exc:
            if info is None:
                raise
            yield ("error", slot, str(exc), None)  # one clean sentence in the main process, not a worker traceback

    def _batches(self, slot: int):
        sstate = self.slots[str(slot)]
        tag = storage.READ_TAG = f"slot-{slot}"  # the request log (SHARDTUNE_STORE_LOG) names the slot that reads
        stream = SlotStream(self.plan, slot, self.num_slots, sstate)
        docs = stream.documents()
        if self.cfg.sft is not None:
            toks = tokenize_examples(docs, self.tokenizer, self.cfg.sft, self.cfg.clean, self.opt)
        else:
            toks = tokenize_documents(docs, self.tokenizer, self.opt.eos_id, self.cfg.tokenize_batch)
        for batch, (doc, off, counts) in make_batches(pack_rows(toks, self.opt, dict(sstate["counts"])), self.batch_size, self.opt):
            state = stream.state_json(doc.after) if off is None else stream.state_json(doc.mark[0], (*doc.mark[1:], off))
            yield batch, {**state, "counts": counts}
            storage.READ_TAG = tag  # again: several slots' streams in one process (lockstep) take turns


# ---------------------------------------------------------------- main-process side


def decide(has: bool, flags: Sequence[bool], uneven: str) -> str:
    """'batch', 'pad' or 'stop' for one rank, given every rank's has-a-batch flag."""
    if all(flags):
        return "batch"
    if uneven == "pad" and any(flags):
        return "batch" if has else "pad"
    return "stop"


class StreamLoader:
    """One rank's loader over one split; see the module docstring."""

    def __init__(self, cfg: StreamConfig, tokenizer, *, split: str = "train", rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, batch_size: int = 8, state: Optional[dict | Sequence[dict]] = None,
                 sync: Optional[Sync] = None, uneven: Optional[Literal["stop", "pad"]] = None):
        if not 0 <= rank < world_size:
            raise ShardtuneError(f"rank {rank} is outside world_size {world_size}; pass 0 <= rank < world_size.")
        uneven = uneven or ("stop" if split == "train" else "pad")
        if batch_size < 1 or num_workers < 0 or uneven not in ("stop", "pad"):
            raise ShardtuneError(f"invalid loader arguments (batch_size={batch_size}, num_workers={num_workers}, uneven={uneven!r}).")
        self.cfg, self.tokenizer, self.split = cfg, tokenizer, split
        self.rank, self.world_size, self.num_workers, self.batch_size = rank, world_size, num_workers, batch_size
        self.sync, self.uneven = sync, uneven
        self.per_rank = max(1, num_workers)
        self.num_slots = world_size * self.per_rank
        eos, pad = special_ids(cfg, tokenizer)
        self.plan = build_plan(cfg, split, tokenizer)
        self.endless = self.plan.name == "train" and self.plan.on_end == "repeat" and self.plan.quota is None
        split_docs = cfg.split_documents and cfg.sft is None  # an SFT example never crosses a row boundary
        self.opt = PackOptions(cfg.seq_len, eos, pad, split_docs, cfg.doc_positions, cfg.emit_doc_ids)
        self.settings = stream_settings(cfg, split, tokenizer)
        self.slots, self.rotation = _start(state, self.settings, self.plan, world_size, self.per_rank, rank)
        self._reset()

    # -- consumption
    def _reset(self) -> None:
        self._it: Optional[Iterator] = None
        self._peeked: Optional[tuple] = None
        self._exhausted = False
        self.last_slot: Optional[int] = None

    def _apply(self, slot: int, state: dict) -> None:
        self.slots = {**self.slots, str(slot): state}  # a new dict: snapshots keep the old one
        self.rotation = (slot - self.rank * self.per_rank + 1) % self.per_rank

    def peek(self) -> Optional[dict]:
        """The next batch without consuming it (None when this rank has no more)."""
        while self._peeked is None and not self._exhausted:
            if self._it is None:
                # its own generator: without one, starting the workers draws their base seed from the global RNG,
                # which moves a resumed run's dropout stream against the uninterrupted run's (streams are seeded by their state)
                dl = StopSafeLoader(_SlotDataset(self), batch_size=None, num_workers=self.num_workers, collate_fn=_passthrough,
                                    generator=torch.Generator().manual_seed(0))
                self._it = iter(dl)
            item = next(self._it, None)
            if item is None:
                self._exhausted, self._it = True, None
            elif item[0] == "error":
                self._reset()
                raise ShardtuneError(item[2])
            elif item[0] == "state":
                self._apply(item[1], item[3])  # a slot's final state after its last batch
            else:
                self._peeked = item
        return None if self._peeked is None else self._peeked[2]

    def next(self) -> dict:
        """Consume and return the next batch; the state now includes it."""
        if self.peek() is None:
            raise StopIteration
        parts = []
        while self.peek() is not None and (not parts or self.per_rank > 1 and len(parts) < self.batch_size):
            _, slot, batch, state = self._peeked
            self._apply(slot, state)
            self._peeked, self.last_slot = None, slot
            parts.append(batch)
        return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def pad_batch(self) -> dict:
        return pad_batch(self.batch_size, self.opt)

    def __iter__(self) -> Iterator[dict]:
        """Continue from the consumed state (see the module docstring for sync and uneven)."""
        self._reset()
        if self.sync is None:
            if self.world_size > 1 and self.split != "train":
                raise ShardtuneError("the validation stream with world_size > 1 needs sync= (an all-gather of has-a-batch flags) so that all ranks stop together.")
            while self.peek() is not None:
                yield self.next()
            return
        while True:
            has = self.peek() is not None
            action = decide(has, list(self.sync(has)), self.uneven)
            if action == "stop":
                return
            yield self.next() if action == "batch" else self.pad_batch()

    # -- state and metrics
    def snapshot(self) -> tuple:
        """The position now, cheaply (slot states are replaced, never changed): pass it to state_dict() later."""
        return (self.slots, self.rotation)

    def state_dict(self, snapshot: Optional[tuple] = None) -> dict:
        slots, rotation = snapshot or self.snapshot()
        state = {
            "format": FORMAT, "settings": self.settings, "table": self.plan.table, "split": self.split,
            "world_size": self.world_size, "workers": self.per_rank,
            "ranks": {str(self.rank): {"rotation": rotation}}, "slots": slots,
        }
        return json.loads(json.dumps(state))  # a detached, JSON-clean copy

    def stats(self) -> dict[str, float]:
        counts: dict = {}
        for st in self.slots.values():
            add_counts(counts, st["counts"])
        total = counts.get("data/tokens", 0) + counts.get("data/padding", 0)
        return {**dict(sorted(counts.items())), "data/packing_efficiency": counts.get("data/tokens", 0) / total if total else 0.0}


def lockstep(loaders: Sequence[StreamLoader], uneven: Literal["stop", "pad"] = "stop") -> Iterator[list[dict]]:
    """Step several ranks' loaders together in one process: the same policy as `sync` across processes."""
    for loader in loaders:
        loader._reset()
    while True:
        flags = [loader.peek() is not None for loader in loaders]
        actions = [decide(f, flags, uneven) for f in flags]
        if "stop" in actions:
            return
        yield [loader.next() if a == "batch" else loader.pad_batch() for loader, a in zip(loaders, actions)]


def preview(cfg: StreamConfig, tokenizer, n: int = 4) -> tuple[list[dict], dict[str, float]]:
    """The first n packed rows (input_ids and doc_ids without padding, decoded text) and the stats so far."""
    loader = StreamLoader(cfg.model_copy(update={"emit_doc_ids": True}), tokenizer, batch_size=1)
    samples = []
    while len(samples) < n and loader.peek() is not None:
        batch = loader.next()
        keep = batch["doc_ids"][0] >= 0
        ids = batch["input_ids"][0][keep].tolist()
        samples.append({"input_ids": ids, "doc_ids": batch["doc_ids"][0][keep].tolist(), "text": tokenizer.decode(ids)})
    return samples, loader.stats()
