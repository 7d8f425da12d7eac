"""A stop signal at any moment loses nothing (issue 13): SIGUSR1 and SIGTERM, to the rank and its DataLoader workers
(what Slurm sends a job step), while the model loads, after a step, during an eval, inside a checkpoint write and
after training (final eval, test, export), with 0 and 2 workers. Every case ends with a complete checkpoint and a
rerun that logs the uninterrupted run's losses bit for bit (dropout on: the RNG state matters), or, after training,
with the finished run's export."""

from __future__ import annotations

import json
import os
import re

import pytest

import forklaunch
import wandb_reader
from conftest import ROOT, tiny_overrides

QS = ROOT / "configs" / "quickstart.yaml"
PHASES = {"load": ("load=0", 1), "step": ("step=3", 4), "eval": ("eval=4", 5), "save": ("save=4", 5)}  # -> checkpoint at


def _argv(tiny_bert, out, workers: int) -> list[str]:
    over = {"train.max_steps": 8, "train.log_every": 1, "train.eval_every": 4, "train.save_every": 4, "train.batch_size": 8,
            "data.max_examples": 120, "data.num_workers": workers, "tracking.report_to": "[]"}
    return ["train", str(QS), *tiny_overrides(tiny_bert, out, **over)]


def _launch(argv, logs, failpoints: str = "") -> tuple[int, str]:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / "rank0.log"
    before = log.stat().st_size if log.exists() else 0
    (code,) = forklaunch.launch(argv, logs, world=1, env={"SHARDTUNE_FAILPOINTS": failpoints})
    return code, log.read_text()[before:]


def _losses(run) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "train/loss" in r}


@pytest.fixture(scope="module")
def reference(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert _launch(_argv(tiny_bert, out / "run", 0), out)[0] == 0
    return _losses(out / "run")


# Not the full product (16 pairs of launches): every phase once, and every (signal, workers) pair once; both
# signals take one code path (preempt.Preemption records either), the workers' one is data/workers.py.
PAIRWISE = [("load", "term", 2), ("step", "usr1", 2), ("eval", "term", 0), ("save", "usr1", 0)]


@pytest.mark.parametrize("phase,sig,workers", PAIRWISE)
def test_a_signal_in_training_saves_and_the_rerun_resumes_exactly(phase, sig, workers, reference, tiny_bert, tmp_path):
    where, saved_at = PHASES[phase]
    run, argv = tmp_path / "run", _argv(tiny_bert, tmp_path / "run", workers)
    code, out = _launch(argv, tmp_path, f"{sig}@{where}")
    assert code == 0 and f"preempted (signal {10 if sig == 'usr1' else 15}) at step {saved_at}" in out, out[-3000:]
    assert (run / "checkpoints" / f"step-{saved_at:08d}" / "manifest.json").is_file() and not (run / "metrics.json").exists()
    code, out = _launch(argv, tmp_path)
    assert code == 0 and f"resumed from step-{saved_at:08d} at step {saved_at}" in out, out[-3000:]
    assert _losses(run) == reference


@pytest.mark.parametrize("sig,workers", [("usr1", 2), ("term", 0)])
def test_a_signal_after_training_finishes_the_eval_test_and_export(sig, workers, tiny_bert, tmp_path):
    run = tmp_path / "run"
    code, out = _launch(_argv(tiny_bert, run, workers), tmp_path, f"{sig}@export=0")
    assert code == 0 and re.search(r"signal \d+ came after training, during the final eval or export: both were finished", out), out[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train/steps"] == 8 and "test/accuracy" in metrics and (run / "model" / "model.safetensors").is_file()


def test_a_preempted_slurm_job_is_requeued_once_by_rank_0_after_its_wandb_run_is_closed(tiny_bert, tmp_path):
    """2 ranks under a (fake) Slurm job: `scontrol requeue` makes Slurm SIGTERM every process of the job at once,
    W&B's service included, so it must come once, from rank 0, after rank 0 closed its W&B run. (It came from
    every rank: after the process group was torn down every rank read as rank 0, and rank 1, with no W&B to
    close, usually requeued first: the first half's W&B file was then lost, as test_slurm's W&B tests saw.)"""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "rank $RANK: $*" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    run = tmp_path / "run"
    argv = ["train", str(QS), *tiny_overrides(tiny_bert, run, **{"train.max_steps": 8, "train.log_every": 1, "train.eval_every": None,
                                                                "train.batch_size": 8, "data.max_examples": 120, "tracking.report_to": "[wandb]"})]
    env = {"SHARDTUNE_FAILPOINTS": "usr1@step=3,rank=1", "SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    codes = forklaunch.launch(argv, tmp_path, world=2, env=env)
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    assert [c for c in calls.read_text().splitlines() if "requeue" in c] == ["rank 0: requeue 4242"]
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    stopped = int(re.search(r"preempted \(signal on another rank\) at step (\d+)", (tmp_path / "rank0.log").read_text()).group(1))
    assert [h["_step"] for h in wandb_reader.history(wandb_file) if "train/loss" in h] == list(range(1, stopped + 1))  # closed first
