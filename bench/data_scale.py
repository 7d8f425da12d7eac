"""Data stage at cluster scale: what each of S slots reads and parses, partitioned vs every-slot-reads-all.

Corpus: the Python 3.11 documentation sources of the Debian package
python3.11-doc (`/usr/share/doc/python3.11/html/_sources/**/*.rst.txt`, 497
files, 11 MB), in two layouts:

    lines  txt_unit: line, one document per non-blank line (~150K records);
           large files are cut into byte-range partitions (auto size: 4 KiB here)
    files  txt_unit: file, one document per file: whole-file partitions

For S = 1, 8, 64, 256 simulated slots (--slots), in one process, no
training and no tokenizer: the documents stage of every slot in turn (read,
parse, clean, the mixture; what a DataLoader worker does before tokenizing),
to the end of the split. Per slot: bytes read (counted at the file objects
the readers open), records parsed (records that yielded a document
candidate), seconds. Columns: mean and max per slot as a fraction of the
corpus; the target for the partitioned design is max <= 1.05/S plus one
partition (the largest); aggregate documents/s = documents of all slots /
the time of all slots (wall clock, and this process's CPU time, which is
less sensitive to other jobs on a shared machine).

Baseline: today's design (before issue 12), measured in the same run: the
shardtune source of --baseline-rev (default 290a21e, the commit before the
partitioned stage) is extracted with `git archive` into a temporary folder
and run in a subprocess with that folder first on PYTHONPATH: its
`DocStream` + `slot_documents`, where every slot reads and parses every
record and keeps its own round-robin. Every baseline slot does the same
work, so for S > --baseline-sample (default 8) only that many slots, evenly
spread, are run and the per-slot means stand for all S (the aggregate
documents/s then counts each slot's share of the documents, which is 1/S of
them).

The designs alternate for --rounds rounds (default 3); docs/s columns are
medians. Bytes and records do not vary between rounds.

Run: .venv/bin/python bench/data_scale.py   (about 6-9 minutes on a busy 2-core CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

PYDOCS = "/usr/share/doc/python3.11/html/_sources"
ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = {"lines": {"txt_unit": "line"}, "files": {"txt_unit": "file"}}


def stream_dict(layout: str) -> dict:
    return {"sources": [{"path": f"{PYDOCS}/**/*.rst.txt", **LAYOUTS[layout]}], "seq_len": 512, "on_source_end": "drop"}


class Counter:
    """Counts bytes read through the file objects a readers module opens (its module-global `open`)."""

    def __init__(self, module):
        self.bytes = 0
        real = open

        class File:
            def __init__(f, *a, **k):
                f.f = real(*a, **k)

            def __getattr__(f, name):
                return getattr(f.f, name)

            def __enter__(f):
                return f

            def __exit__(f, *a):
                f.f.close()

            def __iter__(f):
                for line in f.f:
                    self.bytes += len(line)
                    yield line

            def read(f, *a):
                out = f.f.read(*a)
                self.bytes += len(out)
                return out

            def readline(f, *a):
                out = f.f.readline(*a)
                self.bytes += len(out)
                return out

        module.open = File


def corpus_bytes() -> int:
    import glob

    return sum(os.path.getsize(f) for f in glob.glob(f"{PYDOCS}/**/*.rst.txt", recursive=True))


# ---------------------------------------------------------------- the partitioned design (this checkout)


def warm_up(measure, layout: str) -> None:
    """One untimed pass first in each process (imports, compiled regexes, the page cache): both designs alike."""
    if layout not in WARM:
        WARM.append(layout)
        measure(layout, 1, 1)


WARM: list = []


def measure_new(layout: str, num_slots: int, sample: int = 0) -> dict:
    from shardtune.config import StreamConfig
    from shardtune.data import readers
    from shardtune.data.docstream import SlotStream
    from shardtune.data.plan import build_plan
    from shardtune.data.stream import fresh_slots

    warm_up(measure_new, layout)
    counter = Counter(readers)
    plan = build_plan(StreamConfig.model_validate(stream_dict(layout)), "train", None)
    slots = fresh_slots(plan, num_slots)
    out = []
    for j in range(num_slots):
        counter.bytes = 0
        t0, c0 = time.perf_counter(), time.process_time()
        stream = SlotStream(plan, j, num_slots, slots[str(j)])
        docs = sum(1 for d in stream.documents() if d.pieces)
        out.append({"bytes": counter.bytes, "records": stream.d, "docs": docs, "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0})
    return {"slots": out, "sampled": num_slots, "parts": len(plan.parts), "max_part": max(p.size for p in plan.parts)}


# ---------------------------------------------------------------- today's design (run in the baseline interpreter)


def measure_old(layout: str, num_slots: int, sample: int) -> dict:
    from shardtune.config import StreamConfig
    from shardtune.data import readers
    from shardtune.data.docstream import DocStream, slot_documents
    from shardtune.data.stream import build_plan

    warm_up(measure_old, layout)
    counter = Counter(readers)
    cfg = StreamConfig.model_validate(stream_dict(layout))
    plan = build_plan(cfg, "train")
    which = sorted({round(i * (num_slots - 1) / max(1, sample - 1)) for i in range(min(sample, num_slots))})
    out = []
    for j in which:
        counter.bytes = 0
        t0, c0 = time.perf_counter(), time.process_time()
        stream = DocStream(plan, cfg.seed, cfg.on_bad_record, cfg.max_record_bytes)
        state = {"cursor": 0, "pending": [], "replay": None, "counts": {}}
        docs = sum(1 for d in slot_documents(stream, cfg.clean, num_slots, j, 0, state) if d.pieces)
        out.append({"bytes": counter.bytes, "records": stream.draws.d, "docs": docs, "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0})
    return {"slots": out, "sampled": len(which)}


def run_baseline(rev: str, layout: str, slots: list[int], sample: int) -> dict[int, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        env = {**os.environ, "PYTHONPATH": f"{tmp}/src"}
        args = [sys.executable, __file__, "--worker", "old", "--layout", layout, "--slots", ",".join(map(str, slots)), "--baseline-sample", str(sample)]
        proc = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


# ---------------------------------------------------------------- report


def row(name: str, num_slots: int, runs: list[dict], total: int, records_all: int, target: str) -> str:
    """One table row; bytes and records from the first round (they do not vary), docs/s as the median of the rounds."""
    import statistics

    s = runs[0]["slots"]
    b = [x["bytes"] / total for x in s]
    r = [x["records"] / records_all for x in s]
    scale = num_slots / len(s)  # sampled baseline: every slot does the same work
    docs = sum(x["docs"] for x in s) * scale
    rate = lambda key: statistics.median(docs / (sum(x[key] for x in m["slots"]) * scale) for m in runs)  # noqa: E731
    return (f"| {num_slots} | {name} | {sum(b) / len(b):.4f} | {max(b):.4f} | {sum(r) / len(r):.4f} | {max(r):.4f} | {target} | "
            f"{sum(x['bytes'] for x in s) * scale / total:.3f} | {rate('wall'):,.0f} | {rate('cpu'):,.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", default="1,8,64,256")
    p.add_argument("--layouts", default="lines,files")
    p.add_argument("--baseline-rev", default="290a21e")
    p.add_argument("--baseline-sample", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two designs (medians of docs/s)")
    p.add_argument("--worker", choices=["old"], help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    args = p.parse_args()
    slots = [int(s) for s in args.slots.split(",")]
    if args.worker:
        print(json.dumps({S: measure_old(args.layout, S, args.baseline_sample) for S in slots}))
        return
    if not Path(PYDOCS).is_dir():
        raise SystemExit(f"{PYDOCS} is missing: install the Debian package python3.11-doc (`make setup` as root).")
    import platform

    total = corpus_bytes()
    print(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}; corpus {total:,} bytes", flush=True)
    start = time.perf_counter()
    for layout in args.layouts.split(","):
        new, old = [], []
        for r in range(args.rounds):  # the designs alternate, round after round
            new.append({S: measure_new(layout, S) for S in slots})
            old.append(run_baseline(args.baseline_rev, layout, slots, args.baseline_sample))
            print(f"  {layout}: round {r + 1} of both designs measured ({time.perf_counter() - start:.0f} s)", flush=True)
        first = new[0][1]
        records_all, docs_all = sum(x["records"] for x in first["slots"]), sum(x["docs"] for x in first["slots"])
        print(f"\n### layout {layout}: {records_all:,} records, {docs_all:,} documents, {first['parts']:,} partitions (largest {first['max_part']:,} bytes)\n")
        print("| S | design | bytes read / slot, mean | max | records parsed / slot, mean | max | target max (1.05/S + 1 partition) "
              f"| bytes read, all slots / corpus | docs/s, all slots (median of {args.rounds}) | docs/CPU-s (median) |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for S in slots:
            target = 1.05 / S + new[0][S]["max_part"] / total
            ok = max(x["bytes"] for x in new[0][S]["slots"]) / total <= target
            assert all(sum(x["docs"] for x in m[S]["slots"]) == docs_all for m in new), "every document exactly once"
            print(row("partitioned", S, [m[S] for m in new], total, records_all, f"{target:.4f} {'met' if ok else 'MISSED'}"))
            sampled = old[0][S]["sampled"]
            print(row(f"today (every slot reads all{', ' + str(sampled) + ' slots run' if sampled < S else ''})", S, [m[S] for m in old], total, records_all, ""))
    print(f"\ntotal {time.perf_counter() - start:.0f} s, load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
