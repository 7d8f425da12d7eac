"""Data at s3:// URLs against a real S3 server (SeaweedFS on loopback, conftest's `s3` / `bucket` fixtures): a stream,
a classification file, compressed corpora and an uploaded packed cache read from the store give what the same files
give locally, and the request log (SHARDTUNE_STORE_LOG) shows each slot reading only its own byte ranges."""

from __future__ import annotations

import bz2
import collections
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from shardtune import ShardtuneError, storage
from shardtune.assets import packaged_data
from shardtune.data.cache import build
from shardtune.data.partitions import deal
from shardtune.data.records import open_records
from shardtune.data.stream import StreamConfig, StreamLoader, lockstep
from shardtune.preprocess import packed

from test_stream import doc_tokens, loaders, same


@pytest.fixture(scope="module")
def lm_tok(tiny_lm_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm_tokenizer)


def upload(path: Path, url: str) -> str:
    storage.put_file(str(path), url)
    return url


def lm_cfg(path, **kw) -> StreamConfig:
    base = {"sources": [{"path": str(path)}], "seq_len": 32, "partition_bytes": 2048, "emit_doc_ids": True}
    return StreamConfig.model_validate({**base, **kw})


def every_rank(cfg, tok, world, workers) -> list[list[dict]]:
    return [list(ld) for ld in loaders(cfg, tok, world, workers)]


def flat(per_rank):
    return [b for rank in per_rank for b in rank]


# ---------------------------------------------------------------- sources at a URL = the same files read locally


def test_lm_stream_from_the_store_gives_the_local_batches(lm_corpus, lm_tok, bucket):
    url = upload(lm_corpus, f"{bucket}/lm/reviews.jsonl")
    kw = {"partition_bytes": 2048, "shuffle_block": 8, "holdout": 20, "seed": 5}  # ~24 partitions on 4 slots
    local, remote = lm_cfg(lm_corpus, **kw), lm_cfg(url, **kw)
    local_ls, remote_ls = loaders(local, lm_tok, 4, 0), loaders(remote, lm_tok, 4, 0)
    assert len(remote_ls[0].plan.parts) == len(local_ls[0].plan.parts) > 16
    got, want = [list(ld) for ld in remote_ls], [list(ld) for ld in local_ls]
    assert all(same(g, w) for g, w in zip(got, want)) and len(flat(want)) > 20
    assert [ld.stats() for ld in remote_ls] == [ld.stats() for ld in local_ls]
    val = lambda cfg: flat(lockstep(loaders(cfg, lm_tok, 4, 0, split="validation", batch_size=1), uneven="pad"))  # noqa: E731
    assert same(val(remote), val(local))  # the hold-out, drawn from the store's bytes


def test_classification_records_from_the_store(bucket, tmp_path):
    csv = packaged_data("rotten-tomatoes")
    compressed = tmp_path / "rt.csv.bz2"
    compressed.write_bytes(bz2.compress(Path(csv).read_bytes()))
    _, local = open_records(str(csv))
    for url in (upload(Path(csv), f"{bucket}/rt/rotten-tomatoes.csv"), upload(compressed, f"{bucket}/rt/rt.csv.bz2")):
        name, remote = open_records(url)
        assert name == url and len(remote) == len(local) > 10000
        assert [fields for _, fields in remote] == [fields for _, fields in local]


# ---------------------------------------------------------------- the request log: each slot reads its own bytes


def tail_end(data: bytes, end: int) -> int:
    """Where a partition's reads end: past `end` the last record's tail is fetched in GETs of TAIL bytes, doubling."""
    if end >= len(data) or data[end - 1:end] == b"\n":
        return min(end, len(data))
    rec_end, pos, step = data.index(b"\n", end - 1) + 1, end, storage.TAIL
    while pos < rec_end:
        pos, step = pos + step, min(2 * step, storage.BLOCK)
    return min(pos, len(data))


def logged_reads(folder: Path) -> dict[str, list[tuple[str, int, int]]]:
    """TAG -> [(url, start, end)] of every ranged GET in the request logs of all processes."""
    out: dict[str, list] = collections.defaultdict(list)
    for path in folder.glob("reads-*.tsv"):
        for line in path.read_text().splitlines():
            tag, kind, url, *rest = line.split("\t")
            if kind == "list":
                continue
            assert kind == "read", line  # no retries against a healthy server
            out[tag].append((url, int(rest[0]), int(rest[1])))
    return out


def test_two_ranks_two_workers_read_disjoint_ranges_that_cover_every_object(lm_corpus, lm_tok, bucket, tmp_path, monkeypatch):
    lines = lm_corpus.read_bytes().splitlines(keepends=True)
    objects = {f"{bucket}/log/a.jsonl": b"".join(lines), f"{bucket}/log/b.jsonl": b"".join(reversed(lines[:300]))}
    for url, data in objects.items():
        storage.put_bytes(url, data)
    monkeypatch.setenv("SHARDTUNE_STORE_LOG", str(tmp_path))
    monkeypatch.setattr(storage, "READ_TAG", "")  # an earlier in-process stream leaves its slot's tag in this process
    cfg = lm_cfg(f"{bucket}/log/", partition_bytes=2048)
    ls = loaders(cfg, lm_tok, 2, 2)  # 4 slots, each a real DataLoader worker process
    docs = doc_tokens(flat([list(ld) for ld in ls]))
    assert len(docs) == len(lines) + 300
    parts = ls[0].plan.parts
    reads = logged_reads(tmp_path)
    # the main process read while building the plan (the first partition's records, to check the text field): no
    # slot tag there, and those reads are not a slot's
    assert set(reads) == {"", "slot-0", "slot-1", "slot-2", "slot-3"}
    mine = deal([(p.pid, p.source, p.size) for p in parts], 4)
    tails = {}  # the bytes next to a partition boundary that two readers may both fetch: the aligning byte before
    for url, data in objects.items():  # a range and the tail of the record that runs past it
        tails[url] = np.zeros(len(data), bool)
        for e in (p.end for p in parts if p.path == url and p.end < len(data)):
            tails[url][e - 1:tail_end(data, e)] = True
    counts, per_slot = {}, []
    for j in range(4):
        own = {url: np.zeros(len(data), bool) for url, data in objects.items()}  # its partitions, their last records' tails
        for p in (parts[pid] for pid in mine[j]):
            own[p.path][max(0, p.start - 1):tail_end(objects[p.path], p.end)] = True  # a range aligns from the byte before it
        counts[j] = {url: np.zeros(len(data), int) for url, data in objects.items()}
        for url, a, b in reads[f"slot-{j}"]:
            assert own[url][a:b].all(), (j, url, a, b)  # never another slot's bytes past the tail of its own last record
            counts[j][url][a:b] += 1
        per_slot.append(sum(b - a for _, a, b in reads[f"slot-{j}"]))
        for url in objects:  # a byte twice (two adjacent partitions of this slot) only at a boundary
            assert not ((counts[j][url] > 1) & ~tails[url]).any(), (j, url)
    for url, data in objects.items():
        read = [counts[j][url] > 0 for j in range(4)]
        assert np.logical_or.reduce(read).all()  # together, every byte of every object
        for j in range(4):
            for k in range(j + 1, 4):
                assert not (read[j] & read[k] & ~tails[url]).any(), (j, k, url)  # disjoint up to the tails
    total, slack = sum(map(len, objects.values())), int(sum(t.sum() for t in tails.values()))
    assert total <= sum(per_slot) <= total + slack  # the slots read the objects about once
    assert all(abs(b - total / 4) <= 2 * 2048 + slack for b in per_slot), per_slot  # about a quarter each


# ---------------------------------------------------------------- a packed cache uploaded to the store


def upload_folder(root: Path, url: str, last: str = "manifest.json", skip_last: bool = False) -> None:
    """Every file under root to url/<relative path>, `last` after all the others (or not at all)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for p in [p for p in files if p.name != last] + ([] if skip_last else [p for p in files if p.name == last]):
        storage.put_file(str(p), storage.join(url, p.relative_to(root).as_posix()))


def test_packed_cache_uploaded_to_the_store_gives_the_local_batches(lm_corpus, lm_tok, bucket, tmp_path, monkeypatch):
    cfg = lm_cfg(lm_corpus, partition_bytes=4096, shuffle_block=8, clean={"dedup": True})
    root = tmp_path / "cache"
    assert build(cfg, lm_tok, root).complete
    url = f"{bucket}/cache"
    upload_folder(root, url, skip_last=True)  # an upload cut short: no manifest yet
    n = len(json.loads((root / "build.json").read_text())["table"])
    with pytest.raises(ShardtuneError, match=rf"the cache s3://.*/cache is not complete \({n} partitions built\); finish it .*then upload DIR"):
        StreamLoader(packed(cfg, url, "train"), lm_tok)
    upload_folder(root, url)
    local, remote = packed(cfg, root, "train"), packed(cfg, url, "train")
    fetched = []  # (the slot tag, the object) of each whole-object GET
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda u: fetched.append((storage.READ_TAG, u.removeprefix(url + "/"))) or real(u))
    monkeypatch.setattr(storage, "READ_TAG", "")  # an earlier in-process stream leaves its slot's tag in this process
    ls = loaders(remote, lm_tok, 2, 0)  # in one process, the ranks taking turns: each read is tagged with its slot
    got = flat(lockstep(ls, uneven="pad"))
    by_slot = collections.defaultdict(list)
    for tag, name in fetched:
        by_slot[tag].append(name)
    assert by_slot[""] == ["manifest.json"] * 2  # each rank's plan, in the main process
    mine = deal([(p.pid, p.source, p.size) for p in ls[0].plan.parts], 2)
    for j in (0, 1):  # each slot GETs only its own partitions' files, each once, whole
        parts = sorted(f"parts/{pid:06d}.{ext}" for pid in mine[j] for ext in ("json", "tok.npy", "idx.npy", "pcs.npy"))
        assert sorted(by_slot[f"slot-{j}"]) == parts
    want = flat(lockstep(loaders(local, lm_tok, 2, 0), uneven="pad"))
    assert same(got, want) and len(want) > 20
    assert same(flat(every_rank(remote, lm_tok, 1, 0)), flat(every_rank(cfg, lm_tok, 1, 0)))  # = the raw source
    # DataLoader worker processes fetch their own partitions: the same documents as 2 slots in the main process
    (workers,) = every_rank(remote, lm_tok, 1, 2)
    assert doc_tokens(workers) == doc_tokens(want)


def test_cache_of_store_sources_records_sizes_and_is_refused_when_one_changes(lm_corpus, lm_tok, bucket, tmp_path):
    src = upload(lm_corpus, f"{bucket}/src/reviews.jsonl")
    cfg = lm_cfg(src, partition_bytes=8192)
    with pytest.raises(ShardtuneError, match="is a URL; a cache is built in a local folder"):
        build(cfg, lm_tok, Path(f"{bucket}/direct"))  # what `--write s3://...` (a Path) passes
    build(cfg, lm_tok, tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["shaped_by"]["files"] == [[src, lm_corpus.stat().st_size, None]]  # a store keeps no usable mtime
    assert same(flat(every_rank(packed(cfg, tmp_path / "c", "train"), lm_tok, 1, 0)), flat(every_rank(cfg, lm_tok, 1, 0)))
    storage.put_bytes(src, lm_corpus.read_bytes() + b'{"text": "one more review"}\n')
    with pytest.raises(ShardtuneError, match=r"the cache .* is stale: its source file s3://.*/src/reviews.jsonl changed since it was built"):
        StreamLoader(packed(cfg, tmp_path / "c", "train"), lm_tok)
    with pytest.raises(ShardtuneError, match=r"s3://.*/nothing holds no cache \(manifest.json\); write one with `shardtune preprocess CONFIG --write DIR` in a local folder"):
        StreamLoader(packed(cfg, f"{bucket}/nothing", "train"), lm_tok)


# ---------------------------------------------------------------- compressed corpora in the store


def test_compressed_corpora_in_the_store(lm_corpus, lm_tok, bucket):
    import zstandard

    raw = lm_corpus.read_bytes()
    pack = {"gz": gzip.compress, "zst": lambda b: zstandard.ZstdCompressor().compress(b)}
    one_slot = lambda path: flat(every_rank(lm_cfg(path, partition_bytes=1 << 20), lm_tok, 1, 0))  # noqa: E731
    want = one_slot(lm_corpus)  # one partition, in file order
    for ext, compress in pack.items():
        url = f"{bucket}/one/reviews.jsonl.{ext}"
        storage.put_bytes(url, compress(raw))
        assert same(one_slot(url), want), ext

    lines = raw.splitlines(keepends=True)
    for k in range(6):  # a compressed file is one partition: several files to spread over the slots
        storage.put_bytes(f"{bucket}/many/{k}.jsonl.{'gz' if k % 2 else 'zst'}", pack["gz" if k % 2 else "zst"](b"".join(lines[k::6])))
    cfg = lm_cfg(f"{bucket}/many/")
    ls = loaders(cfg, lm_tok, 3, 0)  # 3 slots
    assert len(ls[0].plan.parts) == 6
    docs = doc_tokens(flat([list(ld) for ld in ls]))
    expect = doc_tokens(want)
    assert len(docs) == len(expect) == len(lines)  # every document once
    assert sorted(docs.values()) == sorted(expect.values())
