"""The sbatch scripts on a real Slurm cluster on this host (tests/slurm_cluster.py: munged, slurmctld, two slurmd nodes).

Two-node CPU jobs (one rank per node) of a tiny BERT: a job rendered and submitted by `shardtune launch --slurm`
runs to the end; the same job preempted with `scancel --signal=USR1 --batch` saves, requeues itself, resumes
and ends with the uninterrupted job's per-step losses and one W&B run. slurm/train.sbatch submitted with plain
sbatch and no output.dir (2 CPU ranks on one node) as an array task: its folder and W&B run are named after the
array job and task, and preempted and requeued, it resumes in that folder with the same losses.
A streamed causal-LM job (2 ranks x 2 DataLoader workers) preempted the same way logs its uninterrupted twin's losses.

Without Slurm or root these tests skip, except under CI=true, where that is a failure (the only multi-node coverage).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import wandb_reader
from conftest import ROOT, lm_overrides, tiny_overrides
from slurm_cluster import LocalSlurm, missing

QS = ROOT / "configs/quickstart.yaml"
STEPS = 60
LM_STEPS = 80  # one epoch of the test corpus at 2 ranks x 4 x 32 tokens is 81 steps; USR1 after step 5 lands mid-run
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


@pytest.fixture(scope="session")
def slurm():
    reason = missing()
    if reason and _in_ci():
        pytest.fail(f"CI is set, so the Slurm tests must run, but {reason}", pytrace=False)
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(nodes=2).start()
    yield cluster
    cluster.stop()


def _overrides(tiny_bert: Path, run: Path, **extra) -> list[str]:
    return tiny_overrides(tiny_bert, run, **{"train.max_steps": STEPS, "train.log_every": 1, "train.eval_every": None, **extra})


def _submit(slurm: LocalSlurm, tiny_bert: Path, run: Path) -> str:
    """`shardtune launch --slurm` on 2 nodes, 1 CPU rank each: renders slurm/multinode.sbatch beside the run folder and submits it."""
    cmd = [sys.executable, "-m", "shardtune.cli", "launch", str(QS), *_overrides(tiny_bert, run), "--slurm", "--nodes", "2",
           "--gpus-per-node", "0", "--processes", "1", "--strategy", "cpu", "--time", "30:00"]
    # one thread per rank, as torchrun gives the 2 ranks of one node in _sbatch_train: the same matmul blocking, so
    # the same losses to the last bit whichever layout ran them
    env = {**slurm.env, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=run.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"job script: {run.parent / (run.name + '.sbatch')}" in proc.stdout, proc.stdout
    return re.search(r"^Submitted batch job (\d+)$", proc.stdout, re.M).group(1)


def _wait_end(slurm: LocalSlurm, job: str, timeout: float = 300) -> dict[str, str]:
    return slurm.wait_job(job, lambda j: j["JobState"] in ENDED, timeout, "its end")


def _log_path(run: Path, job: str) -> Path:
    """Where `shardtune launch --slurm` puts the job's log: beside the run folder."""
    return run.parent / f"{run.name}.slurm-{job}.out"


def _log(run: Path, job: str) -> str:
    return _log_path(run, job).read_text()


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def _wandb_runs(run: Path) -> list[tuple[str, list[dict]]]:
    """(run id, history) of each offline W&B run file under the run folder, in step order."""
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    runs = [(wandb_reader.run_info(f).run_id, wandb_reader.history(f)) for f in files]
    return sorted(runs, key=lambda r: r[1][0]["_step"] if r[1] else -1)


@pytest.fixture(scope="module")
def full_run(slurm, tiny_bert, tmp_path_factory):
    run = tmp_path_factory.mktemp("slurm") / "full"
    job = _submit(slurm, tiny_bert, run)
    return run, job, _wait_end(slurm, job)


def test_two_node_job_trains_to_the_end(full_run):
    run, job, info = full_run
    log = _log(run, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["NumNodes"] == "2" and info["NodeList"] == "stnode[1-2]"
    for rank in (0, 1):  # one `shardtune launch` per node, each with its node rank, both meeting at the first node
        assert f"--num_machines 2 --machine_rank {rank} --main_process_ip stnode1 --main_process_port {20000 + int(job) % 20000}" in log
    assert "2 process(es)" in log and f"W&B run slurm-shardtune-test-{job}" in log
    assert (run / "model" / "model.safetensors").is_file() and (run / "metrics.json").is_file()
    assert [s for s, _ in _losses(run)] == list(range(1, STEPS + 1))
    (run_id, history), = _wandb_runs(run)
    assert run_id == f"slurm-shardtune-test-{job}" and [h["_step"] for h in history if "train/loss" in h] == list(range(1, STEPS + 1))


def _wait_for_step(slurm: LocalSlurm, run: Path, job: str, step: int, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    asked = 0.0
    while time.time() < deadline:
        if (run / "log.jsonl").is_file() and any(s >= step for s, _ in _losses(run)):
            return
        if time.time() - asked > 1:  # the log is read every 50 ms (the run is seconds long), Slurm asked once a second
            asked = time.time()
            state = slurm.job(job)["JobState"]
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} is {state} before step {step}: {log.read_text()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"job {job} did not reach step {step} within {timeout:.0f}s")


def _preempt_and_requeue(slurm: LocalSlurm, run: Path, job: str, log: Path) -> dict[str, str]:
    """USR1 to the batch shell after step 5 (what --signal=B:USR1@120 does before the time limit); once the job is
    requeued, release it from Slurm's hold and wait for its end."""
    _wait_for_step(slurm, run, job, 5, log)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    pending = slurm.wait_job(job, lambda j: j["Restarts"] == "1" and j["JobState"] == "PENDING", 120, "requeued")
    assert pending["Reason"] == "BeginTime"  # Slurm holds a requeued job for ~2 minutes; release it now
    slurm.release(job)
    return _wait_end(slurm, job)


def test_usr1_saves_requeues_and_resumes_exactly_into_the_same_wandb_run(slurm, tiny_bert, tmp_path, full_run):
    run = tmp_path / "preempted"
    job = _submit(slurm, tiny_bert, run)
    info = _preempt_and_requeue(slurm, run, job, _log_path(run, job))
    log = _log(run, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", log[-3000:]

    # USR1 went batch shell -> srun -> every process of the step: the ranks caught it, nothing on the way died of it
    assert log.count("USR1 received, forwarding it to the ranks") == 1
    stopped = int(re.search(rf"preempted \(signal {int(signal.SIGUSR1)}\) at step (\d+): checkpoint saved", log).group(1))
    assert 5 <= stopped < STEPS and "User defined signal" not in log
    assert f"requeued job {job}" in log and "(restart 1)" in log
    assert f"resumed from step-{stopped:08d} at step {stopped}" in log
    assert (run / "model" / "model.safetensors").is_file()

    # both halves appended to one log.jsonl: every step once, the uninterrupted job's losses exactly
    full, _, _ = full_run
    assert _losses(run) == _losses(full)
    # and to one W&B run, named after the job: steps 1..stopped, then the rest
    (id1, first), (id2, second) = _wandb_runs(run)
    assert id1 == id2 == f"slurm-shardtune-test-{job}"
    logged = [(h["_step"], h["train/loss"]) for h in first + second if "train/loss" in h]
    assert [s for s, _ in logged] == list(range(1, STEPS + 1)) and max(h["_step"] for h in first) == stopped
    assert logged == _losses(full)  # JSON floats round-trip exactly


def _sbatch_train(slurm: LocalSlurm, tiny_bert: Path, cwd: Path, *options: str, log: str) -> str:
    """slurm/train.sbatch used as its header says: `sbatch [OPTIONS] slurm/train.sbatch CONFIG KEY=VALUE ...` with
    `shardtune` on PATH and no output.dir (the run folder comes from the job id); returns the job id."""
    env = {**slurm.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    overrides = [o for o in _overrides(tiny_bert, cwd / "unused") if not o.startswith("output.dir=")]
    cmd = ["sbatch", "--parsable", *options, "--gpus-per-node=0", f"--output={cwd}/{log}", str(ROOT / "slurm/train.sbatch"), str(QS), *overrides]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def test_train_sbatch_as_an_array_task_without_output_dir_resumes_in_its_task_folder_after_a_requeue(slurm, tiny_bert, tmp_path, full_run):
    """One array task (--array=3) of slurm/train.sbatch, preempted: its folder and W&B run are named after the
    array job and task, and the requeued task resumes in that folder and W&B run."""
    array_job = _sbatch_train(slurm, tiny_bert, tmp_path, "--array=3", log="array-%A_%a.out")
    job, name = f"{array_job}_3", f"slurm-shardtune-test-{array_job}_3"
    run, log = tmp_path / "runs" / f"quickstart-{name}", tmp_path / f"array-{job}.out"
    info = _preempt_and_requeue(slurm, run, job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", text[-3000:]
    assert info["NumNodes"] == "1" and "2 process(es)" in text  # one node, shardtune launch's default of 2 CPU ranks
    stopped = int(re.search(rf"preempted \(signal {int(signal.SIGUSR1)}\) at step (\d+): checkpoint saved", text).group(1))
    assert 5 <= stopped < STEPS and "(restart 1)" in text
    assert f"-> runs/{run.name}, resumed from step-{stopped:08d} at step {stopped}" in text
    assert sorted((tmp_path / "runs").iterdir()) == [run] and (run / "model" / "model.safetensors").is_file()
    # every step once, the uninterrupted 2-rank job's losses exactly (2 ranks on one node here, one per node there)
    full, _, _ = full_run
    assert _losses(run) == _losses(full)
    (id1, first), (id2, second) = _wandb_runs(run)
    assert id1 == id2 == name and max(h["_step"] for h in first) == stopped


def _sbatch_stream(slurm: LocalSlurm, tokenizer: Path, corpus: Path, cwd: Path, name: str) -> tuple[str, Path, Path]:
    """slurm/train.sbatch on the streamed data stage: a tiny Llama trained from scratch on the real corpus, 2 CPU
    ranks on one node with 2 DataLoader workers each (4 data slots reading their own partitions), dropout on;
    returns (job id, run folder, job log)."""
    config = cwd / "lm.yaml"
    config.write_text("task: causal_lm\n")
    run = cwd / name
    over = lm_overrides(tokenizer, corpus, run, **{"train.max_steps": LM_STEPS, "train.eval_every": None, "data.num_workers": 2,
                                                   "data.holdout": 0, "model.dropout": 0.1})
    env = {**slurm.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", f"--output={cwd}/{name}-%j.out", str(ROOT / "slurm/train.sbatch"), str(config), *over]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    return job, run, cwd / f"{name}-{job}.out"


def test_a_streamed_run_preempted_requeued_and_resumed_logs_its_uninterrupted_twins_losses(slurm, tiny_lm_tokenizer, lm_corpus, tmp_path):
    """The same job twice, side by side: one runs through, the other gets USR1 after step 5, saves (every slot's
    partition cursors and carried-over tokens), requeues and resumes; both logs hold every step once with the
    same losses bit for bit, so the resumed job read the same documents in the same order and drew the same dropout."""
    ref_job, ref, ref_log = _sbatch_stream(slurm, tiny_lm_tokenizer, lm_corpus, tmp_path, "reference")
    job, run, log = _sbatch_stream(slurm, tiny_lm_tokenizer, lm_corpus, tmp_path, "preempted")
    info = _preempt_and_requeue(slurm, run, job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", text[-3000:]
    stopped = int(re.search(rf"preempted \(signal {int(signal.SIGUSR1)}\) at step (\d+): checkpoint saved", text).group(1))
    assert 5 <= stopped < LM_STEPS and f"resumed from step-{stopped:08d} at step {stopped}" in text
    ref_info = _wait_end(slurm, ref_job)
    assert ref_info["JobState"] == "COMPLETED" and ref_info["Restarts"] == "0", ref_log.read_text()[-3000:]
    assert [s for s, _ in _losses(run)] == list(range(1, LM_STEPS + 1))
    assert _losses(run) == _losses(ref)


def test_a_refused_submission_is_one_sentence(slurm, tmp_path):
    from conftest import one_sentence

    cmd = [sys.executable, "-m", "shardtune.cli", "launch", str(QS), "--slurm", "--gpus-per-node", "0", "--partition", "nosuch",
           f"output.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, env=slurm.env, capture_output=True, text=True, timeout=120)
    line = one_sentence(proc.returncode, proc.stderr, "sbatch refused", "(Batch job submission failed: Invalid partition name specified)", "--partition")
    assert f"{tmp_path}/run.sbatch" in line and slurm.run("squeue", "-h").stdout.strip() == ""


def test_under_ci_a_machine_without_slurm_fails_these_tests_instead_of_skipping():
    """One of the tests above, run where no Slurm binary is on PATH: skipped normally, an error under CI=true."""
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PATH": str(Path(sys.executable).parent)}  # the venv: no Slurm
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::test_a_refused_submission_is_one_sentence"]
    plain = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    ci = subprocess.run(cmd, env={**env, "CI": "true"}, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and "1 skipped" in plain.stdout, plain.stdout[-2000:]
    assert ci.returncode == 1 and "1 error" in ci.stdout and "CI is set, so the Slurm tests must run, but no local Slurm" in ci.stdout, ci.stdout[-2000:]
