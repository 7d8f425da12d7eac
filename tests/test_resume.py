"""Checkpoints and exact resume: a killed run, resumed, logs the same per-step losses as an uninterrupted one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, lm_overrides, tiny_overrides

QS = ROOT / "configs" / "quickstart.yaml"


def _losses(run) -> dict[int, float]:
    """Per-step train loss; a step logged twice (before a kill and after the resume) keeps its last value."""
    out = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def _cmd(config, overrides) -> list[str]:
    return [sys.executable, "-m", "shardtune.cli", "train", str(config), *overrides]


def _run(config, overrides) -> str:
    proc = subprocess.run(_cmd(config, overrides), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _kill_after(config, overrides, run, step: int) -> None:
    """Start a run and SIGKILL it once it has logged `step` (past a checkpoint)."""
    proc = subprocess.Popen(_cmd(config, overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        log = run / "log.jsonl"
        if log.is_file() and any(json.loads(line)["step"] >= step for line in log.read_text().splitlines() if line.strip()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _lm_yaml(tmp_path):
    f = tmp_path / "lm.yaml"
    f.write_text("task: causal_lm\n")
    return f


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_killed_run_resumes_exactly(task, tiny_bert, tiny_lm_tokenizer, lm_corpus, tmp_path):
    if task == "classification":  # dropout on: the RNG restore matters
        config = QS
        over = lambda out: tiny_overrides(tiny_bert, out, **{"train.max_steps": 40, "train.log_every": 1, "train.eval_every": None,  # noqa: E731
                                                              "train.save_every": 4, "tracking.report_to": "[]", "data.max_examples": 200})
    else:
        config = _lm_yaml(tmp_path)
        over = lambda out: lm_overrides(tiny_lm_tokenizer, lm_corpus, out, **{"train.max_steps": 40, "train.save_every": 4})  # noqa: E731
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _run(config, over(ref))
    _kill_after(config, over(killed), killed, step=9)
    assert (killed / "checkpoints" / "step-00000008").is_dir()
    out = _run(config, over(killed))
    resumed = re.search(r"resumed from step-(\d+) at step (\d+)", out)
    assert resumed and 8 <= int(resumed.group(2)) < 40, out[:500]  # a real mid-run resume
    assert _losses(killed) == _losses(ref)  # bit for bit, every step
    assert sorted(p.name for p in (killed / "checkpoints").glob("step-*")) == ["step-00000036", "step-00000040"]  # keep 2


def test_torn_newest_checkpoint_falls_back_to_the_previous_one(tiny_bert, tmp_path):
    run = tmp_path / "r"
    over = tiny_overrides(tiny_bert, run, **{"train.max_steps": 8, "train.save_every": 4, "train.eval_every": None,
                                             "tracking.report_to": "[]", "data.max_examples": 200, "train.log_every": 1})
    _run(QS, over)
    newest = run / "checkpoints" / "step-00000008"
    victim = newest / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    proc = subprocess.run(_cmd(QS, over[:-1] + ["train.max_steps=10"]), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step-00000004 at step 4" in proc.stdout
    assert "skipping incomplete checkpoint" in proc.stderr and "model.safetensors has 100 bytes" in proc.stderr


def test_resume_from_a_path_that_is_not_a_checkpoint(run_cli, tmp_path):
    code, _, err = run_cli("train", QS, f"train.resume={tmp_path}", f"output.dir={tmp_path}/r")
    assert code == 2 and "cannot resume from" in err and "Traceback" not in err


def test_checkpoint_of_another_model_is_refused(tiny_bert, tmp_path, run_cli):
    run = tmp_path / "r"
    over = tiny_overrides(tiny_bert, run, **{"train.max_steps": 4, "train.save_every": 4, "train.eval_every": None,
                                             "tracking.report_to": "[]", "data.max_examples": 200})
    _run(QS, over)
    code, _, err = run_cli("train", QS, "model.name_or_path=minilm-l6", f"train.resume={run}/checkpoints/step-00000004",
                           f"output.dir={tmp_path}/other")
    assert code == 2 and "is of another model" in err and "minilm-l6" in err and "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_saves_exits_zero_and_resumes_exactly(sig, tiny_bert, tmp_path):
    """No periodic checkpoints: the signal alone makes the run finish its step, save, and exit 0; rerunning resumes."""
    over = lambda out: tiny_overrides(tiny_bert, out, **{"train.max_steps": 40, "train.log_every": 1, "train.eval_every": None,  # noqa: E731
                                                          "tracking.report_to": "[]", "data.max_examples": 200})
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(QS, over(ref))
    proc = subprocess.Popen(_cmd(QS, over(run)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        log = run / "log.jsonl"
        if log.is_file() and any(json.loads(line)["step"] >= 5 for line in log.read_text().splitlines() if line.strip()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = int(re.search(r"preempted \(signal \d+\) at step (\d+): checkpoint saved", out).group(1))
    assert 5 <= stopped < 40 and (run / "checkpoints" / f"step-{stopped:08d}").is_dir()
    assert not (run / "metrics.json").exists()  # not a finished run
    again = _run(QS, over(run))
    assert f"resumed from step-{stopped:08d} at step {stopped}" in again
    assert _losses(run) == _losses(ref)
