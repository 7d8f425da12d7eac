"""The strategy matrix as a benchmark: every strategy against one process, over whole runs (issue 11).

tests/test_strategies.py checks this on 2 CPU ranks over gloo in fp32; this script runs the same comparison
where the suite cannot: on GPUs with NCCL and bf16 (`bash bench/gpu.sh` calls it), and on CPU as a check of
the script itself. Each strategy runs `shardtune launch configs/quickstart.yaml --strategy S` for --steps
optimizer steps (MiniLM-L6 on the packaged Rotten Tomatoes snippets, weight decay 0.5, dropout 0, one fixed
global batch) and its per-step losses and grad norms are compared with the baseline run of the same global
batch in one process (`single_gpu` on a GPU, `shardtune train` on CPU).

  GPU:  N = min(2, visible GPUs) processes per strategy; bf16 (tolerance: bf16 rounding, so the table prints
        the largest relative difference rather than passing or failing a fixed bound)
  CPU:  2 gloo processes, fp32 (the same bound as the suite: 2e-5)

Run: .venv/bin/python bench/strategy_matrix.py              (CPU, about 4 minutes on 2 cores)
     python bench/strategy_matrix.py --device gpu           (from bench/gpu.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ["cpu", "zero1", "zero2", "zero3", "zero3_offload", "fsdp"]
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    return p.parse_args()


def overrides(a, out: Path, processes: int) -> list[str]:
    over = {
        "model.max_length": 64, "model.dropout": 0, "data.max_examples": 2000, "data.group_by_length": "false",
        "train.max_steps": a.steps, "train.batch_size": a.global_batch // processes, "train.log_every": 1,
        "train.eval_every": "null", "train.mixed_precision": "bf16" if a.device == "gpu" else '"no"',
        "optim.weight_decay": 0.5, "optim.warmup_steps": 2, "train.progress_bar": '"off"', "tracking.report_to": "[]",
        "output.dir": out,
    }
    return [f"{k}={v}" for k, v in over.items()]


def run(cmd: list[str], out: Path) -> tuple[list[tuple[float, float]], float]:
    t0 = time.perf_counter()
    env = {**os.environ, **ENV, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        return [], time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    return [(r["train/loss"], r["train/grad_norm"]) for r in rows if "train/loss" in r], time.perf_counter() - t0


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def main() -> int:
    a = parse_args()
    gpu = a.device == "gpu"
    if gpu:
        import torch

        processes = min(2, torch.cuda.device_count())
    else:
        processes = 2
    cli = [sys.executable, "-m", "shardtune.cli"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="shardtune-matrix-") as tmp:
        base_dir = Path(tmp) / "base"
        base_cmd = (cli + ["launch", "configs/quickstart.yaml", "--strategy", "single_gpu", "--gpus", "1"] if gpu
                    else cli + ["train", "configs/quickstart.yaml"])
        base, base_s = run(base_cmd + overrides(a, base_dir, 1), base_dir)
        if len(base) != a.steps:
            raise SystemExit(f"the baseline run failed or logged {len(base)} of {a.steps} steps")
        for s in a.strategies.split(","):
            if gpu and s == "cpu":
                s = "ddp"
            out = Path(tmp) / s
            gpus = ["--gpus", str(processes)] if gpu else ["--gpus", "0", "--processes", str(processes)]
            got, secs = run(cli + ["launch", "configs/quickstart.yaml", "--strategy", s, *gpus] + overrides(a, out, processes), out)
            if len(got) != a.steps:
                rows.append((s, "failed", "", "", f"{secs:.0f}"))
                continue
            loss = max(rel(x[0], y[0]) for x, y in zip(got, base))
            norm = max(rel(x[1], y[1]) for x, y in zip(got, base))
            rows.append((s, f"{loss:.2e}", f"{norm:.2e}", "yes" if gpu or max(loss, norm) <= 2e-5 else "NO", f"{secs:.0f}"))
    precision = "bf16" if gpu else "fp32"
    print(f"\n{a.steps} steps, global batch {a.global_batch}, {processes} processes vs 1, {precision}, weight decay 0.5, dropout 0;"
          f" baseline {base_s:.0f} s")
    print("| strategy | max rel. diff of loss | max rel. diff of grad norm | within 2e-5 (CPU) | run s |")
    print("|---|---:|---:|---|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 1 if any(r[1] == "failed" or r[3] == "NO" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
