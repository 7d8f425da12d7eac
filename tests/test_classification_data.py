"""Classification data through the one reader layer: real files as they come (BOM, CRLF), a folder with
one subfolder of .txt files per label, bad records as one sentence, and DataLoader workers that outlive
a stop signal sent to them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import forklaunch
from shardtune import ShardtuneError
from shardtune.config import DataConfig
from shardtune.data.classification import Encoded, load_splits, make_loader, read_examples

ROWS = [("a good film", "pos"), ("dull, and long", "neg"), ('she said "wow"', "pos"), ("two\nlines", "neg")] * 10


def csv_bytes(eol: str = "\n") -> bytes:
    quote = lambda t: '"' + t.replace('"', '""') + '"'  # noqa: E731
    return ("text,label" + eol + "".join(f"{quote(t)},{lab}{eol}" for t, lab in ROWS)).encode()


def test_spreadsheet_csv_with_bom_and_crlf(tmp_path):
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + csv_bytes("\r\n"))  # what spreadsheets export
    (tmp_path / "plain.csv").write_bytes(csv_bytes())
    got = read_examples(str(tmp_path / "excel.csv"), DataConfig())
    assert [(e.text, e.label) for e in got] == ROWS  # column "text", not "\ufefftext"; no "\r" left in labels
    assert got == read_examples(str(tmp_path / "plain.csv"), DataConfig())
    (tmp_path / "bom.tsv").write_bytes(b"\xef\xbb\xbfsentence\tlabel\r\nok\tx\r\nfine\ty\r\n")
    assert [e.text for e in read_examples(str(tmp_path / "bom.tsv"), DataConfig(text_column="sentence"))] == ["ok", "fine"]
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "j", "label": 1}\r\n{"text": "k", "label": 2}\r\n')
    assert [(e.text, e.label) for e in read_examples(str(tmp_path / "bom.jsonl"), DataConfig())] == [("j", "1"), ("k", "2")]


def write_label_folder(root, per_label: int = 12):
    for label in ("neg", "pos"):
        (root / label).mkdir(parents=True)
        for i in range(per_label):
            (root / label / f"{i:03d}_7.txt").write_bytes((b"\xef\xbb\xbf" if i == 0 else b"") + f"{label} review {i}\r\nline two".encode())
    (root / "urls_pos.txt").write_text("http://example.com\n")  # loose files are not examples
    return root


def test_folder_with_one_subfolder_of_txt_files_per_label(tmp_path):
    root = write_label_folder(tmp_path / "imdb" / "train")
    (tmp_path / "imdb" / "train" / "unsup").mkdir()
    (tmp_path / "imdb" / "train" / "unsup" / "0.txt").write_text("no label")
    splits = load_splits(DataConfig(train_file=str(root), labels=["neg", "pos"]))  # data.labels picks the subfolders
    assert splits.labels == ["neg", "pos"]
    every = splits.train + splits.validation + splits.test
    assert len(every) == 24 and {e.label for e in every} == {"neg", "pos"}
    assert {e.text for e in every if e.label == "pos"} == {f"pos review {i}\r\nline two" for i in range(12)}  # BOM dropped
    assert {e.label for e in read_examples(str(root), DataConfig())} == {"neg", "pos", "unsup"}  # no labels: every subfolder
    with pytest.raises(ShardtuneError, match="no subfolder 'neutral'"):
        read_examples(str(root), DataConfig(labels=["neg", "neutral"]))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.txt").write_text("x")
    with pytest.raises(ShardtuneError, match="holds no subfolders of .txt files"):
        read_examples(str(tmp_path / "flat"), DataConfig())


def test_bad_records_are_one_sentence(tmp_path):
    (tmp_path / "r.csv").write_text("text,label\nok,a\nonly one field\nfine,b\n")
    with pytest.raises(ShardtuneError, match=r"r.csv line 3 has 1 fields where the header has 2") as err:
        read_examples(str(tmp_path / "r.csv"), DataConfig())
    (tmp_path / "u.jsonl").write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "\xff", "label": "b"}\n')
    with pytest.raises(ShardtuneError, match=r"u.jsonl line 2 is not valid UTF-8"):
        read_examples(str(tmp_path / "u.jsonl"), DataConfig())
    assert "\n" not in str(err.value)


def test_predict_reads_files_through_the_same_readers(tmp_path):
    from shardtune.predict import read_texts

    (tmp_path / "t.csv").write_bytes(b"\xef\xbb\xbfreview\r\nfine\r\n\"awful, just awful\"\r\n")
    assert read_texts(tmp_path / "t.csv", "review") == ["fine", "awful, just awful"]
    with pytest.raises(ShardtuneError, match="line 2: no text in column 'text'"):
        read_texts(tmp_path / "t.csv", "text")


def signal_from_elsewhere(pids) -> None:
    """What Slurm does to every process of a step: signals from a process that is not the workers' parent."""
    for pid in pids:
        for sig in ("TERM", "USR1", "INT"):
            subprocess.run(["kill", f"-{sig}", str(pid)], check=True)


def test_loader_workers_survive_stop_signals(tmp_path):
    from transformers import AutoTokenizer

    from shardtune.assets import packaged_model

    tok = AutoTokenizer.from_pretrained(packaged_model("minilm-l6"))
    examples = read_examples(str(write_label_folder(tmp_path / "d", 40)), DataConfig())
    data = Encoded(examples, tok, {"neg": 0, "pos": 1}, 32)
    it = iter(make_loader(data, tok, batch_size=2, shuffle=False, seed=0, num_workers=2))
    got = [next(it)]
    pids = [w.pid for w in it._workers]
    signal_from_elsewhere(pids)
    time.sleep(0.5)
    got += list(it)
    assert sum(len(b["labels"]) for b in got) == len(examples)


EXIT_WITH_LIVE_WORKERS = """
import sys
from transformers import AutoTokenizer
from shardtune.assets import packaged_model
from shardtune.config import DataConfig
from shardtune.data.classification import Encoded, make_loader, read_examples
tok = AutoTokenizer.from_pretrained(packaged_model("minilm-l6"))
data = Encoded(read_examples(sys.argv[1], DataConfig()), tok, {"neg": 0, "pos": 1}, 32)
it = iter(make_loader(data, tok, batch_size=2, shuffle=False, seed=0, num_workers=2))
next(it)
print("exiting with live workers", flush=True)
"""


def test_process_exits_with_a_live_loader(tmp_path):
    """At exit multiprocessing terminate()s and join()s live workers: they must still leave on their parent's SIGTERM."""
    folder = write_label_folder(tmp_path / "d", 40)
    proc = subprocess.run([sys.executable, "-c", EXIT_WITH_LIVE_WORKERS, str(folder)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "exiting with live workers" in proc.stdout, proc.stderr


class _Parents(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield os.getppid()


def _worker_parents(out: str) -> None:
    """In a process started by a forkserver (as tests/forklaunch.py starts ranks): whose children the workers are."""
    from shardtune.data.workers import StopSafeLoader

    parents = list(StopSafeLoader(_Parents(), batch_size=None, num_workers=2))
    Path(out).write_text(json.dumps({"me": os.getpid(), "workers' parents": parents}))


def test_workers_are_forked_from_their_rank_whatever_start_method_the_rank_has(tmp_path):
    """A rank that a forkserver started (the test launcher; every process on Python >= 3.14) would give its
    DataLoader workers to a forkserver of its own: they would import everything again, outlive a SIGKILLed rank
    and ignore its SIGTERM (data/workers.py). The workers must be the rank's own children."""
    out = tmp_path / "parents.json"
    proc = forklaunch.context().Process(target=_worker_parents, args=(str(out),))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    seen = json.loads(out.read_text())
    assert seen["workers' parents"] == [seen["me"]] * 2, seen
