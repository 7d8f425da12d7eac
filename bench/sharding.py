"""Sharding: per-rank optimizer-state, parameter, gradient and peak-RSS bytes, and step time, per strategy.

Every number comes from a real 2-process CPU run started with the CLI, exactly as
a user would (`shardtune launch configs/quickstart.yaml --strategy S --gpus 0
--processes 2 ...`), one run per strategy: cpu (DDP over gloo), zero1, zero2,
zero3, zero3_offload and fsdp (FSDP2: torch's `fully_shard` per transformer
block and at the root, on gloo; shardtune.distributed.fsdp).

Model: a BERT built from a `BertConfig` (default hidden 256, 4 layers, 4 heads,
intermediate 1024; about 11M parameters, most of them the 30,522-row word
embedding) with the packaged MiniLM tokenizer, random init saved once, so that
the model states (tens of MB) dominate allocator noise. Data: the packaged Rotten
Tomatoes snippets via configs/quickstart.yaml, first 400, no eval/test hold-out
(the bench measures training), max_length 32, micro-batch 4 per rank, dropout 0,
fp32 (`train.mixed_precision: "no"`), no tracking, log_every=1.

What is read back (nothing is measured by this script itself):

  metrics.json  `dist/optim_state_bytes`, `dist/param_bytes`, `dist/grad_bytes`, `dist/peak_rss_bytes`,
                one value per rank (`Strategy.state_bytes` (shardtune.distributed), taken after the
                last step). Optimizer state = every non-scalar tensor in the state
                of the innermost torch optimizer (under DeepSpeed: the one that
                steps this rank's flat partition), i.e. the Adam moments. Params =
                this rank's part of every parameter (the ZeRO-3 `ds_tensor`
                partition, FSDP2's DTensor shard, else the whole tensor). Grads = the
                most gradient bytes the rank held after a backward of the first step
                (ZeRO-2/3: its flat partition; FSDP2: the sharded .grad). Peak RSS =
                ru_maxrss of the rank.
  log.jsonl     per-step `train/samples_per_s` (global samples over rank 0's time
                for that step); step time = global batch / that, median over the
                steps after --warmup; shown relative to the cpu (DDP) run.

Predictions, with Ψ = trainable parameters (counted here from the same model
class shardtune builds) and N = processes:

  ZeRO paper, mixed precision (fp16 params+grads, fp32 master+Adam moments,
  "K=12"): DDP 16Ψ, ZeRO-1 4Ψ + 12Ψ/N, ZeRO-2 2Ψ + 14Ψ/N, ZeRO-3 16Ψ/N bytes/rank.
  These runs are fp32, so the checked quantities are the fp32 equivalents:
  Adam moments 8Ψ per rank under DDP and 8Ψ/N under every ZeRO stage and FSDP2;
  parameters 4Ψ, or 4Ψ/N under ZeRO-3 and FSDP2; gradients 4Ψ under DDP,
  4Ψ/N under every ZeRO stage and FSDP2 (at one micro-batch per step ZeRO-1
  partitions them in the backward like ZeRO-2; it differs while accumulating). The ratio columns are measured /
  predicted.

Not in metrics.json (so not checked here): DDP's bucket copies,
DeepSpeed's flat and communication buffers, and DeepSpeed's fp32 master
partition. Even in fp32, DeepSpeed 0.19 keeps that master partition as a
separate clone at every stage (`stage_1_and_2.py` always clones it; `stage3.py`
would reuse the parameter partition, but its check compares `tensor.device`
with the string "cpu", which is False, so on CPU it clones too): +4Ψ/N per
rank that `dist/optim_state_bytes` does not count. So DeepSpeed's fp32 model
states per rank are DDP 16Ψ, ZeRO-1 8Ψ + 12Ψ/N, ZeRO-2 4Ψ + 16Ψ/N, ZeRO-3
20Ψ/N (the paper's K=12 with 4-byte parameters and gradients), against the
ideal fp32 8Ψ + 8Ψ/N, 4Ψ + 12Ψ/N, 16Ψ/N. Peak RSS includes the Python/torch/
DeepSpeed runtime (about 400 MiB after importing shardtune.trainer) and transient
per-step buffers (ZeRO-3's gathered parameters and buckets), so it does not
follow the model-state formulas at this size.

Step times: one run per strategy by default (`--repeats` alternates rotated
rounds and takes the median of the per-run medians). On CPU with gloo and a
shared 2-core machine they say how much ZeRO's extra collectives and bookkeeping
cost here, and nothing about GPU speed.

Run: .venv/bin/python bench/sharding.py   (about 5-7 minutes on a 2-core CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ["cpu", "zero1", "zero2", "zero3", "zero3_offload", "fsdp"]
LABELS = ["fresh", "rotten"]  # shardtune's order: sorted label names

ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu",
}
for _k, _v in ENV.items():
    os.environ.setdefault(_k, _v)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="cpu first: it is the step-time baseline")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the step-time median")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch per rank")
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="rounds of all strategies, rotated order")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank (2 ranks share 2 cores)")
    p.add_argument("--port", type=int, default=29870, help="first main port tried; busy ones are skipped")
    p.add_argument("--keep", type=Path, help="keep the runs under this folder (default: a temp dir, deleted)")
    p.add_argument("--verbose", action="store_true", help="show each launch's output")
    a = p.parse_args()
    a.strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    bad = set(a.strategies) - set(STRATEGIES)
    if bad:
        p.error(f"unknown strategies {sorted(bad)}; on CPU use {', '.join(STRATEGIES)}")
    if not 0 <= a.warmup < a.steps - 1:
        p.error("--warmup must leave at least 2 timed steps")
    return a


def build_model_dir(root: Path, a) -> tuple[Path, int]:
    """A random-init BERT + the packaged MiniLM tokenizer as an HF folder, and its trainable parameter count Ψ."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from shardtune.assets import packaged_model

    out = root / "bert"
    tok = AutoTokenizer.from_pretrained(packaged_model("minilm-l6"))
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=a.hidden, num_hidden_layers=a.layers,
        num_attention_heads=max(1, a.hidden // 64), intermediate_size=4 * a.hidden, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out)  # like tests/conftest.py: shardtune adds the classification head
    tok.save_pretrained(out)
    cfg.num_labels = len(LABELS)
    psi = sum(p.numel() for p in BertForSequenceClassification(cfg).parameters() if p.requires_grad)
    return out, psi


def free_port(start: int) -> int:
    for port in range(start, start + 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise SystemExit(f"no free port in {start}..{start + 199}; pass --port")


def launch_cmd(a, strategy: str, model_dir: Path, out: Path, port: int) -> list[str]:
    overrides = {
        "model.name_or_path": model_dir, "model.max_length": a.max_length, "model.dropout": 0,
        "data.max_examples": a.examples, "data.validation_fraction": 0, "data.test_fraction": 0,
        "train.max_steps": a.steps, "train.batch_size": a.batch_size, "train.log_every": 1,
        "train.mixed_precision": '"no"', "train.progress_bar": '"off"',
        "tracking.report_to": "[]", "output.dir": out,
    }
    return [
        sys.executable, "-m", "shardtune.cli", "launch", "configs/quickstart.yaml", "--strategy", strategy,
        "--gpus", "0", "--processes", str(a.processes), "--main-port", str(port),
        *[f"{k}={v}" for k, v in overrides.items()],
    ]


def run_one(a, strategy: str, model_dir: Path, out: Path) -> dict:
    cmd = launch_cmd(a, strategy, model_dir, out, free_port(a.port))
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(a.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=not a.verbose, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "" if a.verbose else (proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"{strategy}: launch failed with exit code {proc.returncode}\n{tail}")
    m = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    sps = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r]
    if len(sps) != a.steps:
        raise SystemExit(f"{strategy}: log.jsonl has {len(sps)} per-step rows, expected {a.steps} (log_every=1)")
    global_batch = a.batch_size * a.processes
    step_s = statistics.median(global_batch / s for s in sps[a.warmup:])
    return {
        "strategy_seen": m.get("dist/strategy"), "processes": m.get("dist/num_processes"),
        "optim": m["dist/optim_state_bytes"], "param": m["dist/param_bytes"], "grad": m["dist/grad_bytes"],
        "rss": m.get("dist/peak_rss_bytes"),
        "step_s": step_s, "wall_s": wall,
    }


def predicted(strategy: str, psi: int, n: int) -> dict[str, float]:
    zero = strategy.startswith("zero") or strategy == "fsdp"  # optimizer state sharded
    stage3 = strategy.startswith("zero3") or strategy == "fsdp"  # parameters sharded
    # at one micro-batch per step (this bench) ZeRO-1 reduces each gradient to its partition in the same backward
    # as ZeRO-2 does; it keeps whole gradients only while accumulating (tests/test_strategies.py shows that, grad_accum 2)
    grads_sharded = stage3 or strategy in ("zero1", "zero2")
    paper = {"cpu": 16 * psi, "zero1": 4 * psi + 12 * psi / n, "zero2": 2 * psi + 14 * psi / n}.get(strategy, 16 * psi / n)
    fp32 = {"cpu": 16 * psi, "zero1": 8 * psi + 8 * psi / n, "zero2": 4 * psi + 12 * psi / n}.get(strategy, 16 * psi / n)
    ds_fp32 = {"cpu": 16 * psi, "zero1": 8 * psi + 12 * psi / n, "zero2": 4 * psi + 16 * psi / n}.get(strategy, 20 * psi / n)
    return {
        "optim": 8 * psi / n if zero else 8 * psi,
        "param": 4 * psi / n if stage3 else 4 * psi,
        "grad": 4 * psi / n if grads_sharded else 4 * psi,
        "paper_states": paper,  # mixed precision, ZeRO paper
        "fp32_states": fp32,  # params 4Ψ + grads 4Ψ + moments 8Ψ, sharded per stage, no separate master copy
        "ds_fp32_states": ds_fp32,  # as DeepSpeed builds it: + a cloned fp32 master partition 4Ψ/N
    }


MB = 1e6


def fmt_ranks(values, scale=MB, digits=2) -> str:
    return " / ".join(f"{v / scale:.{digits}f}" for v in values)


def fmt_ratio(values, pred: float) -> str:
    return " / ".join(f"{v / pred:.4f}" for v in values)


def print_table(a, psi: int, results: dict[str, list[dict]], load: tuple[float, float]) -> None:
    n = a.processes
    print(f"\nΨ = {psi:,} trainable parameters (hidden {a.hidden}, {a.layers} layers), N = {n} processes, fp32")
    for key, label in [
        ("paper_states", "ZeRO paper, mixed precision, (2+2+12)Ψ"),
        ("fp32_states", "fp32, no separate master, (4+4+8)Ψ"),
        ("ds_fp32_states", "fp32 as DeepSpeed builds it, + cloned fp32 master 4Ψ/N under ZeRO"),
    ]:
        shown = ", ".join(f"{s} {predicted(s, psi, n)[key] / MB:.1f}" for s in ["cpu", "zero1", "zero2", "zero3"])
        print(f"predicted model states per rank, MB, {label}: {shown}")
    print(
        f"steps={a.steps} (first {a.warmup} untimed), micro-batch {a.batch_size}/rank, max_length {a.max_length}, "
        f"OMP_NUM_THREADS={a.threads}, repeats={a.repeats}, 1-min load average {load[0]:.2f} before / {load[1]:.2f} after"
    )
    print("values per rank as rank0 / rank1; MB = 1e6 bytes, MiB = 2^20 bytes; ratios = measured / predicted\n")
    base = statistics.median(r["step_s"] for r in results["cpu"]) if "cpu" in results else None
    print(
        "| strategy | optim state MB/rank | predicted | ratio | params MB/rank | predicted | ratio "
        "| grads MB/rank | predicted | ratio | peak RSS MiB/rank | step ms (median) | step time vs DDP | run wall s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, runs in results.items():
        r, p = runs[0], predicted(s, psi, n)  # bytes are deterministic; every repeat is checked equal below
        step = statistics.median(x["step_s"] for x in runs)
        rss = fmt_ranks(r["rss"], 2**20, 0) if r["rss"] else "not recorded"
        vs = f"{step / base:.2f}x" if base else "-"
        opt_pred = f"8Ψ/N = {p['optim'] / MB:.2f}" if s != "cpu" else f"8Ψ = {p['optim'] / MB:.2f}"
        par_pred = f"4Ψ{'/N' if p['param'] < 4 * psi else ''} = {p['param'] / MB:.2f}"
        grad_pred = f"4Ψ{'/N' if p['grad'] < 4 * psi else ''} = {p['grad'] / MB:.2f}"
        print(
            f"| {s}{' (DDP)' if s == 'cpu' else ''} | {fmt_ranks(r['optim'])} | {opt_pred} | {fmt_ratio(r['optim'], p['optim'])} "
            f"| {fmt_ranks(r['param'])} | {par_pred} | {fmt_ratio(r['param'], p['param'])} "
            f"| {fmt_ranks(r['grad'])} | {grad_pred} | {fmt_ratio(r['grad'], p['grad'])} | {rss} "
            f"| {step * 1e3:.0f} | {vs} | {statistics.median(x['wall_s'] for x in runs):.0f} |"
        )


def main() -> int:
    a = parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="shardtune-sharding-") as tmp:
        root = a.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        model_dir, psi = build_model_dir(root, a)
        results: dict[str, list[dict]] = {s: [] for s in a.strategies}
        for rnd in range(a.repeats):
            order = a.strategies[rnd % len(a.strategies):] + a.strategies[: rnd % len(a.strategies)]
            for s in order:
                res = run_one(a, s, model_dir, root / f"{s}-{rnd}")
                if res["processes"] != a.processes or res["strategy_seen"] != s:
                    raise SystemExit(f"{s}: the run reports strategy {res['strategy_seen']} on {res['processes']} processes")
                if results[s] and (res["optim"], res["param"]) != (results[s][0]["optim"], results[s][0]["param"]):
                    raise SystemExit(f"{s}: state bytes differ between repeats: {res} vs {results[s][0]}")
                results[s].append(res)
                print(
                    f"round {rnd + 1}/{a.repeats} {s:13s} optim {fmt_ranks(res['optim'])} MB, params {fmt_ranks(res['param'])} MB, "
                    f"step {res['step_s'] * 1e3:.0f} ms, wall {res['wall_s']:.0f} s, load {os.getloadavg()[0]:.2f}",
                    file=sys.stderr, flush=True,
                )
        print_table(a, psi, results, (load_before, os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
