"""The streaming stage: exact resume, partitions dealt anew with every document read exactly once,
rows that depend only on (slot, number of slots), iteration without collectives, mixture, hold-out.
Several ranks are simulated in one process (one loader per rank); num_workers=2 uses real DataLoader
worker processes. Bad input and file formats: test_stream_input.py."""

from __future__ import annotations

import collections
import itertools
import json
import threading

import pytest
import torch

from shardtune import ShardtuneError
from shardtune.data.stream import StreamConfig, StreamLoader, lockstep, merge_states, preview

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def text(tag: str, i: int) -> str:
    n = 40 if i % 10 == 3 else i % 13  # some documents span several rows
    return f"{tag}{i} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from shardtune.assets import packaged_model

    return AutoTokenizer.from_pretrained(packaged_model("minilm-l6"))


def write_corpus(root) -> tuple[list[dict], list[str]]:
    """Every supported local format, a duplicate, an empty text and bad lines -> (sources, valid texts).
    With partition_bytes 1024 the jsonl, tsv and txt files split into byte ranges, the parquet file into
    its row groups (23 partitions in all)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = []
    a = [text("a", i) for i in range(60)] + [text("a", 5), ""]  # a duplicate and an empty document
    with open(root / "a.jsonl", "w") as f:
        for i, t in enumerate(a):
            f.write(json.dumps({"text": t, "id": i}) + "\n" + ("{broken\n\n" if i == 30 else ""))
    texts += a
    b = [text("b", i) for i in range(40)]
    b[7] = "b7 first line\nsecond, line"
    with open(root / "b.csv", "w", newline="") as f:
        f.write("id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(b)))
    (root / "c.tsv").write_text("text\tid\n" + "".join(f"{text('c', i)}\t{i}\n" for i in range(20)))
    pq.write_table(pa.table({"text": [text("p", i) for i in range(30)]}), root / "p.parquet", row_group_size=7)
    (root / "j.json").write_text(json.dumps([{"text": text("j", i)} for i in range(15)]))
    (root / "lines").mkdir()
    for k in range(2):
        (root / "lines" / f"{k}.txt").write_text("".join(text(f"l{k}_", i) + "\n" for i in range(12)))
    (root / "files").mkdir()
    for k in range(5):
        (root / "files" / f"{k}.txt").write_text(text("f", k) + "\nmore of file\n")
    texts += b + [text("c", i) for i in range(20)] + [text("p", i) for i in range(30)] + [text("j", i) for i in range(15)]
    texts += [text(f"l{k}_", i) for k in range(2) for i in range(12)] + [text("f", k) + "\nmore of file\n" for k in range(5)]
    sources = [
        {"path": str(root / "a.jsonl"), "weight": 3}, {"path": str(root / "b.csv"), "weight": 2, "split": False},  # a quoted line break
        {"path": str(root / "c.tsv")}, {"path": str(root / "p.parquet")}, {"path": str(root / "j.json")},
        {"path": str(root / "lines" / "*.txt")}, {"path": str(root / "files"), "txt_unit": "file"},
    ]
    return sources, texts


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


def make_cfg(sources, **kw) -> StreamConfig:
    base = {"sources": sources, "seq_len": 24, "shuffle_block": 16, "on_source_end": "drop", "emit_doc_ids": True, "seed": 3,
            "partition_bytes": 1024}
    return StreamConfig.model_validate({**base, **kw})


def loaders(cfg, tok, world, workers, state=None, batch_size=2, **kw):
    return [StreamLoader(cfg, tok, rank=r, world_size=world, num_workers=workers, batch_size=batch_size, state=state, **kw)
            for r in range(world)]


def saved(ls) -> dict:
    return json.loads(json.dumps(merge_states([x.state_dict() for x in ls])))


def take(ls, counts) -> list[list[dict]]:
    """Each rank consumes its own number of batches (None = all it has): ranks are independent."""
    return [list(itertools.islice(ld, n)) for ld, n in zip(ls, counts)]


def same(a: list, b: list) -> bool:
    def eq(x, y):
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    return len(a) == len(b) and all(eq(x, y) for x, y in zip(a, b))


def total_stats(ls) -> dict:
    out = collections.Counter()
    for x in ls:
        out.update({k: v for k, v in x.stats().items() if k != "data/packing_efficiency"})
    return dict(out)


def doc_tokens(batches: list[dict]) -> dict[int, list[int]]:
    """Document id -> its tokens, in consumption order (a document lives in one slot at a time)."""
    out: dict[int, list[int]] = collections.defaultdict(list)
    for batch in batches:
        for ids, docs in zip(batch["input_ids"].tolist(), batch["doc_ids"].tolist()):
            for t, d in zip(ids, docs):
                if d >= 0:
                    out[d].append(t)
    return dict(out)


def flat(per_rank: list[list[dict]]) -> list[dict]:
    return [b for r in per_rank for b in r]


# ---------------------------------------------------------------- exact resume on the same slots


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_exact_resume(corpus, tok, world, workers):
    cfg = make_cfg(corpus[0])
    ref = loaders(cfg, tok, world, workers)
    full = take(ref, [None] * world)
    assert all(len(f) > 6 for f in full)
    first = loaders(cfg, tok, world, workers)
    head = take(first, [len(f) // 2 + r for r, f in enumerate(full)])
    resumed = loaders(cfg, tok, world, workers, state=saved(first))
    tail = take(resumed, [None] * world)
    assert all(same(h + t, f) for h, t, f in zip(head, tail, full))
    assert total_stats(resumed) == total_stats(ref)  # counts are part of the state too


@pytest.mark.parametrize("variant", [
    {"clean": {"dedup": True}},  # resuming rebuilds the open partitions' hash sets
    {"doc_positions": True, "split_documents": False, "shuffle_block": 0},
    {"on_source_end": "repeat", "max_documents": 400, "holdout": 10},  # crosses epochs, skipping held-out records
])
def test_resume_of_resume(corpus, tok, variant):
    cfg = make_cfg(corpus[0], **variant)
    full = take(loaders(cfg, tok, 2, 2), [None, None])
    run1 = loaders(cfg, tok, 2, 2)
    part1 = take(run1, [3, 2])
    run2 = loaders(cfg, tok, 2, 2, state=saved(run1))
    part2 = take(run2, [4, 5])
    part3 = take(loaders(cfg, tok, 2, 2, state=saved(run2)), [None, None])
    assert all(same(a + b + c, f) for a, b, c, f in zip(part1, part2, part3, full))


def test_rows_depend_only_on_slot_and_slot_count(corpus, tok):
    """1 rank x 2 workers and 2 ranks x 0 workers: the same rows per slot, and a state moves between them."""
    cfg = make_cfg(corpus[0])

    def by_slot(ls, n=None):  # one row per batch, so every batch has one slot
        out = collections.defaultdict(list)
        for ld in ls:
            for _ in itertools.islice(iter(ld.peek, None), n):
                batch = ld.next()
                out[ld.last_slot].append(batch)
        return out

    workers = by_slot(loaders(cfg, tok, 1, 2, batch_size=1))
    ranks = by_slot(loaders(cfg, tok, 2, 0, batch_size=1))
    assert sorted(workers) == sorted(ranks) == [0, 1] and all(same(workers[s], ranks[s]) for s in (0, 1))
    first = loaders(cfg, tok, 1, 2, batch_size=1)
    head = by_slot(first, 5)
    rest = by_slot(loaders(cfg, tok, 2, 0, state=saved(first), batch_size=1))  # the same 2 slots: no re-deal
    assert all(same(head[s] + rest[s], workers[s]) for s in (0, 1))


def test_a_batch_takes_rows_from_the_workers_in_turn(corpus, tok):
    """With several workers a rank stacks single rows from its workers in turn: 1 rank x 2 workers x 8 rows holds the
    rows that 2 ranks x 0 workers x 4 rows hold together, so a step's rows do not depend on its split into micro-batches
    and ranks (the token-weighted loss then makes the step's gradient the same)."""
    cfg = make_cfg(corpus[0])
    (one,) = loaders(cfg, tok, 1, 2, batch_size=8)
    two = loaders(cfg, tok, 2, 0, batch_size=4)
    for _ in range(3):
        big, parts = one.next(), [ld.next() for ld in two]
        assert big["input_ids"].shape[0] == 8
        rows = lambda b: sorted(map(tuple, b["input_ids"].tolist()))  # noqa: E731
        assert rows(big) == sorted(rows(parts[0]) + rows(parts[1]))
        assert torch.equal(big["input_ids"][0::2], parts[0]["input_ids"]) and torch.equal(big["input_ids"][1::2], parts[1]["input_ids"])


def test_state_is_small_json_and_checked(corpus, tok):
    cfg = make_cfg(corpus[0])
    (ld,) = loaders(cfg, tok, 1, 2)
    ld.next()
    state = ld.state_dict()
    assert len(json.dumps(state)) < 6000  # settings (2.5 KB here) + per-slot partition lists and open positions
    with pytest.raises(ShardtuneError, match=r"different data settings \(data.seed: 3 then, 4 now\)"):
        StreamLoader(make_cfg(corpus[0], seed=4), tok, num_workers=2, state=state)
    with pytest.raises(ShardtuneError, match="other source files"):
        with open(corpus[0][2]["path"], "a") as f:
            f.write("one more\t99\n")
        StreamLoader(cfg, tok, num_workers=2, state=state)


def test_partial_state_needs_every_rank_for_another_layout(corpus, tok):
    cfg = make_cfg(corpus[0])
    part = loaders(cfg, tok, 2, 0)[0].state_dict()
    StreamLoader(cfg, tok, rank=0, world_size=2, state=part)  # the same layout needs only this rank's part
    with pytest.raises(ShardtuneError, match="merge_states"):
        StreamLoader(cfg, tok, state=part)  # another layout needs every rank's part


# ---------------------------------------------------------------- other slot counts: every document exactly once


@pytest.fixture(params=[{}, {"clean": {"dedup": True}, "shuffle_block": 5}], ids=["plain", "dedup"])
def reference(corpus, tok, request):
    cfg = make_cfg(corpus[0], **request.param)
    ref = doc_tokens(list(StreamLoader(cfg, tok, batch_size=2)))
    if not request.param:
        nonempty = [t for t in corpus[1] if t.strip()]  # the duplicate too: a5's copy is in another partition
        assert sorted(ref.values()) == sorted(tok(t, add_special_tokens=False)["input_ids"] + [tok.sep_token_id] for t in nonempty)
    return cfg, ref


def test_resume_through_1_2_4_1_slots(reference, tok):
    cfg, ref = reference
    run1 = loaders(cfg, tok, 1, 0)
    got = flat(take(run1, [4]))
    run2 = loaders(cfg, tok, 1, 2, state=saved(run1))  # 2 slots (workers)
    got += flat(take(run2, [5]))
    run3 = loaders(cfg, tok, 2, 2, state=saved(run2))  # 4 slots (2 ranks x 2 workers), ranks at their own pace
    got += flat(take(run3, [2, 6]))
    got += flat(take(loaders(cfg, tok, 1, 0, state=saved(run3)), [None]))
    assert doc_tokens(got) == ref


def test_repeat_with_a_quota_through_other_slot_counts(corpus, tok):
    """Endless sources cut by max_documents: re-dealt twice, every (epoch, partition, record) at most once, N in all."""
    cfg = make_cfg(corpus[0], on_source_end="repeat", max_documents=500)
    run1 = loaders(cfg, tok, 1, 0)
    got = flat(take(run1, [30]))
    run2 = loaders(cfg, tok, 3, 0, state=saved(run1))
    got += flat(take(run2, [10, 20, 15]))
    run3 = loaders(cfg, tok, 1, 2, state=saved(run2))
    got += flat(take(run3, [None]))
    docs, stats = doc_tokens(got), run3[0].stats()  # the counts travel with the state through both re-deals
    assert max(k >> 32 for k in docs) >= len(run1[0].plan.parts)  # a second epoch was read
    assert len(docs) == stats["data/documents"]  # no document id twice
    assert stats["data/documents"] + stats.get("data/dropped/empty", 0) == 500


def test_snapshot_taken_before_a_step_resumes_there(corpus, tok):
    """What a trainer saves when a step is abandoned: the position before its micro-batches."""
    cfg = make_cfg(corpus[0])
    (ref,) = loaders(cfg, tok, 1, 2)
    full = list(ref)
    (ld,) = loaders(cfg, tok, 1, 2)
    head = [ld.next() for _ in range(4)]
    mark = ld.snapshot()
    [ld.next() for _ in range(3)]  # fetched for a step that does not happen
    (resumed,) = loaders(cfg, tok, 1, 2, state=ld.state_dict(mark))
    assert same(head + list(resumed), full)


def test_lockstep_stop_then_one_rank(reference, tok):
    cfg, ref = reference
    run1 = loaders(cfg, tok, 2, 2)
    steps = list(lockstep(run1))  # stops when the first rank runs out; the rest stays in the state
    assert steps and all(len(s) == 2 for s in steps)
    (run2,) = loaders(cfg, tok, 1, 0, state=saved(run1))
    assert doc_tokens(flat(steps) + list(run2)) == ref


def test_uneven_pad_consumes_everything_with_empty_batches(reference, tok):
    cfg, ref = reference
    steps = list(lockstep(loaders(cfg, tok, 2, 2), uneven="pad"))
    pads = [b for s in steps for b in s if (b["labels"] == -100).all()]
    assert pads and all((b["doc_ids"] == -1).all() and b["attention_mask"].sum() == 0 for b in pads)
    assert doc_tokens(flat(steps)) == ref


# ---------------------------------------------------------------- iteration across ranks


def test_train_without_sync_yields_each_ranks_own_batches(reference, tok):
    """No process group exists here: a collective would raise. Each rank runs to its own end."""
    cfg, ref = reference
    ranks = loaders(cfg, tok, 2, 0)
    got = [list(ld) for ld in ranks]
    assert len(got[0]) != len(got[1])  # uneven, and nobody waited for anybody
    assert doc_tokens(flat(got)) == ref
    with pytest.raises(ShardtuneError, match="validation stream with world_size > 1 needs sync="):
        next(iter(StreamLoader(make_cfg(cfg.sources, holdout=5), tok, split="validation", rank=0, world_size=2)))


def test_sync_stops_all_ranks_together(corpus, tok):
    cfg = make_cfg(corpus[0])
    expected = list(lockstep(loaders(cfg, tok, 2, 0)))
    flags, barrier = [None, None], threading.Barrier(2)

    def sync(rank):
        def gather(has):
            flags[rank] = has
            barrier.wait()
            out = list(flags)
            barrier.wait()
            return out
        return gather

    got = [[], []]
    ranks = [StreamLoader(cfg, tok, rank=r, world_size=2, batch_size=2, sync=sync(r)) for r in range(2)]
    threads = [threading.Thread(target=lambda r=r: got[r].extend(ranks[r]), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank is stuck in the sync"
    assert len(got[0]) == len(got[1]) == len(expected)
    assert all(same(list(s), e) for s, e in zip(zip(*got), expected))


# ---------------------------------------------------------------- mixture, hold-out, preview


def test_mixture_proportions_over_10000_documents(tmp_path, tok):
    sources = []
    for name, weight in [("x", 5), ("y", 3), ("z", 2)]:
        (tmp_path / f"{name}.txt").write_text("".join(f"{name} {i}\n" for i in range(40)))
        sources.append({"path": str(tmp_path / f"{name}.txt"), "weight": weight})
    cfg = StreamConfig(sources=sources, on_source_end="repeat", max_documents=10_000, seq_len=512)
    ld = StreamLoader(cfg, tok, batch_size=16)
    for _ in ld:
        pass
    stats = ld.stats()
    assert stats["data/documents"] == 10_000
    for i, w in enumerate([0.5, 0.3, 0.2]):
        assert abs(stats[f"data/source{i}/documents"] / 10_000 - w) < 0.02


def test_holdout_is_disjoint_and_complete(corpus, tok):
    cfg = make_cfg(corpus[0], holdout=12, clean={"dedup": True})
    for world in (1, 3):  # the hold-out does not depend on the number of slots
        train = doc_tokens(flat(take(loaders(cfg, tok, world, 0), [None] * world)))
        val = doc_tokens(flat(lockstep(loaders(cfg, tok, world, 0, split="validation"), uneven="pad")))
        assert 11 <= len(val) <= 12 and not set(train) & set(val)  # 12 held-out records; the empty one may be dropped
        nonempty = [t for t in corpus[1] if t.strip()]
        # a copy of a held-out document in the same partition is dropped from train (dedup); a5's copy is in another
        assert len(train) + len(val) in (len(nonempty), len(nonempty) - 1)
        assert {tuple(x) for x in train.values()} | {tuple(x) for x in val.values()} == {
            tuple(tok(t, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]) for t in nonempty}
    with pytest.raises(ShardtuneError, match="validation_sources or holdout"):
        StreamLoader(make_cfg(corpus[0]), tok, split="validation")


def test_preview(corpus, tok):
    samples, stats = preview(make_cfg(corpus[0], emit_doc_ids=False), tok, 3)
    assert len(samples) == 3 and all(len(s["input_ids"]) == 24 for s in samples)
    assert "[SEP]" in samples[0]["text"] and stats["data/sequences"] == 3 and stats["data/packing_efficiency"] == 1.0


def test_source_end_policies(tmp_path, tok):
    (tmp_path / "x.txt").write_text("".join(f"x {i}\n" for i in range(10)))
    (tmp_path / "y.txt").write_text("".join(f"y {i}\n" for i in range(50)))
    sources = [{"path": str(tmp_path / "x.txt")}, {"path": str(tmp_path / "y.txt")}]

    def docs(**kw):
        ld = StreamLoader(StreamConfig(sources=sources, seq_len=64, **kw), tok, batch_size=4)
        list(ld)
        return ld.stats()["data/documents"], ld.stats().get("data/source0/documents", 0)

    total, xs = docs(on_source_end="stop")
    assert xs == 10 and total < 40  # ends when x is drawn after its last record
    assert docs(on_source_end="drop") == (60, 10)  # every record once
    total, xs = docs(on_source_end="repeat", max_documents=300)
    assert total == 300 and 120 < xs < 180
