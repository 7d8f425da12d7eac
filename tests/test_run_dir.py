"""The default run folder: under Slurm it comes from the job id (array tasks: array job id and task id), so a
requeued job finds its folder again; outside Slurm it carries a timestamp. A used folder is never clobbered.
(The whole path, sbatch -> preempt -> requeue -> resume, runs on a real cluster in tests/test_slurm.py.)"""

from __future__ import annotations

import pytest

from shardtune import ShardtuneError
from shardtune.checkpoint import CKPT_DIR, choose_run_dir, slurm_job
from shardtune.config import Config

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_CLUSTER_NAME", "SLURM_RESTART_COUNT")


@pytest.fixture
def job_env(monkeypatch, tmp_path):
    """Run from tmp_path with no Slurm variables; returns a setter for them."""
    monkeypatch.chdir(tmp_path)
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    return set_env


def test_slurm_job_names_a_job_and_an_array_task():
    assert slurm_job({}) is None
    assert slurm_job({"SLURM_JOB_ID": "812", "SLURM_CLUSTER_NAME": "big"}) == ("slurm-big-812", 0)
    task = {"SLURM_JOB_ID": "815", "SLURM_ARRAY_JOB_ID": "812", "SLURM_ARRAY_TASK_ID": "3", "SLURM_CLUSTER_NAME": "big", "SLURM_RESTART_COUNT": "2"}
    assert slurm_job(task) == ("slurm-big-812_3", 2)
    assert slurm_job({"SLURM_JOB_ID": "9"}) == ("slurm-cluster-9", 0)  # the same fallback as slurm/*.sbatch


def test_outside_slurm_the_folder_carries_the_time(job_env):
    path = choose_run_dir(Config(), "quickstart")
    assert path.parent.name == "runs" and path.name.startswith("quickstart-2") and "slurm" not in path.name


def test_under_slurm_every_start_of_a_job_gets_the_same_folder(job_env):
    job_env(SLURM_JOB_ID=815, SLURM_ARRAY_JOB_ID=812, SLURM_ARRAY_TASK_ID=3, SLURM_CLUSTER_NAME="big")
    first = choose_run_dir(Config(), "quickstart")
    assert str(first) == "runs/quickstart-slurm-big-812_3"
    (first / CKPT_DIR / "step-00000005").mkdir(parents=True)  # the first start saved a checkpoint, then was requeued
    job_env(SLURM_RESTART_COUNT=1)
    assert choose_run_dir(Config(), "quickstart") == first


def test_a_requeued_job_without_a_checkpoint_starts_over_in_its_folder(job_env):
    job_env(SLURM_JOB_ID=40, SLURM_CLUSTER_NAME="c")
    path = choose_run_dir(Config(), "q")
    path.mkdir(parents=True)
    (path / "log.jsonl").write_text("{}\n")
    job_env(SLURM_RESTART_COUNT=1)
    assert choose_run_dir(Config(), "q") == path


def test_a_used_job_folder_of_a_job_never_requeued_is_refused(job_env):
    """A second run in one allocation, or a job id reused by a reset cluster: not this job's folder to resume."""
    job_env(SLURM_JOB_ID=40, SLURM_CLUSTER_NAME="c")
    path = choose_run_dir(Config(), "q")
    (path / CKPT_DIR / "step-00000005").mkdir(parents=True)
    with pytest.raises(ShardtuneError) as err:
        choose_run_dir(Config(), "q")
    assert "named after Slurm job slurm-c-40, which has not been requeued" in str(err.value) and "set output.dir" in str(err.value)


def test_output_dir_wins_over_the_job_id(job_env, tmp_path):
    job_env(SLURM_JOB_ID=40)
    cfg = Config.model_validate({"output": {"dir": str(tmp_path / "mine")}})
    assert choose_run_dir(cfg, "q") == tmp_path / "mine"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(ShardtuneError, match="is not empty"):
        choose_run_dir(cfg, "q")
