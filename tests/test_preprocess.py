"""`shardtune preprocess`: decoded rows with document marks, stats, clear errors (the cache: test_cache.py).

The tokenizer is the packaged MiniLM one (loads instantly); the stage is
tokenizer-agnostic. One test runs on the real corpus, the Python docs of the
Debian package python3.11-doc, which `make setup` installs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml


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


def test_classification_config_is_one_clear_error(run_cli):
    code, _, err = run_cli("preprocess", ROOT / "configs" / "quickstart.yaml", "--show", "2")
    _one_sentence(code, err, "task: classification", "task: causal_lm")


def test_sources_glob_matching_nothing_is_one_clear_error(run_cli, tmp_path):
    cfg = write_config(tmp_path, [{"path": str(tmp_path / "nowhere" / "*.jsonl")}])
    code, _, err = run_cli("preprocess", cfg, "--show", "2")
    _one_sentence(code, err, "nowhere/*.jsonl", "matches no files")


def test_max_rows_with_write_is_one_clear_error(run_cli, tmp_path, corpus):
    code, _, err = run_cli("preprocess", write_config(tmp_path, corpus), "--write", tmp_path / "c", "--max-rows", "3")
    _one_sentence(code, err, "--max-rows", "whole partitions")


def test_python_docs_corpus(run_cli, tmp_path):
    assert PYDOCS.is_dir(), f"{PYDOCS} is missing: install the Debian package python3.11-doc (`make setup` does, as root)"
    cfg = write_config(tmp_path, [{"path": str(PYDOCS / "tutorial" / "*.rst.txt"), "txt_unit": "file"}], seq_len=256)
    code, out, err = run_cli("preprocess", cfg, "--show", "1", "--write", tmp_path / "cache", "--processes", "2")
    assert code == 0, err
    assert "[doc 0, continues in the next row]" in out and "appendix" in out  # tutorial/appendix.rst.txt comes first
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["totals"]["data/documents"] == len(list((PYDOCS / "tutorial").glob("*.rst.txt")))
    assert "packing efficiency: 99." in out or "packing efficiency: 100" in out
