"""Runs through the real launcher (`shardtune launch` -> accelerate launch -> torchrun -> gloo ranks): the paths a
user takes. The strategy matrix itself (every strategy against one process, resume on other world sizes) is in
tests/test_strategies.py, on forked ranks that start faster."""

from __future__ import annotations

import json
import os
import subprocess
import sys


from conftest import ROOT
from forklaunch import free_port

STEPS = 20


def _common(tiny_bert, out) -> list[str]:
    return [
        f"model.name_or_path={tiny_bert}", "model.max_length=32", "model.dropout=0", "data.max_examples=400",
        f"train.max_steps={STEPS}", "train.log_every=1", "train.eval_every=10", "train.eval_batch_size=6",
        "optim.lr=2e-4", "tracking.report_to=[]", f"output.dir={out}",
    ]


def _losses(run) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (run / "log.jsonl").read_text().splitlines() if "train/loss" in line]


def _metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _launch(tiny_bert, out, strategy: str, *overrides: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "shardtune.cli", "launch", str(ROOT / "configs/quickstart.yaml"), "--strategy", strategy,
        "--gpus", "0", "--processes", "2", "--main-port", str(free_port()), *_common(tiny_bert, out), *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_a_zero3_launch_runs_zero3(tiny_bert, tmp_path):
    """accelerate's DeepSpeed launch: the ranks take the strategy from its environment (ACCELERATE_USE_DEEPSPEED),
    and ZeRO-3 partitions the parameters. (Its checkpoints and their export: tests/test_strategies.py, every strategy.)"""
    run = tmp_path / "run"
    _launch(tiny_bert, run, "zero3", "train.batch_size=4", "train.max_steps=3", "train.eval_every=null")
    metrics = _metrics(run)
    assert metrics["dist/strategy"] == "zero3" and metrics["dist/num_processes"] == 2
    full = _full_param_bytes(tiny_bert)
    assert all(0.45 * full < b < 0.55 * full for b in metrics["dist/param_bytes"]), (metrics["dist/param_bytes"], full)  # half each


def _full_param_bytes(tiny_bert) -> int:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(tiny_bert, num_labels=2))
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_launched_fsdp_run_and_shardtune_export_give_the_live_models_logits(tiny_bert, tmp_path):
    """FSDP2 on CPU processes (launched as plain CPU ranks with dist.strategy=fsdp): `shardtune export` of the
    checkpoint == the live model."""
    import torch
    from transformers import AutoModelForSequenceClassification

    strategy, run = "fsdp", tmp_path / "run"
    _launch(tiny_bert, run, strategy, "train.batch_size=4", "train.max_steps=6", "train.save_every=6", "train.eval_every=null")
    assert _metrics(run)["dist/strategy"] == strategy
    proc = subprocess.run(
        [sys.executable, "-m", "shardtune.cli", "export", str(run / "checkpoints/step-00000006"), "--out", str(tmp_path / "hf")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    live = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()  # written from the live (sharded) model
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, exported.config.vocab_size, (3, 24))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=x).logits, live(input_ids=x).logits, rtol=0, atol=1e-6)
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "label_map.json").is_file()


def test_each_rank_sees_disjoint_data_and_together_all_of_it(tiny_bert, tmp_path):
    data = tmp_path / "docs.csv"
    data.write_text("text,label\n" + "".join(f"document {i},{'ab'[i % 2]}\n" for i in range(100)))
    out = tmp_path / "seen.json"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()),
        str(ROOT / "tests" / "dist_worker.py"), str(ROOT / "configs/quickstart.yaml"), str(out),
        f"model.name_or_path={tiny_bert}", f"data.train_file={data}", "data.validation_fraction=0", "data.test_fraction=0",
        "train.batch_size=4", "train.epochs=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(out.read_text())
    assert seen["world"] == 2 and len(seen["steps"]) == 13  # ceil(100 / (2 x 4))
    everything = []
    for step, (rank0, rank1) in enumerate(seen["steps"]):
        assert not set(rank0) & set(rank1), step
        everything += rank0 + rank1
    assert sorted(everything) == sorted(f"document {i}" for i in range(100))  # each exactly once
    assert [len(r) for r in seen["steps"][-1]] == [4, 0]  # the uneven tail: rank 1's rows are unlabelled padding


def test_a_signal_to_one_rank_stops_both_at_the_same_step(tiny_bert, tmp_path):
    """SIGUSR1 reaches rank 1 only: both ranks agree, save one checkpoint at the same step and exit 0."""
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "shardtune.cli", "launch", str(ROOT / "configs/quickstart.yaml"), "--strategy", "cpu", "--gpus", "0",
        "--processes", "2", "--main-port", str(free_port()), *_common(tiny_bert, run), "train.batch_size=4", "train.max_steps=200",
        "train.eval_every=null",
    ]
    # usr1@step=5,rank=1: SIGUSR1 to rank 1 (and its children) only, at a step the run cannot have passed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARDTUNE_FAILPOINTS": "usr1@step=5,rank=1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = proc.communicate(timeout=300)
    assert "failpoint: SIGUSR1 to rank 1 at step 5" in out + err, (out + err)[-3000:]
    assert proc.returncode == 0, err[-3000:]
    saved = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and "preempted (signal on another rank)" in out  # rank 0 never got the signal itself
    step = int(saved[0].split("-")[1])
    assert f"at step {step}: checkpoint saved" in out and step < 200
