"""The streaming stage end to end: exact resume, resharding with document accounting, mixtures,
equal batches across ranks, hold-out, and bad data. Two ranks are simulated in one process
(two loaders, rank 0/1 of world 2); num_workers=2 uses real DataLoader worker processes."""

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
    """Every supported local format, some duplicates, an empty text and bad lines -> (sources, valid texts)."""
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
        {"path": str(root / "a.jsonl"), "weight": 3}, {"path": str(root / "b.csv"), "weight": 2},
        {"path": str(root / "c.tsv")}, {"path": str(root / "p.parquet")}, {"path": str(root / "j.json")},
        {"path": str(root / "lines" / "*.txt")}, {"path": str(root / "files"), "txt_unit": "file"},
    ]
    return sources, texts


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


def make_cfg(sources, **kw) -> StreamConfig:
    base = {"sources": sources, "seq_len": 24, "shuffle_block": 16, "on_source_end": "drop", "emit_doc_ids": True, "seed": 3}
    return StreamConfig.model_validate({**base, **kw})


def loaders(cfg, tok, world, workers, state=None, **kw):
    return [StreamLoader(cfg, tok, rank=r, world_size=world, num_workers=workers, batch_size=2, state=state, **kw) for r in range(world)]


def saved(ls) -> dict:
    return json.loads(json.dumps(merge_states([x.state_dict() for x in ls])))


def same(a: list, b: list) -> bool:
    def eq(x, y):
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    return len(a) == len(b) and all(len(s) == len(t) and all(eq(x, y) for x, y in zip(s, t)) for s, t in zip(a, b))


def total_stats(ls) -> dict:
    out = collections.Counter()
    for x in ls:
        out.update({k: v for k, v in x.stats().items() if k != "data/packing_efficiency"})
    return dict(out)


def doc_tokens(steps: list[list[dict]]) -> dict[int, list[int]]:
    """Global document index -> its tokens, in consumption order (a document lives in one slot at a time)."""
    out: dict[int, list[int]] = collections.defaultdict(list)
    for step in steps:
        for batch in step:
            for ids, docs in zip(batch["input_ids"].tolist(), batch["doc_ids"].tolist()):
                for t, d in zip(ids, docs):
                    if d >= 0:
                        out[d].append(t)
    return dict(out)


# ---------------------------------------------------------------- exact resume


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_exact_resume(corpus, tok, world, workers):
    cfg = make_cfg(corpus[0])
    ref = loaders(cfg, tok, world, workers)
    full = list(lockstep(ref))
    assert len(full) > 6
    first = loaders(cfg, tok, world, workers)
    head = list(itertools.islice(lockstep(first), len(full) // 2))
    resumed = loaders(cfg, tok, world, workers, state=saved(first))
    tail = list(lockstep(resumed))
    assert same(head + tail, full)
    assert total_stats(resumed) == total_stats(ref)  # counts are part of the state too


@pytest.mark.parametrize("variant", [
    {"clean": {"dedup": True}},
    {"doc_positions": True, "split_documents": False, "shuffle_block": 0},
    {"on_source_end": "repeat", "max_documents": 400, "holdout": 10},  # crosses epochs, skipping held-out records
])
def test_resume_of_resume(corpus, tok, variant):
    cfg = make_cfg(corpus[0], **variant)
    full = list(lockstep(loaders(cfg, tok, 2, 2)))
    run1 = loaders(cfg, tok, 2, 2)
    part1 = list(itertools.islice(lockstep(run1), 3))
    run2 = loaders(cfg, tok, 2, 2, state=saved(run1))
    part2 = list(itertools.islice(lockstep(run2), 4))
    run3 = loaders(cfg, tok, 2, 2, state=saved(run2))
    assert same(part1 + part2 + list(lockstep(run3)), full)


def test_state_is_small_json_and_checked(corpus, tok):
    cfg = make_cfg(corpus[0])
    (ld,) = loaders(cfg, tok, 1, 2)
    ld.next()
    state = ld.state_dict()
    assert len(json.dumps(state)) < 4000
    with pytest.raises(ShardtuneError, match="different data settings"):
        StreamLoader(make_cfg(corpus[0], seed=4), tok, num_workers=2, state=state)
    part = loaders(cfg, tok, 2, 0)[0].state_dict()
    StreamLoader(cfg, tok, rank=0, world_size=2, state=part)  # the same layout needs only this rank's part
    with pytest.raises(ShardtuneError, match="merge_states"):
        StreamLoader(cfg, tok, state=part)  # another layout needs every rank's part


# ---------------------------------------------------------------- resharding: every document exactly once


@pytest.fixture
def reference(corpus, tok):
    cfg = make_cfg(corpus[0], clean={"dedup": True})
    ref = doc_tokens([[b] for b in StreamLoader(cfg, tok, batch_size=2)])
    kept = {t for t in corpus[1] if t.strip()}
    expected = sorted(tok(t, add_special_tokens=False)["input_ids"] + [tok.sep_token_id] for t in kept)
    assert sorted(ref.values()) == expected  # no skip, no repeat, no duplicate, exact tokens
    return cfg, ref


def test_two_ranks_to_one(reference, tok):
    cfg, ref = reference
    run1 = loaders(cfg, tok, 2, 2)
    steps = list(itertools.islice(lockstep(run1), 5))
    (run2,) = loaders(cfg, tok, 1, 0, state=saved(run1))
    steps += [[b] for b in run2]
    assert doc_tokens(steps) == ref


def test_one_rank_to_two_and_back(reference, tok):
    cfg, ref = reference
    run1 = loaders(cfg, tok, 1, 2)
    steps = list(itertools.islice(lockstep(run1), 9))
    run2 = loaders(cfg, tok, 2, 0, state=saved(run1))
    more = list(lockstep(run2))  # stops when the first rank runs out; the rest stays in the state
    assert more and all(len(s) == 2 for s in more)
    (run3,) = loaders(cfg, tok, 1, 2, state=saved(run2))
    steps += more + [[b] for b in run3]
    assert doc_tokens(steps) == ref


# ---------------------------------------------------------------- equal batches across ranks


def test_uneven_pad_consumes_everything_with_empty_batches(reference, tok):
    cfg, ref = reference
    steps = list(lockstep(loaders(cfg, tok, 2, 2), uneven="pad"))
    pads = [b for s in steps for b in s if (b["labels"] == -100).all()]
    assert pads and all((b["doc_ids"] == -1).all() and b["attention_mask"].sum() == 0 for b in pads)
    assert doc_tokens(steps) == ref


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
    threads = [threading.Thread(target=lambda r=r: got[r].extend(ranks[r])) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got[0]) == len(got[1]) == len(expected)
    assert same([list(s) for s in zip(*got)], expected)
    alone = list(StreamLoader(cfg, tok, rank=0, world_size=2, batch_size=2))  # train, no sync: this rank's batches, no collective
    assert len(alone) >= len(got[0]) and same([[b] for b in alone[: len(got[0])]], [[b] for b in got[0]])


# ---------------------------------------------------------------- mixture, hold-out, formats


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
    train = doc_tokens([[b] for b in StreamLoader(cfg, tok, batch_size=4)])
    val = doc_tokens([[b] for b in StreamLoader(cfg, tok, split="validation", batch_size=4)])
    assert 10 <= len(val) <= 12  # 12 held-out records; the empty one or a duplicate may be dropped
    both = sorted(list(train.values()) + list(val.values()))
    kept = {t for t in corpus[1] if t.strip()}
    # a duplicate of a held-out document may be in either split, never in both
    assert len(both) == len(kept) and len({tuple(x) for x in both}) == len(kept)
    with pytest.raises(ShardtuneError, match="validation_sources or holdout"):
        StreamLoader(make_cfg(corpus[0]), tok, split="validation")


def test_preview(corpus, tok):
    samples, stats = preview(make_cfg(corpus[0], emit_doc_ids=False), tok, 3)
    assert len(samples) == 3 and all(len(s["input_ids"]) == 24 for s in samples)
    assert "[SEP]" in samples[0]["text"] and stats["data/sequences"] == 3 and stats["data/packing_efficiency"] == 1.0


# ---------------------------------------------------------------- bad data


CLEAN = [text("ok", i) for i in range(30)]


def jsonl_lines(texts):
    return [json.dumps({"text": t}).encode() + b"\n" for t in texts]


def dirty_jsonl(bad: bytes, at: int = 3) -> tuple[bytes, bytes]:
    lines = jsonl_lines(CLEAN)
    return b"".join(lines[:at] + [bad] + lines[at:]), b"".join(lines)


BAD_JSONL = {
    "invalid_utf8": b'{"text": "bad \xff\xfe byte"}\n',
    "invalid_json": b'{"text": "x"}\x00\n',
    "missing_field": b'{"body": "no text here"}\n',
    "not_text": b'{"text": 5}\n',
    "not_object": b'["text", "in a list"]\n',
}


def run_all(sources, tok, **kw) -> tuple[list, dict]:
    """2 ranks, uneven=pad: every valid record's tokens, in the order the ranks see them."""
    cfg = StreamConfig(sources=sources, seq_len=16, emit_doc_ids=True, **kw)
    ls = loaders(cfg, tok, 2, 0)
    steps = list(lockstep(ls, uneven="pad"))
    return steps, total_stats(ls)


@pytest.mark.parametrize("reason", list(BAD_JSONL))
def test_bad_jsonl_record(tmp_path, tok, reason):
    dirty, clean = dirty_jsonl(BAD_JSONL[reason])
    (tmp_path / "dirty.jsonl").write_bytes(dirty)
    (tmp_path / "clean.jsonl").write_bytes(clean)
    other = tmp_path / "other.txt"
    other.write_text("".join(text("o", i) + "\n" for i in range(20)))
    mix = lambda f: [{"path": str(tmp_path / f)}, {"path": str(other), "weight": 0.5}]  # noqa: E731
    steps, stats = run_all(mix("dirty.jsonl"), tok)
    assert stats[f"data/dropped/{reason}"] == 1
    assert same(steps, run_all(mix("clean.jsonl"), tok)[0])
    with pytest.raises(ShardtuneError) as err:
        list(lockstep(loaders(StreamConfig(sources=mix("dirty.jsonl"), on_bad_record="error", seq_len=16), tok, 1, 2)))
    msg = str(err.value)
    assert "dirty.jsonl line 4" in msg and "on_bad_record: skip" in msg and "\n" not in msg


def test_nul_bytes_are_repaired(tmp_path, tok):
    (tmp_path / "nul.jsonl").write_bytes(b'{"text": "nul\x00 inside"}\n{"text": "escaped \\u0000 nul"}\n' + b"".join(jsonl_lines(CLEAN)))
    (tmp_path / "clean.jsonl").write_bytes(b"".join(jsonl_lines(["nul inside", "escaped  nul"] + CLEAN)))
    (tmp_path / "nul.csv").write_bytes(b'text\n"a\x00b"\n' + b"".join(f"{t}\n".encode() for t in CLEAN))
    (tmp_path / "clean.csv").write_bytes(b"text\nab\n" + b"".join(f"{t}\n".encode() for t in CLEAN))
    for dirty, clean in [("nul.jsonl", "clean.jsonl"), ("nul.csv", "clean.csv")]:
        steps, stats = run_all([{"path": str(tmp_path / dirty)}], tok, on_bad_record="error")
        assert stats["data/repaired/control_chars"] >= 1
        assert same(steps, run_all([{"path": str(tmp_path / clean)}], tok)[0])


def test_empty_lines_and_files(tmp_path, tok):
    d = tmp_path / "d"
    d.mkdir()
    (d / "0.jsonl").write_bytes(b"\n" + b"\n\n".join(jsonl_lines(CLEAN[:10])) + b"\n  \n")
    (d / "1.jsonl").write_bytes(b"")
    (d / "2.txt").write_text("\n".join(CLEAN[10:]) + "\n\n")
    steps, stats = run_all([{"path": str(d)}], tok, on_bad_record="error")
    assert stats["data/skipped/empty_file"] == 1 and stats["data/skipped/blank_line"] >= 10
    assert stats["data/documents"] == len(CLEAN)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ShardtuneError, match="only empty files"):
        StreamLoader(StreamConfig(sources=[{"path": str(tmp_path / "empty.jsonl")}]), tok)


def test_one_megabyte_line(tmp_path, tok):
    big = "word " * 200_000
    (tmp_path / "big.jsonl").write_bytes(b"".join(jsonl_lines(CLEAN[:5] + [big] + CLEAN[5:])))
    (tmp_path / "clean.jsonl").write_bytes(b"".join(jsonl_lines(CLEAN)))
    cfg = StreamConfig(sources=[{"path": str(tmp_path / "big.jsonl")}], seq_len=512, clean={"max_chars": 100_000})
    ld = StreamLoader(cfg, tok, batch_size=64)
    assert sum(b["attention_mask"].sum().item() for b in ld) > 200_000
    assert ld.stats()["data/repaired/split"] == 1
    src = [{"path": str(tmp_path / "big.jsonl")}]
    steps, stats = run_all(src, tok, max_record_bytes=100_000)
    assert stats["data/dropped/too_large"] == 1
    assert same(steps, run_all([{"path": str(tmp_path / "clean.jsonl")}], tok, max_record_bytes=100_000)[0])
    with pytest.raises(ShardtuneError, match="big.jsonl line 6 is longer than max_record_bytes"):
        list(StreamLoader(StreamConfig(sources=src, max_record_bytes=100_000, on_bad_record="error"), tok))


def test_ragged_csv_rows(tmp_path, tok):
    rows = [f'"{t}",{i}\n' for i, t in enumerate(CLEAN)]
    (tmp_path / "r.csv").write_text("text,id\n" + "".join(rows[:4]) + "only one field\n" + "".join(rows[4:9]) + "a,b,c\n" + "".join(rows[9:]))
    (tmp_path / "c.csv").write_text("text,id\n" + "".join(rows))
    steps, stats = run_all([{"path": str(tmp_path / "r.csv")}], tok)
    assert stats["data/dropped/ragged_row"] == 2
    assert same(steps, run_all([{"path": str(tmp_path / "c.csv")}], tok)[0])
    with pytest.raises(ShardtuneError, match=r"r.csv line 6 has 1 fields where the header has 2"):
        list(StreamLoader(StreamConfig(sources=[{"path": str(tmp_path / "r.csv")}], on_bad_record="error"), tok))


def test_sources_that_fail_at_once(tmp_path, tok):
    (tmp_path / "t.jsonl").write_bytes(b"".join(jsonl_lines(CLEAN)))
    (tmp_path / "t.xml").write_text("<a/>")
    (tmp_path / "t.csv").write_text("body\nx\n")
    cases = [
        ({"path": str(tmp_path / "nothing" / "*.jsonl")}, "matches no files"),
        ({"path": str(tmp_path / "missing.jsonl")}, "does not exist"),
        ({"path": str(tmp_path / "t.jsonl"), "text_field": "content"}, "no field 'content'"),
        ({"path": str(tmp_path / "t.csv")}, "no column 'text'"),
        ({"path": str(tmp_path / "t.xml")}, "unknown extension"),
        ({"path": "hub:no-such-user/no-such-data"}, "could not open hub data set"),
    ]
    for source, words in cases:
        with pytest.raises(ShardtuneError, match=words) as err:
            StreamLoader(StreamConfig(sources=[source]), tok)
        assert "\n" not in str(err.value)


def test_hub_source_streams_through_datasets_and_resumes(tmp_path, tok, monkeypatch):
    import datasets

    from shardtune.data import readers

    (tmp_path / "h.jsonl").write_bytes(b"".join(jsonl_lines(CLEAN)))
    local = lambda spec: datasets.load_dataset("json", data_files=str(tmp_path / "h.jsonl"), split="train", streaming=True)  # noqa: E731
    monkeypatch.setattr(readers, "open_hub", local)  # the hub is offline here: same code path, local rows
    (tmp_path / "o.txt").write_text("".join(text("o", i) + "\n" for i in range(20)))
    cfg = StreamConfig(sources=[{"path": "hub:someone/data"}, {"path": str(tmp_path / "o.txt")}], seq_len=16, emit_doc_ids=True, on_source_end="drop")
    full = list(lockstep(loaders(cfg, tok, 1, 2)))
    first = loaders(cfg, tok, 1, 2)
    head = list(itertools.islice(lockstep(first), 3))
    assert same(head + list(lockstep(loaders(cfg, tok, 1, 2, state=saved(first)))), full)
    assert sum(len(v) > 0 for v in doc_tokens(full).values()) == len(CLEAN) + 20


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
