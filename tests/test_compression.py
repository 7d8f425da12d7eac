"""Compressed local shards (.gz, .zst, .bz2, .xz): the same batches as the uncompressed file on one slot in file
order, every document once on several slots, an exact resume inside a compressed file, and a truncated file in one
sentence naming it. The same files in an object store: tests/test_store_data.py."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import pytest
import zstandard

from conftest import one_sentence
from shardtune import ShardtuneError
from shardtune.config import SourceSpec
from shardtune.data.partitions import partition_table, resolve_files
from test_stream import doc_tokens, flat, loaders, saved, same, take, text, tok  # noqa: F401  (tok: fixture)
from shardtune.data.stream import StreamConfig

COMPRESS = {"gz": gzip.compress, "zst": lambda b: zstandard.ZstdCompressor().compress(b), "bz2": bz2.compress, "xz": lzma.compress}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    body = "".join(json.dumps({"text": text("c", i)}) + "\n" for i in range(400)).encode()
    (root / "d.jsonl").write_bytes(body)
    for ext, fn in COMPRESS.items():
        (root / f"d.jsonl.{ext}").write_bytes(fn(body))
    return root


def _cfg(path, **kw) -> StreamConfig:
    return StreamConfig(sources=[{"path": str(path)}], partition_bytes=2048, seq_len=64, emit_doc_ids=True, **kw)


@pytest.mark.parametrize("ext", list(COMPRESS))
def test_a_compressed_file_gives_the_uncompressed_files_batches(corpus, tok, ext):
    plain = flat(take(loaders(_cfg(corpus / "d.jsonl"), tok, 1, 0), [None]))
    packed = flat(take(loaders(_cfg(corpus / f"d.jsonl.{ext}"), tok, 1, 0), [None]))
    strip = lambda batches: [{k: v for k, v in b.items() if k != "doc_ids"} for b in batches]  # noqa: E731  (ids name partitions)
    assert len(plain) > 20 and same(strip(plain), strip(packed))
    spec = SourceSpec(path=str(corpus / f"d.jsonl.{ext}"))
    parts, _ = partition_table([spec], [resolve_files(spec)], 2048)
    assert len(parts) == 1  # compressed bytes cannot be split: one partition, whatever partition_bytes says


def test_every_document_once_on_several_slots_and_an_exact_resume_inside_a_compressed_file(corpus, tok):
    cfg = StreamConfig(sources=[{"path": str(corpus / f"d.jsonl.{e}")} for e in COMPRESS], partition_bytes=2048, seq_len=64, emit_doc_ids=True)
    docs = doc_tokens(flat(take(loaders(cfg, tok, 2, 2), [None, None])))
    assert len(docs) == 4 * 400
    full = take(loaders(cfg, tok, 1, 0), [None])[0]
    first = loaders(cfg, tok, 1, 0)
    head = take(first, [len(full) // 2])[0]
    rest = take(loaders(cfg, tok, 1, 0, state=saved(first)), [None])[0]
    assert same(head + rest, full)


def test_a_folder_takes_compressed_files_by_their_inner_extension(corpus):
    found = resolve_files(SourceSpec(path=str(corpus)))
    assert sorted(f.rsplit("/", 1)[1] for f, _ in found) == ["d.jsonl", *sorted(f"d.jsonl.{e}" for e in COMPRESS)]
    assert {fmt for _, fmt in found} == {"jsonl"}


@pytest.mark.parametrize("ext", ["gz", "zst"])
def test_a_truncated_compressed_file_is_one_sentence_naming_it(corpus, tok, tmp_path, ext, run_cli, tiny_lm_tokenizer):
    data = (corpus / f"d.jsonl.{ext}").read_bytes()
    bad = tmp_path / f"cut.jsonl.{ext}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardtuneError, match=f"{bad}.* truncated or corrupt") as err:
        take(loaders(_cfg(bad), tok, 1, 0), [None])
    assert "\n" not in str(err.value)
    (tmp_path / "lm.yaml").write_text("task: causal_lm\n")
    from conftest import lm_overrides

    code, _, err = run_cli("train", tmp_path / "lm.yaml", *lm_overrides(tiny_lm_tokenizer, bad, tmp_path / "run", **{"data.holdout": 0, "train.eval_every": None}))
    assert one_sentence(code, err, str(bad), "truncated or corrupt")
