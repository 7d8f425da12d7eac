"""Checkpoint stall: how long training waits for a checkpoint, synchronous against asynchronous (issue 13).

Two real runs of `shardtune train configs/smollm2-pydocs.yaml` (the packaged SmolLM2-135M, continued
pretraining on the Python docs), identical but for `train.async_save`, one process, fp32, a checkpoint
every --every steps. What is read back, from each run's log.jsonl:

  checkpoint/blocked_s  how long the step loop waited in Trainer.checkpoint(): the whole DCP write, fsync
                        and seal when synchronous; the copy of the state to host memory (DCP async_save's
                        staging) when asynchronous, where the files are written by a background thread
  checkpoint/seal_s     asynchronous only: the seal (fsync of this rank's files, trainer state, manifest,
                        rename, `latest`), at the first step where the background write is done
  train/samples_per_s   per step (log_every=1): the step time of steps that ran while a write was in flight
                        against the others, i.e. what the background write costs the steps it overlaps

The ratio printed last is async / sync of the total time the loop was blocked (blocked + seal). Both runs
also check that every checkpoint was sealed (a `manifest.json` in each kept step folder) and that their
losses are equal: saving must not change training.

Run: .venv/bin/python bench/checkpoint_stall.py   (about 3-4 minutes on a 2-core CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=3, help="train.save_every")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--keep", type=Path, help="keep the runs under this folder (default: a temp dir, deleted)")
    return p.parse_args()


def run(a, out: Path, asynchronous: bool) -> dict:
    over = {
        "train.max_steps": a.steps, "train.save_every": a.every, "train.save_total_limit": a.steps, "train.log_every": 1,
        "train.eval_every": "null", "train.eval_on_start": "false", "train.batch_size": a.batch_size, "data.seq_len": a.seq_len,
        "train.mixed_precision": '"no"', "train.progress_bar": '"off"', "train.async_save": str(asynchronous).lower(),
        "tracking.report_to": "[]", "output.dir": out,
    }
    cmd = [sys.executable, "-m", "shardtune.cli", "train", "configs/smollm2-pydocs.yaml", *[f"{k}={v}" for k, v in over.items()]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"async_save={asynchronous}: exit code {proc.returncode}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    saves = sorted((out / "checkpoints").glob("step-*"))
    if len(saves) != a.steps // a.every or not all((d / "manifest.json").is_file() for d in saves):
        raise SystemExit(f"async_save={asynchronous}: checkpoints {[d.name for d in saves]} are not all sealed")
    blocked = [r["checkpoint/blocked_s"] for r in rows if "checkpoint/blocked_s" in r]
    seals = [r for r in rows if "checkpoint/seal_s" in r]
    step_s = {r["step"]: a.batch_size / r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r}
    # steps that ran while a write was in flight: after a save at step k, up to the step whose agreement sealed it
    # (the seal is logged under the step before it: run.step moves on after the agreement)
    overlapped = {s for r in seals for s in range(int(r["checkpoint/sealed_step"]) + 1, r["step"] + 2)}
    return {
        "wall_s": time.perf_counter() - t0, "blocked": blocked, "seal": [r["checkpoint/seal_s"] for r in seals],
        "losses": [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r],
        "step_overlapped": [v for k, v in step_s.items() if k in overlapped and k > 1],
        "step_other": [v for k, v in step_s.items() if k not in overlapped and k > 1],
    }


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}" if xs else "-"


def main() -> int:
    a = parse_args()
    with tempfile.TemporaryDirectory(prefix="shardtune-ckpt-") as tmp:
        root = a.keep or Path(tmp)
        sync, asyn = run(a, root / "sync", False), run(a, root / "async", True)
    if sync["losses"] != asyn["losses"]:
        raise SystemExit("the two runs' losses differ: an asynchronous save changed training")
    print(f"\nSmolLM2-135M, 1 process, fp32, {a.steps} steps of {a.batch_size} x {a.seq_len} tokens, a checkpoint every {a.every} steps"
          f" ({a.steps // a.every} checkpoints), torch {__import__('torch').__version__}, {os.cpu_count()} CPUs")
    print("| async_save | blocked s per checkpoint (median) | seal s (median) | total blocked s | step s, overlapping a write | step s, others | run wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in (("false", sync), ("true", asyn)):
        total = sum(r["blocked"]) + sum(r["seal"])
        print(f"| {name} | {med(r['blocked'])} | {med(r['seal'])} | {total:.2f} | {med(r['step_overlapped'])} | {med(r['step_other'])} | {r['wall_s']:.0f} |")
    ratio = (sum(asyn["blocked"]) + sum(asyn["seal"])) / (sum(sync["blocked"]) + sum(sync["seal"]))
    print(f"\ntraining blocked by checkpoints, async / sync: {ratio:.3f}x; the losses of both runs are equal at all {len(sync['losses'])} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
