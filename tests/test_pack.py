"""Tokenize + pack, with a word-level stand-in tokenizer: rows, EOS, positions, labels, padding, resume offsets."""

from __future__ import annotations

import torch

from shardtune.data.docstream import Doc
from shardtune.data.pack import IGNORE, PackOptions, make_batches, pack_rows, pad_batch, tokenize_documents

EOS, PAD = 1, 0


class WordTok:
    """Token id = 100 * doc number + word number, parsed from words like 'w3_7'; counts calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, texts, **kw):
        self.calls += 1
        return {"input_ids": [[100 * int(w[1:].split("_")[0]) + int(w.split("_")[1]) + 2 for w in t.split()] for t in texts]}


def words(g: int, n: int, first: int = 0) -> str:
    return " ".join(f"w{g}_{k}" for k in range(first, first + n))


def docs(lengths, pieces=None, offsets=None):
    """Documents g = 0.. with the given word counts (None: dropped), then the end marker."""
    for g, n in enumerate(lengths):
        text = None if n is None else ([words(g, n)] if not pieces or g not in pieces else [words(g, k, sum(pieces[g][:i])) for i, k in enumerate(pieces[g])])
        yield Doc(g, text, {} if text else {"data/dropped/empty": 1}, (offsets or {}).get(g, 0), source=0)
    yield Doc(-1, None, {}, end=True)


def pack(doc_iter, seq_len=4, **kw):
    """-> (rows, (document key, tokens of it out or None when done) after each row, counts)."""
    opt = PackOptions(seq_len, EOS, PAD, **kw)
    counts: dict = {}
    out = list(pack_rows(tokenize_documents(doc_iter, WordTok(), EOS, 2), opt, counts))
    return [r for r, _ in out if r is not None], [(p[0].key, p[1]) for _, p in out], counts


def stream(lengths):
    toks = []
    for g, n in enumerate(lengths):
        toks += [100 * g + k + 2 for k in range(n)] + [EOS] if n else []
    return toks


def test_concat_packing_fills_rows_and_pads_only_the_end():
    rows, states, counts = pack(docs([3, 5, 2]))
    flat = stream([3, 5, 2])  # 13 tokens
    assert [r[0] for r in rows] == [flat[0:4], flat[4:8], flat[8:12], flat[12:] + [PAD] * 3]
    assert rows[1][2] == [1, 1, 1, 1] and rows[3][2] == [2, -1, -1, -1]  # doc ids
    assert rows[3][1] == [EOS, IGNORE, IGNORE, IGNORE]  # labels: -100 on padding only
    assert states[0] == (0, None)  # the row ended exactly at doc 0's end: doc 0 is done
    assert states[1] == (1, 4) and states[2] == (2, 2) and states[-1] == (-1, None)
    assert counts == {"data/documents": 3, "data/source0/documents": 3, "data/sequences": 4, "data/tokens": 13, "data/padding": 3}


def test_resume_mid_document_gives_the_same_rows():
    rows, states, _ = pack(docs([3, 5, 2]))
    g, off = states[1]
    resumed, _, counts = pack(docs([None, 5, 2], offsets={g: off}))
    assert resumed == rows[2:]
    # a resumed partial document was counted when it started: only doc 2 (and doc 0's drop marker) count now
    assert counts["data/documents"] == 1


def test_document_positions_restart_and_first_tokens_are_not_predicted():
    rows, _, _ = pack(docs([2, 4]), seq_len=5, doc_positions=True)
    ids, labels, _, pos = rows[0]
    assert ids == stream([2, 4])[:5] and pos == [0, 1, 2, 0, 1]
    assert labels[0] == IGNORE and labels[3] == IGNORE and labels[1] == ids[1]
    assert rows[1][3][:3] == [0, 1, 2] and rows[1][3][3:] == [0, 0]  # continuation restarts at the row start
    from transformers.masking_utils import find_packed_sequence_indices

    seg = find_packed_sequence_indices(torch.tensor([pos]))
    assert seg.tolist() == [[0, 0, 0, 1, 1]]  # transformers sees two documents


def test_no_split_starts_documents_on_a_new_row():
    rows, states, counts = pack(docs([2, 2, 6]), seq_len=4, split_documents=False)
    assert rows[0][0] == stream([2])[:3] + [PAD]  # doc 1 (3 tokens) does not fit after doc 0
    assert rows[1][0] == [102, 103, EOS, PAD]
    assert states[0] == (1, 0)  # not started yet: offset 0
    assert [r[2][0] for r in rows[2:]] == [2, 2]  # a document longer than a row is still split
    assert counts["data/documents"] == 3 and counts["data/padding"] > 0


def test_pieces_each_end_with_eos():
    rows, _, _ = pack(docs([4], pieces={0: [3, 1]}), seq_len=8, doc_positions=True)
    ids, labels, doc, pos = rows[0]
    assert ids[:6] == [2, 3, 4, EOS, 5, EOS] and pos[:6] == [0, 1, 2, 3, 0, 1] and doc[:6] == [0] * 6


def test_batches_and_final_state():
    opt = PackOptions(4, EOS, PAD, emit_doc_ids=True)
    rows = pack_rows(tokenize_documents(docs([3, 5, 2]), WordTok(), EOS, 64), opt, {})
    out = list(make_batches(rows, 3, opt))
    assert [b["input_ids"].shape[0] for b, _ in out] == [3, 1]
    assert set(out[0][0]) == {"input_ids", "labels", "attention_mask", "doc_ids"}
    assert out[1][0]["attention_mask"].tolist() == [[1, 0, 0, 0]]
    assert out[-1][1][0].end and out[-1][1][1] is None
    rows = pack_rows(tokenize_documents(docs([3]), WordTok(), EOS, 64), opt, {})
    assert [b is None for b, _ in make_batches(rows, 1, opt)] == [False, True]  # final state follows the last batch


def test_tokenizer_is_called_in_batches():
    tok = WordTok()
    list(tokenize_documents(docs([1] * 7), tok, EOS, 3))
    assert tok.calls == 3


def test_pad_batch_has_no_tokens():
    b = pad_batch(2, PackOptions(5, EOS, PAD, doc_positions=True, emit_doc_ids=True))
    assert set(b) == {"input_ids", "labels", "position_ids", "doc_ids"}
    assert (b["labels"] == IGNORE).all() and (b["doc_ids"] == -1).all() and b["input_ids"].shape == (2, 5)
