"""storage.py against a real S3 server (SeaweedFS on loopback, tests/s3_server.py): listings, ranged reads,
compressed objects, a server that restarts mid-read, and the one-sentence errors. Nothing is mocked."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import threading
import time

import pytest

from shardtune import ShardtuneError, storage


def _lines(n: int, seed: int = 0) -> bytes:
    """n JSONL records of varying length (a record straddles any cut)."""
    return b"".join(json.dumps({"id": i, "text": "word " * ((i * 7919 + seed) % 97)}).encode() + b"\n" for i in range(n))


def _reads(folder) -> list[tuple[str, int, int]]:
    """The ranged GETs this process logged (SHARDTUNE_STORE_LOG: lines `tag read url start end`)."""
    path = folder / f"reads-{os.getpid()}.tsv"
    lines = [line.split("\t") for line in path.read_text().splitlines()] if path.exists() else []
    return [(u, int(s), int(e)) for _, kind, u, s, e in (f for f in lines if f[1] == "read")]


def _budget(monkeypatch, seconds: float) -> None:
    """A short retry budget for `call`, whichever way it is given."""
    monkeypatch.setattr(storage, "RETRY_SECONDS", seconds)
    monkeypatch.setenv("SHARDTUNE_STORE_RETRY_SECONDS", str(seconds))


def _one_sentence(exc: pytest.ExceptionInfo, *words: str) -> str:
    text = str(exc.value)
    assert "\n" not in text and text.endswith("."), text
    for w in words:
        assert w in text, (w, text)
    return text


@pytest.fixture
def store_log(tmp_path, monkeypatch):
    folder = tmp_path / "store-log"
    folder.mkdir()
    monkeypatch.setenv("SHARDTUNE_STORE_LOG", str(folder))
    return folder


def test_listing_of_prefix_glob_and_object_then_seeded_asks_nothing(bucket, monkeypatch):
    objects = {"data/a.jsonl": _lines(300), "data/sub/b.jsonl": _lines(20, 1), "data/sub/c.txt": b"c\n", "other/d.jsonl": b"{}\n"}
    for key, body in objects.items():
        storage.put_bytes(f"{bucket}/{key}", body)
    want = lambda *keys: [(f"{bucket}/{k}", len(objects[k])) for k in keys]  # noqa: E731
    patterns = {f"{bucket}/data": want("data/a.jsonl", "data/sub/b.jsonl", "data/sub/c.txt"),
                f"{bucket}/data/": want("data/a.jsonl", "data/sub/b.jsonl", "data/sub/c.txt"),
                f"{bucket}/**/*.jsonl": want("data/a.jsonl", "data/sub/b.jsonl", "other/d.jsonl"),
                f"{bucket}/data/sub/b.jsonl": want("data/sub/b.jsonl")}
    listed = {pattern: storage.listing(pattern) for pattern in patterns}
    assert listed == patterns
    asked = storage.STATS["requests"]
    assert storage.listing(f"{bucket}/data") == patterns[f"{bucket}/data"]  # one listing per pattern and process
    assert storage.STATS["requests"] == asked

    # another rank: nothing listed yet, takes the main rank's listings; the store is not even reachable
    storage._LISTINGS.clear()
    storage._SIZES.clear()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: refused
    _budget(monkeypatch, 0.5)
    storage.filesystem(bucket).clear_instance_cache()
    storage.seed_listings(json.loads(json.dumps(listed)))  # as it travels between ranks
    for pattern, files in patterns.items():
        assert storage.listing(pattern) == files
    assert storage.size(f"{bucket}/data/sub/b.jsonl") == len(objects["data/sub/b.jsonl"])
    assert storage.STATS["requests"] == asked


def test_open_input_equals_local_bytes_with_readline_and_seek(bucket, tmp_path, store_log):
    body = _lines(10000)  # 2.6 MB > 2 BLOCKs: several GETs
    local = tmp_path / "a.jsonl"
    local.write_bytes(body)
    storage.put_file(str(local), f"{bucket}/a.jsonl")
    url = f"{bucket}/a.jsonl"
    assert storage.size(url) == len(body) > storage.BLOCK
    with storage.open_input(url) as f:
        assert f.read() == body
    assert [e - s for _, s, e in _reads(store_log)] == [storage.BLOCK, storage.BLOCK, len(body) - 2 * storage.BLOCK]
    with storage.open_input(url) as f:
        f.seek(100)
        assert f.read(len(body)) == body[100:]  # one read() bigger than a BLOCK: still BLOCK-sized GETs
    with storage.open_input(url) as f, open(local, "rb") as g:
        for _ in range(5):
            assert f.readline() == g.readline()
        for pos in (len(body) // 2, 17, len(body) - 40, storage.BLOCK - 3):
            f.seek(pos)
            g.seek(pos)
            assert f.readline() == g.readline() and f.tell() == g.tell()
            assert f.read(5000) == g.read(5000)
        assert f.seek(0, io.SEEK_END) == len(body) and f.read() == b""
    assert all(e - s <= storage.BLOCK for _, s, e in _reads(store_log))
    assert storage.read_bytes(url) == body


def test_range_reader_fetches_nothing_past_end_hint_but_tails(bucket, store_log):
    body = _lines(10000)
    url = f"{bucket}/a.jsonl"
    storage.put_bytes(url, body)
    start, end = 40_000, len(body) // 2 + 11  # a partition; `end` falls inside a record
    with storage.open_input(url, end_hint=end) as f:  # a partition reader: from the first record after start...
        f.seek(start)
        f.readline()
        got = []
        while f.tell() <= end:  # ...to the record that runs past end
            got.append(f.readline())
    first = body.index(b"\n", start) + 1
    last = body.index(b"\n", end) + 1
    assert b"".join(got) == body[first:last]
    reads = _reads(store_log)
    assert reads and all(u == url for u, _, _ in reads)
    inside = [(s, e) for _, s, e in reads if s < end]
    past = [(s, e) for _, s, e in reads if s >= end]
    assert len(inside) >= 2 and all(e <= end and e - s <= storage.BLOCK for s, e in inside), inside
    assert sum(e - s for s, e in inside) == end - start  # each byte once, none before the partition
    # past the end: small GETs (TAIL, doubling), back to back, none after the straddling record's end was seen
    assert past and past[0][0] == end and all(a[1] == b[0] for a, b in zip(past, past[1:])), past
    assert all(e - s <= storage.TAIL << i for i, (s, e) in enumerate(past)), past
    assert all(s < last for s, _ in past) and sum(e - s for s, e in past) < 2 * (last - end) + storage.TAIL, past


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_objects_decompress(bucket, suffix):
    import zstandard

    body = _lines(4000, 3)
    packed = gzip.compress(body) if suffix == ".gz" else zstandard.ZstdCompressor().compress(body)
    url = f"{bucket}/d.jsonl{suffix}"
    storage.put_bytes(url, packed)
    with storage.open_input(url) as f:
        assert f.read() == body
    with storage.open_input(url) as f:
        lines = body.splitlines(keepends=True)
        assert [f.readline() for _ in range(3)] == lines[:3]
        f.seek(len(lines[0]))  # backward: decompresses again from the start
        assert f.readline() == lines[1]


def test_read_survives_a_server_restart(s3_private, monkeypatch):
    _budget(monkeypatch, 60.0)
    bucket = "s3://" + s3_private.make_bucket("restart")
    body = _lines(10000)  # 2.6 MB: GETs left after the stop
    storage.put_bytes(f"{bucket}/a.jsonl", body)
    retries = storage.STATS["retries"]
    failed = []

    def back_in_3_seconds():
        try:
            time.sleep(3)
            s3_private.start()
        except BaseException as exc:  # noqa: BLE001 (re-raised in the test's thread)
            failed.append(exc)

    with storage.open_input(f"{bucket}/a.jsonl") as f:
        head = f.read(storage.BLOCK // 2)
        s3_private.stop()
        thread = threading.Thread(target=back_in_3_seconds)
        began = time.monotonic()
        thread.start()
        try:
            rest = f.read()
        finally:
            thread.join()
    assert not failed, failed
    assert head + rest == body
    assert storage.STATS["retries"] > retries
    assert time.monotonic() - began >= 3


def test_store_down_longer_than_the_budget_is_one_sentence(s3_private, monkeypatch):
    bucket = "s3://" + s3_private.make_bucket("down")
    url = f"{bucket}/a.jsonl"
    storage.put_bytes(url, _lines(100))
    _budget(monkeypatch, 1.0)
    s3_private.stop()
    began = time.monotonic()
    with pytest.raises(ShardtuneError) as exc:
        storage.open_input(url).read()
    assert 0.7 <= time.monotonic() - began < 12
    _one_sentence(exc, url, "did not serve", "for 1 s")
    with pytest.raises(ShardtuneError) as exc:
        storage.listing(f"{bucket}/data/")
    _one_sentence(exc, f"{bucket}/data/")


def test_wrong_credentials_are_refused_in_one_sentence(bucket, monkeypatch):
    storage.put_bytes(f"{bucket}/a.jsonl", b"{}\n")
    for name, value in (("AWS_SECRET_ACCESS_KEY", "not-the-secret"), ("AWS_ACCESS_KEY_ID", "nobody")):
        monkeypatch.setenv(name, value)
        storage.filesystem(bucket).clear_instance_cache()
        storage._LISTINGS.clear()
        storage._SIZES.clear()
        with pytest.raises(ShardtuneError) as exc:
            storage.listing(f"{bucket}/")
        _one_sentence(exc, f"{bucket}/", "denied", "AWS_ACCESS_KEY_ID")
        with pytest.raises(ShardtuneError) as exc:
            storage.open_input(f"{bucket}/a.jsonl").read()
        _one_sentence(exc, f"{bucket}/a.jsonl", "AWS_ACCESS_KEY_ID")


def test_missing_bucket_and_object_do_not_exist(bucket, s3):
    for url in ("s3://no-such-bucket-shardtune/data/a.jsonl", f"{bucket}/no-such-object.jsonl"):
        with pytest.raises(ShardtuneError) as exc:
            storage.open_input(url)
        _one_sentence(exc, url, "does not exist")
    with pytest.raises(ShardtuneError) as exc:
        storage.listing("s3://no-such-bucket-shardtune/data/")
    _one_sentence(exc, "s3://no-such-bucket-shardtune/data/", "does not exist", "bucket")
    assert storage.listing(f"{bucket}/empty-prefix/") == []  # a prefix with nothing: the caller's sentence


def test_gs_without_gcsfs_names_the_package():
    assert importlib.util.find_spec("gcsfs") is None  # the suite's venv has no gcsfs
    for call in (lambda: storage.listing("gs://b/x"), lambda: storage.open_input("gs://b/x.jsonl")):
        with pytest.raises(ShardtuneError) as exc:
            call()
        _one_sentence(exc, "gs://b/x", "gcsfs", "pip install gcsfs")


def test_password_in_a_url_never_shows(s3, bucket, monkeypatch):
    _budget(monkeypatch, 0.5)
    port = s3.ports["s3"]
    urls = [
        f"s3://reader:hunter2pw@{bucket[5:]}/a.jsonl",  # not a bucket name: fails validation, which quotes it
        f"http://reader:hunter2pw@127.0.0.1:{port}/{bucket[5:]}/a.jsonl",  # the gateway refuses unsigned reads
        "http://reader:hunter2pw@127.0.0.1:9/data/a.jsonl",  # nothing listens
    ]
    for url in urls:
        for call in (lambda: storage.listing(url), lambda: storage.open_input(url).read()):
            storage._LISTINGS.clear()
            with pytest.raises(ShardtuneError) as exc:
                call()
            text = _one_sentence(exc, storage.display(url))
            assert "hunter2pw" not in text and "reader:" not in text, text


def test_http_answers_4xx_at_once_and_retries_a_server_down(s3, bucket, monkeypatch):
    """https sources go through fsspec's HTTP backend, whose `info` wraps every failure in FileNotFoundError: a 403
    is one sentence at once (not retried for the whole budget), a refused connection is retried, not "missing"."""
    _budget(monkeypatch, 1.0)
    refused = f"http://127.0.0.1:{s3.ports['s3']}/{bucket[5:]}/a.jsonl"  # unsigned: the gateway answers 403
    storage.put_bytes(f"{bucket}/a.jsonl", b"{}\n")
    for call in (lambda: storage.listing(refused), lambda: storage.open_input(refused)):
        retries, began = storage.STATS["retries"], time.monotonic()
        with pytest.raises(ShardtuneError) as exc:
            call()
        _one_sentence(exc, refused, "HTTP 403")
        assert storage.STATS["retries"] == retries and time.monotonic() - began < 1
    down = "http://127.0.0.1:9/data/a.jsonl"
    for call in (lambda: storage.listing(down), lambda: storage.open_input(down)):
        retries = storage.STATS["retries"]
        with pytest.raises(ShardtuneError) as exc:
            call()
        _one_sentence(exc, down, "did not serve")
        assert storage.STATS["retries"] > retries


def test_the_test_servers_ports_do_not_follow_the_seeded_random_module():
    """An in-process run seeds `random` (accelerate's set_seed): two pytest workers, or two servers made one after
    the other, could draw the same "random" ports from it (the CI run of 2026-12-07: a server's filer died on
    "address already in use")."""
    import random

    from s3_server import free_ports

    random.seed(0)
    first = free_ports(8)
    random.seed(0)
    assert free_ports(8) != first
