"""`shardtune preprocess`: decoded rows with document marks, stats, the packed-shard cache, clear errors.

The tokenizer is the packaged MiniLM one (loads instantly); the stage is
tokenizer-agnostic. One test runs on the real corpus, the Python docs of the
Debian package python3.11-doc, which `make setup` installs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from shardtune import ShardtuneError
from shardtune.config import load_config
from shardtune.data.stream import StreamLoader
from shardtune.preprocess import load_cached, load_tokenizer, preprocess

from conftest import ROOT, one_sentence as _one_sentence

PYDOCS = Path("/usr/share/doc/python3.11/html/_sources")
WORDS = "river stone cloud maple ember frost harbor lantern meadow quill".split()


def doc(i: int) -> str:
    return f"doc{i} " + " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(3 + (i * 7) % 23))


def write_config(tmp_path: Path, sources: list[dict], **data) -> Path:
    raw = {"task": "causal_lm", "model": {"name_or_path": "minilm-l6"},
           "data": {"sources": sources, "seq_len": 32, "clean": {"dedup": True}, "partition_bytes": 1 << 16, **data}}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def corpus(tmp_path) -> list[dict]:
    texts = [doc(i) for i in range(40)] + ["", doc(3), "   "]  # an empty, a duplicate, a blank document
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return [{"path": str(tmp_path / "*.jsonl")}]


def test_show_prints_decoded_rows_with_document_marks_and_stats(run_cli, tmp_path, corpus):
    code, out, err = run_cli("preprocess", write_config(tmp_path, corpus), "--show", "3")
    assert code == 0, err
    rows = out.split("--- row ")[1:]
    assert len(rows) == 3 and rows[0].startswith("1: 32 tokens")
    assert "[doc 0] doc0 " + " ".join(WORDS[:3]) in rows[0]  # decoded text, the document's own words
    assert "[SEP]" in rows[0]  # the separator after each document (MiniLM has no EOS)
    assert "continues in the next row]" in out and "continued" in out  # a document split across rows
    stats = out[out.index("stream: "):]
    for key in ("docs/s:", "tokens/s:", "packing efficiency:", "dropped:", "repaired:", "skipped:"):
        assert key in stats
    assert "40 documents" in stats  # every row of this small corpus was streamed for the stats
    assert "empty 2" in stats and "duplicate 1" in stats


def round_trip(tmp_path, corpus, **data):
    cfg = load_config(write_config(tmp_path, corpus, **data))
    tok = load_tokenizer(cfg)
    out = tmp_path / "cache"
    result = preprocess(cfg, show=0, write=out, shard_rows=5, echo=lambda s: None)
    streamed = list(StreamLoader(cfg.data, tok, batch_size=3))
    return cfg, tok, out, result, streamed


@pytest.mark.parametrize("data", [{}, {"doc_positions": True, "emit_doc_ids": True, "split_documents": False}], ids=["plain", "doc_positions"])
def test_written_cache_reads_back_as_the_streamed_rows(tmp_path, corpus, data):
    cfg, tok, out, result, streamed = round_trip(tmp_path, corpus, **data)
    cache = load_cached(out, cfg.data, tok)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(cache) == result.rows == sum(len(b["input_ids"]) for b in streamed) > 10
    assert len(manifest["shards"]) == -(-result.rows // 5)  # several shards, read across their borders
    from_cache = list(cache.batches(3))
    assert len(from_cache) == len(streamed)
    for got, want in zip(from_cache, streamed):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    # a map-style dataset too: a DataLoader over it gives the same batches
    dl = torch.utils.data.DataLoader(cache, batch_size=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(dl, streamed))


def test_cache_of_some_rows_continues_into_the_stream(tmp_path, corpus):
    cfg = load_config(write_config(tmp_path, corpus))
    tok = load_tokenizer(cfg)
    preprocess(cfg, show=0, write=tmp_path / "c", max_rows=7, echo=lambda s: None)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    rest = StreamLoader(cfg.data, tok, batch_size=1, state=manifest["stream_state"])
    rows = [b["input_ids"] for b in load_cached(tmp_path / "c").batches(1)] + [b["input_ids"] for b in rest]
    assert len(rows) > 7
    assert torch.equal(torch.cat(rows), torch.cat([b["input_ids"] for b in StreamLoader(cfg.data, tok, batch_size=1)]))


def test_cache_written_with_other_settings_is_refused(tmp_path, corpus):
    cfg, tok, out, _, _ = round_trip(tmp_path, corpus)
    for change in ({"seq_len": 64}, {"seed": 1}):
        with pytest.raises(ShardtuneError, match="other data settings"):
            load_cached(out, cfg.data.model_copy(update=change), tok)
    with pytest.raises(ShardtuneError, match="no readable manifest.json"):
        load_cached(tmp_path)


def test_classification_config_is_one_clear_error(run_cli):
    code, _, err = run_cli("preprocess", ROOT / "configs" / "quickstart.yaml", "--show", "2")
    _one_sentence(code, err, "task: classification", "task: causal_lm")


def test_sources_glob_matching_nothing_is_one_clear_error(run_cli, tmp_path):
    cfg = write_config(tmp_path, [{"path": str(tmp_path / "nowhere" / "*.jsonl")}])
    code, _, err = run_cli("preprocess", cfg, "--show", "2")
    _one_sentence(code, err, "nowhere/*.jsonl", "matches no files")


def test_write_into_a_non_empty_folder_is_one_clear_error(run_cli, tmp_path, corpus):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep me")
    code, _, err = run_cli("preprocess", write_config(tmp_path, corpus), "--write", tmp_path / "used")
    _one_sentence(code, err, "already exists", "used")
    assert (tmp_path / "used" / "x").read_text() == "keep me"


def test_python_docs_corpus(run_cli, tmp_path):
    assert PYDOCS.is_dir(), f"{PYDOCS} is missing: install the Debian package python3.11-doc (`make setup` does, as root)"
    cfg = write_config(tmp_path, [{"path": str(PYDOCS / "tutorial" / "*.rst.txt"), "txt_unit": "file"}], seq_len=256)
    code, out, err = run_cli("preprocess", cfg, "--show", "1", "--write", tmp_path / "cache")
    assert code == 0, err
    assert "[doc 0, continues in the next row]" in out and "appendix" in out  # tutorial/appendix.rst.txt comes first
    cache = load_cached(tmp_path / "cache")
    assert cache.manifest["stats"]["data/documents"] == len(list((PYDOCS / "tutorial").glob("*.rst.txt")))
    assert cache.manifest["stats"]["data/packing_efficiency"] > 0.99
