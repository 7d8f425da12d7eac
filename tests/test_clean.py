"""Pure cleaning functions: no files, no model."""

from __future__ import annotations

import pytest

from shardtune.data.clean import CleanConfig, add_counts, clean_document, nfc, remove_surrogates, split_text, strip_control, text_hash


def test_nfc_composes_and_keeps_ascii():
    assert nfc("cafe\u0301") == "caf\u00e9"
    assert nfc("plain ascii") == "plain ascii"


def test_strip_control_keeps_tabs_and_newlines():
    assert strip_control("a\x00b\x07c\x1b[0m\x7f\x85d\te\nf\r\n") == "abc[0md\te\nf\r\n"


def test_surrogates_are_removed():
    assert remove_surrogates("a\ud800b\udfffc") == "abc"


def test_split_text_prefers_whitespace_and_loses_nothing():
    text = "alpha beta gamma delta epsilon " * 20
    pieces = split_text(text, 50)
    assert "".join(pieces) == text
    assert all(len(p) <= 50 for p in pieces)
    assert all(p.endswith(" ") for p in pieces[:-1])
    assert split_text("x" * 120, 50) == ["x" * 50, "x" * 50, "x" * 20]  # no whitespace: hard cuts


def test_clean_document_counts_each_reason():
    cfg = CleanConfig()
    assert clean_document("fine text", cfg) == (["fine text"], {})
    assert clean_document("  \n\t ", cfg) == (None, {"data/dropped/empty": 1})
    assert clean_document("\x00\x01", cfg) == (None, {"data/repaired/control_chars": 1, "data/dropped/empty": 1})
    pieces, counts = clean_document("cafe\u0301\x00 ok", cfg)
    assert pieces == ["caf\u00e9 ok"] and counts == {"data/repaired/nfc": 1, "data/repaired/control_chars": 1}
    assert clean_document("bad \ud800 surrogate", cfg)[1] == {"data/repaired/surrogates": 1}


def test_options_can_be_turned_off():
    cfg = CleanConfig(nfc=False, strip_control=False)
    assert clean_document("cafe\u0301\x00", cfg) == (["cafe\u0301\x00"], {})


def test_length_limits():
    assert clean_document("abc", CleanConfig(min_chars=5)) == (None, {"data/dropped/too_short": 1})
    long = "word " * 30
    assert clean_document(long, CleanConfig(max_chars=40, too_long="drop")) == (None, {"data/dropped/too_long": 1})
    assert clean_document(long, CleanConfig(max_chars=40, too_long="truncate")) == ([long[:40]], {"data/repaired/truncated": 1})
    pieces, counts = clean_document(long, CleanConfig(max_chars=40))
    assert "".join(pieces) == long and counts == {"data/repaired/split": 1}


def test_exact_dedup_after_normalization():
    cfg, seen = CleanConfig(dedup=True), set()
    assert clean_document("same text", cfg, seen)[0] == ["same text"]
    assert clean_document("same\x00 text", cfg, seen) == (None, {"data/repaired/control_chars": 1, "data/dropped/duplicate": 1})
    assert clean_document("other text", cfg, seen)[0] == ["other text"]
    assert len(seen) == 2 and text_hash("same text") in seen


def test_add_counts_and_config_rejects_unknown_keys():
    assert add_counts({"a": 1}, {"a": 2, "b": 1}) == {"a": 3, "b": 1}
    with pytest.raises(Exception, match="extra"):
        CleanConfig.model_validate({"dedupe": True})
