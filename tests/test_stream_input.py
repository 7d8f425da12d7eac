"""The stream on real and bad input: byte-range partitions that read every record once, BOM and CRLF,
bad records counted (or one sentence), formats, hub sources, and the slots' bytes."""

from __future__ import annotations

import json
import os
import random

import pytest

from shardtune import ShardtuneError, storage
from shardtune.config import SourceSpec
from shardtune.data import readers
from shardtune.data.partitions import partition_table, resolve_files
from shardtune.data.stream import StreamConfig, StreamLoader, lockstep

from test_stream import doc_tokens, flat, loaders, saved, same, take, text, tok, total_stats  # noqa: F401  (tok: fixture)


# ---------------------------------------------------------------- partitions


def records_of(parts, columns=None) -> list:
    out = []
    for part in parts:
        cur = {"pos": part.initial_pos()}
        events = list(readers.read_part(part, cur, 1 << 20, columns))
        assert not [e for e in events if e[0] == readers.BAD]  # a range that starts mid-record would read a broken one
        out += [e[1] for e in events if e[0] == readers.OK]
        assert cur["pos"] >= min(part.end, os.path.getsize(part.path)) or part.fmt != "jsonl"
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "txt", "csv"])
def test_byte_ranges_read_every_record_exactly_once(tmp_path, fmt):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(["a", "bb", "ccc", "dddd"]) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    path = tmp_path / f"d.{fmt}"
    eol = "\r\n"
    body = {"jsonl": lambda t: json.dumps({"text": t}), "txt": lambda t: t, "csv": lambda t: f'"{t}",x'}[fmt]
    head = "text,other" + eol if fmt == "csv" else ""
    path.write_bytes(readers.BOM + (head + "".join(body(t) + eol for t in texts)).encode())
    spec = SourceSpec(path=str(path))
    for part_bytes in (1024, 1500, 4099, 1 << 20):
        parts, _ = partition_table([spec], [resolve_files(spec)], part_bytes)
        assert len(parts) == -(-path.stat().st_size // part_bytes)
        recs = records_of(parts, None if fmt == "txt" else ["text"])
        got = [r if isinstance(r, str) else r["text"] for r in recs]
        assert got == texts, part_bytes  # in order, none lost, none twice, no BOM, no "\r"


def test_csv_quoted_line_break_across_a_partition_is_one_sentence(tmp_path, tok):
    rows = "".join(f'{i},"{text("q", i)}\nsecond line of {i}"\n' for i in range(200))
    (tmp_path / "q.csv").write_text("id,text\n" + rows)
    spec = {"path": str(tmp_path / "q.csv")}
    with pytest.raises(ShardtuneError, match="quoted field with a line break across byte .*set split: false") as err:
        for ld in loaders(StreamConfig(sources=[spec], partition_bytes=1024), tok, 1, 0):
            list(ld)
    assert "\n" not in str(err.value)
    (ld,) = loaders(StreamConfig(sources=[{**spec, "split": False}], partition_bytes=1024, emit_doc_ids=True), tok, 1, 0)
    assert len(doc_tokens(list(ld))) == 200


def test_each_slot_reads_only_its_partitions(tmp_path, tok, monkeypatch):
    """Bytes opened per slot, counted at the file objects: the slots together read the corpus about once."""
    lines = [json.dumps({"text": text("s", i)}) + "\n" for i in range(2000)]
    (tmp_path / "s.jsonl").write_text("".join(lines))
    size = (tmp_path / "s.jsonl").stat().st_size
    read = [0]

    class Counting:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def readline(self, *a):
            out = self.f.readline(*a)
            read[0] += len(out)
            return out

        def read(self, *a):
            out = self.f.read(*a)
            read[0] += len(out)
            return out

    real_open = storage.open_input
    monkeypatch.setattr(storage, "open_input", lambda *a, **k: Counting(real_open(*a, **k)))
    cfg = StreamConfig(sources=[{"path": str(tmp_path / "s.jsonl")}], partition_bytes=4096, seq_len=64, emit_doc_ids=True)
    per_slot, docs = [], {}
    ranks = loaders(cfg, tok, 8, 0)
    for ld in ranks:
        read[0] = 0
        docs.update(doc_tokens(list(ld)))
        per_slot.append(read[0])
    assert len(docs) == 2000
    # a range reads its own bytes and the rest of its last record (the next range reads that far to find its first)
    overhead = 2 * max(len(s) for s in lines)
    assert all(abs(b - size / 8) <= 0.05 * size / 8 + 4096 + overhead for b in per_slot), per_slot
    assert size <= sum(per_slot) <= size + len(ranks[0].plan.parts) * overhead


# ---------------------------------------------------------------- bad data
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
    assert same(flat(steps), flat(run_all(mix("clean.jsonl"), tok)[0]))
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
        assert same(flat(steps), flat(run_all([{"path": str(tmp_path / clean)}], tok)[0]))


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
    clean = [{"path": str(tmp_path / "clean.jsonl")}]
    steps, stats = run_all(src, tok, max_record_bytes=100_000, partition_bytes=4 << 20)  # one partition, as the clean file
    assert stats["data/dropped/too_large"] == 1
    assert same(flat(steps), flat(run_all(clean, tok, max_record_bytes=100_000)[0]))
    # in 4 KiB partitions (256 of them over the long line): the partition that owns it skips it, the others hold no record
    steps, stats = run_all(src, tok, max_record_bytes=100_000, partition_bytes=4096)
    assert stats["data/dropped/too_large"] == 1
    want = doc_tokens(flat(run_all(clean, tok, max_record_bytes=100_000)[0]))
    assert sorted(doc_tokens(flat(steps)).values()) == sorted(want.values())
    with pytest.raises(ShardtuneError, match="big.jsonl line 6 is longer than max_record_bytes"):
        list(StreamLoader(StreamConfig(sources=src, max_record_bytes=100_000, on_bad_record="error"), tok))


def test_ragged_csv_rows(tmp_path, tok):
    rows = [f'"{t}",{i}\n' for i, t in enumerate(CLEAN)]
    (tmp_path / "r.csv").write_text("text,id\n" + "".join(rows[:4]) + "only one field\n" + "".join(rows[4:9]) + "a,b,c\n" + "".join(rows[9:]))
    (tmp_path / "c.csv").write_text("text,id\n" + "".join(rows))
    steps, stats = run_all([{"path": str(tmp_path / "r.csv")}], tok)
    assert stats["data/dropped/ragged_row"] == 2
    assert same(flat(steps), flat(run_all([{"path": str(tmp_path / "c.csv")}], tok)[0]))
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

    from shardtune.data import hub

    (tmp_path / "h.jsonl").write_bytes(b"".join(jsonl_lines(CLEAN)))
    local = lambda spec: datasets.load_dataset("json", data_files=str(tmp_path / "h.jsonl"), split="train", streaming=True)  # noqa: E731
    monkeypatch.setattr(hub, "open_hub", local)  # the hub is offline here: same code path, local rows
    (tmp_path / "o.txt").write_text("".join(text("o", i) + "\n" for i in range(20)))
    cfg = StreamConfig(sources=[{"path": "hub:someone/data"}, {"path": str(tmp_path / "o.txt")}], seq_len=16, emit_doc_ids=True, on_source_end="drop")
    (full,) = take(loaders(cfg, tok, 1, 2), [None])
    first = loaders(cfg, tok, 1, 2)
    (head,) = take(first, [3])
    assert same(head + list(loaders(cfg, tok, 1, 2, state=saved(first))[0]), full)
    assert sum(len(v) > 0 for v in doc_tokens(full).values()) == len(CLEAN) + 20


def test_bom_and_crlf_files_stream_like_clean_ones(tmp_path, tok):
    crlf = {"r.csv": "text,id\r\n" + "".join(f'"{t}",{i}\r\n' for i, t in enumerate(CLEAN)),
            "r.jsonl": "".join(json.dumps({"text": t}) + "\r\n" for t in CLEAN), "r.txt": "".join(t + "\r\n" for t in CLEAN)}
    for name, body in crlf.items():
        (tmp_path / name).write_bytes(readers.BOM + body.encode())
        (tmp_path / f"clean{name[1:]}").write_text(body.replace("\r\n", "\n"))
        steps, _ = run_all([{"path": str(tmp_path / name)}], tok, on_bad_record="error")
        assert same(flat(steps), flat(run_all([{"path": str(tmp_path / f"clean{name[1:]}")}], tok)[0])), name


def test_stream_workers_survive_stop_signals(tmp_path, tok):
    """Slurm signals every process of a step; the stream's DataLoader workers leave that to their rank."""
    from test_classification_data import signal_from_elsewhere

    (tmp_path / "w.jsonl").write_text("".join(json.dumps({"text": text("w", i)}) + "\n" for i in range(400)))
    cfg = StreamConfig(sources=[{"path": str(tmp_path / "w.jsonl")}], seq_len=16, emit_doc_ids=True)
    (ld,) = loaders(cfg, tok, 1, 2)
    got = [ld.next()]
    signal_from_elsewhere([w.pid for w in ld._it._workers])
    while ld.peek() is not None:  # the same DataLoader iterator (iter(ld) would start new workers)
        got.append(ld.next())
    assert len(doc_tokens(got)) == 400
