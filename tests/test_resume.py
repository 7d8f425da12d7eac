"""Checkpoints and resume: torn and damaged checkpoints, refused resumes, config changes, counters, W&B continuity, the resume line (exact resume after kills: tests/test_faults.py; after signals: tests/test_signals.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_overrides
import forklaunch
from forklaunch import free_port

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


def _one(config, overrides, **kw) -> subprocess.CompletedProcess:
    """`shardtune train` as one process (forked from the preloaded server: tests/forklaunch.py)."""
    return forklaunch.run(["train", str(config), *overrides], **kw)


def _run(config, overrides) -> str:
    proc = _one(config, overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_torn_newest_checkpoint_falls_back_to_the_previous_one(tiny_bert, tmp_path):
    run = tmp_path / "r"
    over = tiny_overrides(tiny_bert, run, **{"train.max_steps": 8, "train.save_every": 4, "train.eval_every": None,
                                             "tracking.report_to": "[]", "data.max_examples": 200, "train.log_every": 1})
    _run(QS, over)
    newest = run / "checkpoints" / "step-00000008"
    victim = newest / "dcp" / "__0_0.distcp"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    proc = _one(QS, over[:-1] + ["train.max_steps=10"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step-00000004 at step 4" in proc.stdout
    assert "skipping incomplete checkpoint" in proc.stderr and "dcp/__0_0.distcp has 100 bytes" in proc.stderr


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


@pytest.fixture(scope="module")
def zero2_run(tiny_bert, tmp_path_factory):
    """A real 2-process ZeRO-2 run with checkpoints at steps 2 and 4: per-rank optimizer shards, model states, RNG files."""
    run = tmp_path_factory.mktemp("zero2") / "run"
    over = tiny_overrides(tiny_bert, run, **{"train.max_steps": 4, "train.save_every": 2, "train.eval_every": None,
                                             "tracking.report_to": "[]", "data.max_examples": 200, "train.batch_size": 8})
    cmd = [sys.executable, "-m", "shardtune.cli", "launch", str(QS), "--strategy", "zero2", "--gpus", "0", "--processes", "2",
           "--main-port", str(free_port()), *over]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, over, cmd


def _damaged_copy(run, tmp_path, name: str, how: str):
    import shutil

    copy = tmp_path / f"{how}-{name.replace('/', '_')}"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    victim = copy / "checkpoints" / name
    if how == "delete":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return copy


def test_any_single_damaged_file_of_the_newest_checkpoint_falls_back_with_a_warning(zero2_run, tmp_path):
    """Every file of the newest checkpoint (each rank's shards, model states, RNG, trainer state, manifest), deleted
    or truncated: `resume: auto` takes the previous complete checkpoint and warns naming the damage. A damaged
    `latest` pointer: it warns and takes the newest complete checkpoint, whose files are all intact."""
    import warnings

    from shardtune.checkpoint import find_checkpoint

    run = zero2_run[0]
    newest = run / "checkpoints" / "step-00000004"
    files = sorted(str(p.relative_to(run / "checkpoints")) for p in newest.rglob("*") if p.is_file())
    assert any("zero_pp_rank_1" in f for f in files) and any("manifest" in f for f in files), files
    for name in [*files, "latest"]:
        for how in ("delete", "truncate"):
            copy = _damaged_copy(run, tmp_path, name, how)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                found = find_checkpoint(copy, "auto")
            said = " ".join(str(w.message) for w in caught)
            want = "step-00000004" if name == "latest" else "step-00000002"
            assert found is not None and found.name == want, (name, how, found)
            assert ("checkpoint pointer" if name == "latest" else "skipping incomplete checkpoint") in said, (name, how, said)


def test_a_run_resumes_past_a_deleted_zero_shard(zero2_run):
    """The loop itself, 2 processes: rank 1's optimizer shard of the newest checkpoint is gone -> resume from the one before."""
    run, over, cmd = zero2_run
    shard = next((run / "checkpoints" / "step-00000004").rglob("*zero_pp_rank_1*optim_states.pt"))
    shard.unlink()
    proc = subprocess.run([*cmd, "train.max_steps=6"], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step-00000002 at step 2" in proc.stdout
    assert "skipping incomplete checkpoint" in proc.stderr and "zero_pp_rank_1" in proc.stderr


def test_a_changed_config_is_reported_key_by_key_on_resume(tiny_bert, tmp_path):
    run = tmp_path / "r"
    over = tiny_overrides(tiny_bert, run, **{"train.max_steps": 4, "train.save_every": 4, "train.eval_every": None,
                                             "tracking.report_to": "[]", "data.max_examples": 200})
    _run(QS, over)
    import hashlib

    state = json.loads((run / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["config_sha256"] == hashlib.sha256(json.dumps(state["config"], sort_keys=True).encode()).hexdigest()
    assert state["config"]["optim"]["lr"] == 1e-3 and state["run"]["step"] == 4
    proc = _one(QS, [*over, "train.max_steps=6", "optim.lr=5e-4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step-00000004 at step 4" in proc.stdout
    report = next(line for line in proc.stderr.splitlines() if "resuming with a config that differs" in line)
    assert "optim.lr: 0.001 -> 0.0005" in report and "train.max_steps: 4 -> 6" in report
    assert report.count(" -> ") == 2, report  # nothing else changed


def test_save_every_minutes_and_the_best_checkpoint_is_kept(tiny_bert, tmp_path):
    """A tiny time budget checkpoints at every step; rotation keeps the newest N plus the best eval's checkpoint
    (at lr 5e-3 this tiny model's eval loss is lowest at step 2, so only the kept-best rule can keep that one)."""
    run = tmp_path / "r"
    _run(QS, tiny_overrides(tiny_bert, run, **{"train.max_steps": 8, "train.save_every_minutes": 1e-6, "train.eval_every": 2,
                                               "train.metric_for_best": "eval/loss", "optim.lr": 5e-3,
                                               "train.save_total_limit": 3, "tracking.report_to": "[]", "data.max_examples": 200}))
    best = json.loads((run / "metrics.json").read_text())["best/step"]
    assert best < 6
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert kept == [f"step-{best:08d}", "step-00000006", "step-00000007", "step-00000008"]  # no save_every: the clock did it


def test_counters_survive_a_checkpoint_between_log_steps(tiny_bert, tmp_path):
    """Samples and tokens counted since the last log line are in the checkpoint: killed after step 5 (checkpoint 3,
    log lines at 4 and 8), the resumed run ends with the uninterrupted run's totals."""
    over = lambda out: tiny_overrides(tiny_bert, out, **{"train.max_steps": 8, "train.log_every": 4, "train.save_every": 3,  # noqa: E731
                                                          "train.eval_every": None, "tracking.report_to": "[]", "data.max_examples": 200,
                                                          "train.async_save": "false"})  # the kill at 5 finds step 3
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(QS, over(ref))
    killed = _one(QS, over(run), env={**os.environ, "SHARDTUNE_FAILPOINTS": "kill@step=5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "resumed from step-00000003 at step 3" in _run(QS, over(run))
    want, got = (json.loads((r / "metrics.json").read_text()) for r in (ref, run))
    assert (got["train/samples"], got["train/tokens"]) == (want["train/samples"], want["train/tokens"]) and want["train/samples"] > 0


def test_sigterm_to_every_process_still_saves_and_resumes_into_the_same_wandb_run(tiny_bert, tmp_path):
    """What Slurm does on preemption or scancel: SIGTERM to every process of the job, W&B's service included.
    The run saves anyway (before it talks to W&B again), exits 0, and the rerun continues the same W&B run."""
    import wandb_reader

    run = tmp_path / "run"
    over = tiny_overrides(tiny_bert, run, **{"train.max_steps": 400, "train.log_every": 1, "train.eval_every": None,
                                             "data.max_examples": 200, "tracking.project": "shardtune-tests"})
    own_service = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # not this pytest's: the run starts its own
    # term@step=5: SIGTERM to the run and every process under it (W&B's service too), as Slurm does, at a step the
    # run cannot have passed (a poll of log.jsonl could miss a run that already ended)
    env = {**own_service, "SHARDTUNE_FAILPOINTS": "term@step=5"}
    proc = subprocess.Popen(_cmd(QS, over), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = proc.communicate(timeout=300)
    signalled = re.search(r"failpoint: SIGTERM to rank 0 at step 5 and its (\d+) child process", out)
    assert signalled and int(signalled.group(1)) >= 1, out[-2000:]  # W&B's service is one of them
    assert proc.returncode == 0, err[-3000:]
    stopped = int(re.search(r"preempted \(signal 15\) at step (\d+): checkpoint saved", out).group(1))
    first = wandb_reader.run_file(run)  # what its killed service managed to write is W&B's business; the id is in the name
    again = _run(QS, [*over, "train.max_steps=" + str(stopped + 3)])
    assert f"resumed from step-{stopped:08d} at step {stopped}" in again
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and first.name == files[-1].name == f"run-{wandb_reader.run_info(files[-1]).run_id}.wandb"
    assert [r["_step"] for r in wandb_reader.history(files[-1]) if "train/loss" in r] == [stopped + 1, stopped + 2, stopped + 3]


def test_a_stopped_run_without_output_dir_says_the_command_that_resumes_it(tiny_bert, tmp_path):
    """Outside Slurm the default run folder has a timestamp: the stop line pins it, and running that line resumes."""
    import shlex

    over = tiny_overrides(tiny_bert, tmp_path / "unused", **{"train.max_steps": 8, "train.eval_every": None, "tracking.report_to": "[]",
                                                             "data.max_examples": 200, "train.log_every": 1})
    over = [o for o in over if not o.startswith("output.dir=")]
    env = {**os.environ, "SHARDTUNE_FAILPOINTS": "usr1@step=3"}
    proc = _one(QS, over, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stopped = int(re.search(r"preempted \(signal 10\) at step (\d+)", proc.stdout).group(1))  # the step after 3 (in flight)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("to resume, run: "))
    argv = shlex.split(line.removeprefix("to resume, run: "))
    assert argv[:2] == ["shardtune", "train"] and argv[-1].startswith("output.dir=runs/quickstart-"), argv
    again = subprocess.run([sys.executable, "-m", "shardtune.cli", *argv[1:]], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0 and f"resumed from step-{stopped:08d} at step {stopped}" in again.stdout, again.stderr[-3000:]
