"""Streaming preprocessing for causal-LM training: sources -> clean -> tokenize -> pack -> shard, resumable exactly.

Public API
----------
StreamConfig (+ SourceSpec, CleanConfig)   the config section; unknown keys are errors
StreamLoader(cfg, tokenizer, *, split="train", rank=0, world_size=1, num_workers=0,
             batch_size=8, state=None, sync=None, uneven=None)
    for batch in loader      dicts of LongTensor [batch_size, seq_len]: input_ids, labels (-100 on
                             padding), attention_mask, or position_ids instead with doc_positions;
                             doc_ids (global document index per token, -1 on padding) with emit_doc_ids
    loader.state_dict()      this rank's part of the state; JSON-serializable, small
    loader.stats()           counts for this rank's consumed batches ("data/dropped/empty", ...)
    loader.peek(), .next()   step-wise consumption without sync (what lockstep uses)
merge_states(parts)          the whole state from every rank's state_dict() (all-gather them at save)
lockstep(loaders, uneven)    drive several ranks' loaders in one process (tests, tools)
preview(cfg, tokenizer, n)   -> (first n packed rows as dicts, stats); `shardtune preprocess`
                             (preprocess.py) streams once itself, to time it and write a cache

Rank and world size are arguments; nothing here reads RANK/LOCAL_RANK/SLURM_*.
Do not pass the loader through accelerator.prepare (it would shard again);
move batches to the device in the loop.

Sharding. The documents of a split have a global index g in a fixed order
(docstream.py). A slot is one (rank, worker): slot = rank * W + worker with
W = max(1, num_workers). Slots own g round-robin from the partition base:
(g - base) % (world_size * W) == slot. Every slot reads every record (that
keeps positions global), and cleans, tokenizes and packs only its own. Each
worker yields whole batches of its slot; a rank's batches come from its
workers in turn (DataLoader order), starting with the worker after the one
consumed last.

State (JSON):
    {"format": "shardtune.stream/1", "fingerprint": <hash of the stream-defining config>,
     "split": "train", "world_size": 2, "workers": 2, "base": 0,
     "ranks": {"<rank>": {"rotation": <worker whose batch comes next>}},
     "slots": {"<slot>": {"cursor": g, "pending": [[g, token_offset], ...],
                          "replay": <snapshot of the block to re-read from> | null,
                          "counts": {"data/tokens": ..., ...}}}}
A slot's not-yet-consumed documents are its `pending` ones (the first may be
partly emitted: continue at token_offset) and every g >= cursor it owns.
`replay` is the start of a shuffle block (draw counter, source file/offset
positions, train index) at or before the earliest of them. The state tracks
consumed batches only: items prefetched by workers do not move it.
Resuming with the same world size and workers continues each slot exactly.
With different ones (merge_states of all ranks first) the old slots' unread
own documents up to the furthest cursor join `pending`, all pending documents
are dealt round-robin to the new slots, and the stream after that cursor is
partitioned anew: every document is emitted exactly once across the runs.
Exact dedup (clean.dedup) keeps a hash per document and rebuilds the set on
resume by re-reading the split from its start, in every slot.

Equal batches across ranks (uneven=): the loader needs `sync`, a function
that all-gathers each rank's "I have a batch" flag: sync(has: bool) ->
list[bool] (e.g. torch.distributed.all_gather of a one-element tensor, from
dist.py). "stop" (train default): a step happens only when every rank has a
batch, so all ranks stop together when the first rank runs out (a rank runs
out when all its workers have); the rest stays in the state, unconsumed, and
can be finished by resuming on fewer ranks. "pad" (validation default): ranks
step until all have run out; a rank with nothing left gets a batch of pure
padding (every label -100), so weight losses by label count. With
on_source_end: repeat the train stream never ends. Without sync, iterating
with world_size > 1 over a finite stream is refused. Inside a rank, workers
may end at different times: the DataLoader skips finished ones.

Cost: every slot reads and parses every record (so bad records never take an
index, on any rank); cleaning, tokenization and packing, the expensive part,
are done once per document (clean.dedup: every slot also cleans and hashes
every record). With S = world_size * W slots, reading/parsing
work is S times the data; for very many slots over very large corpora,
file-level sharding would be the next step.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Callable, Iterator, Literal, Optional, Sequence

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shardtune import ShardtuneError
from shardtune.config import CleanConfig, SourceSpec, StreamConfig  # noqa: F401  (defined with the config tree)
from shardtune.data.clean import add_counts
from shardtune.data.docstream import UNSHUFFLED_BLOCK, DocStream, SplitPlan, plan_holdout, slot_documents
from shardtune.data.pack import PackOptions, make_batches, pack_rows, pad_batch, tokenize_documents
from shardtune.data.readers import check_source
from shardtune.data.sft import tokenize_examples

__all__ = ["StreamConfig", "SourceSpec", "CleanConfig", "StreamLoader", "merge_states", "lockstep", "preview"]

FORMAT = "shardtune.stream/1"
Sync = Callable[[bool], Sequence[bool]]



# ---------------------------------------------------------------- plan and state


def build_plan(cfg: StreamConfig, split: str) -> SplitPlan:
    """Resolve and check the sources of a split (fails at once on unusable ones)."""
    if split not in ("train", "validation"):
        raise ShardtuneError(f"unknown data split {split!r}; use train or validation.")
    rec = cfg.sft is not None  # SFT reads whole records (one example = one document)
    if split == "validation" and cfg.validation_sources:
        files = [check_source(s, cfg.max_record_bytes, rec) for s in cfg.validation_sources]
        return SplitPlan("validation", cfg.validation_sources, files, on_end="drop", record=rec)
    if split == "validation" and not cfg.holdout:
        raise ShardtuneError("there is no validation data; set validation_sources or holdout in the stream config.")
    files = [check_source(s, cfg.max_record_bytes, rec) for s in cfg.sources]
    held, ordinals, pool, hashes = plan_holdout(cfg, files) if cfg.holdout else (frozenset(), [], 0, frozenset())
    if split == "validation":
        return SplitPlan("validation", cfg.sources, files, held, [], pool, from_holdout=True, on_end=cfg.on_source_end, record=rec)
    return SplitPlan(
        "train", cfg.sources, files, held, ordinals, pool, hashes, limit=cfg.max_documents,
        block=cfg.shuffle_block or UNSHUFFLED_BLOCK, shuffle=bool(cfg.shuffle_block), on_end=cfg.on_source_end, record=rec,
    )


def fingerprint(cfg: StreamConfig, split: str, tokenizer) -> str:
    """What the global document order and token offsets depend on (not seq_len, batch size, workers)."""
    keys = {"sources", "validation_sources", "holdout", "seed", "shuffle_block", "on_source_end", "max_documents", "max_record_bytes", "clean", "eos_token_id"}
    if cfg.sft is not None:  # SFT examples are never split, so offsets depend on seq_len (too_long) too
        keys |= {"sft", "seq_len"}
    data = {"cfg": cfg.model_dump(mode="json", include=keys), "split": split, "vocab": len(tokenizer)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _fresh_slot() -> dict:
    return {"cursor": 0, "pending": [], "replay": None, "counts": {}}


def merge_states(parts: Sequence[dict] | dict) -> dict:
    """Combine every rank's state_dict() into the whole state (needed to resume on another world size)."""
    parts = [parts] if isinstance(parts, dict) else list(parts)
    if not parts:
        raise ShardtuneError("merge_states needs at least one rank's data state.")
    head = parts[0]
    out = {**copy.deepcopy(head), "ranks": {}, "slots": {}}
    for p in parts:
        if any(p.get(k) != head.get(k) for k in ("format", "fingerprint", "split", "world_size", "workers", "base")):
            raise ShardtuneError("the data states to merge come from different runs or layouts; pass the states saved at one step.")
        out["ranks"].update(copy.deepcopy(p["ranks"]))
        out["slots"].update(copy.deepcopy(p["slots"]))
    return out


def _replay_key(snap: Optional[dict]) -> int:
    return -1 if snap is None else snap["t"]


def reshard(state: dict, num_slots: int) -> tuple[int, dict]:
    """Re-partition a complete state onto num_slots slots -> (new base, slot states)."""
    old_n = state["world_size"] * state["workers"]
    base = state["base"]
    slots = [state["slots"][str(s)] for s in range(old_n)]
    new_base = max(s["cursor"] for s in slots)
    pending: list[tuple[int, int]] = []
    for s, st in enumerate(slots):
        pending += [tuple(p) for p in st["pending"]]
        first = st["cursor"] + (base + s - st["cursor"]) % old_n  # next g this slot owns
        pending += [(g, 0) for g in range(first, new_base, old_n)]
    pending.sort()
    replay = min((st["replay"] for st in slots), key=_replay_key)
    counts: dict = {}
    for st in slots:
        add_counts(counts, st["counts"])
    new = {
        str(j): {"cursor": new_base, "pending": [list(p) for p in pending[j::num_slots]], "replay": replay, "counts": counts if j == 0 else {}}
        for j in range(num_slots)
    }
    return new_base, new


def _start(state: Optional[dict], fp: str, split: str, world: int, per_rank: int, rank: int) -> tuple[int, dict, int]:
    """-> (base, this rank's slot states, rotation) from a saved state or fresh."""
    mine = [str(rank * per_rank + w) for w in range(per_rank)]
    if state is None:
        return 0, {s: _fresh_slot() for s in mine}, 0
    state = merge_states(state) if not isinstance(state, dict) else state
    if state.get("format") != FORMAT:
        raise ShardtuneError(f"the data state has format {state.get('format')!r}, not {FORMAT}; it was not saved by this version's StreamLoader.")
    if state["split"] != split or state["fingerprint"] != fp:
        raise ShardtuneError("the data state was saved with different data settings (sources, seed, shuffle, clean, tokenizer); resume with the same ones or start fresh.")
    if state["world_size"] == world and state["workers"] == per_rank and all(s in state["slots"] for s in mine):
        rotation = state["ranks"].get(str(rank), {}).get("rotation", 0)
        return state["base"], {s: copy.deepcopy(state["slots"][s]) for s in mine}, rotation
    if len(state["slots"]) != state["world_size"] * state["workers"]:
        raise ShardtuneError(
            f"the data state holds {len(state['slots'])} of {state['world_size'] * state['workers']} slots; "
            "pass merge_states() of every rank's state to resume on another layout."
        )
    base, slots = reshard(state, world * per_rank)
    return base, {s: slots[s] for s in mine}, 0


# ---------------------------------------------------------------- worker side


def _passthrough(item):
    return item


class _SlotDataset(IterableDataset):
    """Runs in each DataLoader worker: yields (kind, slot, batch, slot state after it)."""

    def __init__(self, loader: "StreamLoader"):
        self.cfg, self.plan, self.tokenizer, self.opt = loader.cfg, loader.plan, loader.tokenizer, loader.opt
        self.rank, self.per_rank, self.num_slots, self.base = loader.rank, loader.per_rank, loader.num_slots, loader.base
        self.slots, self.rotation, self.batch_size = copy.deepcopy(loader.slots), loader.rotation, loader.batch_size

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
        stream = DocStream(self.plan, self.cfg.seed, self.cfg.on_bad_record, self.cfg.max_record_bytes)
        sft = self.cfg.sft
        # SFT documents are JSON records: never split them by characters (cleaning applies to each turn's text instead).
        clean = self.cfg.clean.model_copy(update={"max_chars": None}) if sft else self.cfg.clean
        docs = slot_documents(stream, clean, self.num_slots, slot, self.base, sstate)
        if sft:
            toks = tokenize_examples(docs, self.tokenizer, sft, self.cfg.clean, self.opt)
        else:
            toks = tokenize_documents(docs, self.tokenizer, self.opt.eos_id, self.cfg.tokenize_batch)
        rows = pack_rows(toks, self.opt, dict(sstate["counts"]))
        return make_batches(rows, self.batch_size, self.opt)


# ---------------------------------------------------------------- main-process side


def _special_ids(cfg: StreamConfig, tokenizer) -> tuple[int, int]:
    eos = cfg.eos_token_id
    for name in ("eos_token_id", "sep_token_id"):
        eos = eos if eos is not None else getattr(tokenizer, name, None)
    if eos is None:
        raise ShardtuneError("the tokenizer has no EOS or SEP token to separate documents; set eos_token_id in the stream config.")
    pad = getattr(tokenizer, "pad_token_id", None)
    return eos, eos if pad is None else pad


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
        self.plan = build_plan(cfg, split)
        self.endless = self.plan.name == "train" and self.plan.on_end == "repeat" and self.plan.limit is None
        eos, pad = _special_ids(cfg, tokenizer)
        split_docs = cfg.split_documents and cfg.sft is None  # an SFT example never crosses a row boundary
        self.opt = PackOptions(cfg.seq_len, eos, pad, split_docs, cfg.doc_positions, cfg.emit_doc_ids)
        self.fingerprint = fingerprint(cfg, split, tokenizer)
        self.base, self.slots, self.rotation = _start(state, self.fingerprint, split, world_size, self.per_rank, rank)
        self._reset()

    # -- consumption
    def _reset(self) -> None:
        self._it: Optional[Iterator] = None
        self._peeked: Optional[tuple] = None
        self._exhausted = False

    def _apply(self, slot: int, state: dict) -> None:
        self.slots[str(slot)] = state
        self.rotation = (slot - self.rank * self.per_rank + 1) % self.per_rank

    def peek(self) -> Optional[dict]:
        """The next batch without consuming it (None when this rank has no more)."""
        while self._peeked is None and not self._exhausted:
            if self._it is None:
                dl = DataLoader(_SlotDataset(self), batch_size=None, num_workers=self.num_workers, collate_fn=_passthrough)
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
        _, slot, batch, state = self._peeked
        self._apply(slot, state)
        self._peeked = None
        return batch

    def pad_batch(self) -> dict:
        return pad_batch(self.batch_size, self.opt)

    def __iter__(self) -> Iterator[dict]:
        """Continue from the consumed state; ranks step together through `sync` (see the module docstring)."""
        self._reset()
        if self.world_size > 1 and self.sync is None and not self.endless and self.split != "train":
            raise ShardtuneError("with world_size > 1 the validation loader needs sync= (an all-gather of has-a-batch flags) so that all ranks stop together.")
        if self.sync is None:  # this rank's batches until it runs out: the Trainer agrees across ranks in its per-step collective
            while self.peek() is not None:
                yield self.next()
            return
        while True:
            has = self.peek() is not None
            flags = list(self.sync(has)) if self.sync is not None else [has]
            action = decide(has, flags, self.uneven)
            if action == "stop":
                return
            yield self.next() if action == "batch" else self.pad_batch()

    # -- state and metrics
    def state_dict(self) -> dict:
        state = {
            "format": FORMAT, "fingerprint": self.fingerprint, "split": self.split,
            "world_size": self.world_size, "workers": self.per_rank, "base": self.base,
            "ranks": {str(self.rank): {"rotation": self.rotation}}, "slots": self.slots,
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
