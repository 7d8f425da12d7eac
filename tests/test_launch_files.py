"""The shipped launch/*.yaml under plain `accelerate launch --config_file launch/X.yaml -m shardtune.cli train CONFIG`:
each starts the processes its comment says, and a process left alone by a multi-process launch refuses to train."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, one_sentence, tiny_overrides

QS = ROOT / "configs" / "quickstart.yaml"
# (launcher Accelerate picks, processes) for each file with no --num_processes; None: Accelerate asks for it
EXPECTED = {
    "cpu": ("multi_gpu_launcher", 2),  # torchrun: 2 CPU processes over gloo
    "single_gpu": ("simple_launcher", 1),
    "ddp": None,  # one per GPU: Accelerate cannot count them, so the launch must say --num_processes
    "fsdp": ("multi_gpu_launcher", 1),
    "zero1": ("deepspeed_launcher", 1), "zero2": ("deepspeed_launcher", 1),
    "zero3": ("deepspeed_launcher", 1), "zero3_offload": ("deepspeed_launcher", 1),
}


def _dispatch(monkeypatch, *argv: str) -> tuple[str, int]:
    """Which of Accelerate's launchers `accelerate launch ARGV script.py` runs, and with how many processes (none run)."""
    from accelerate.commands import launch

    called = []
    for name in ("simple_launcher", "multi_gpu_launcher", "deepspeed_launcher"):
        monkeypatch.setattr(launch, name, lambda args, name=name: called.append((name, int(args.num_processes))))
    launch.launch_command(launch.launch_command_parser().parse_args([*argv, "script.py"]))
    assert len(called) == 1, called
    return called[0]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_launch_file_starts_what_it_says(monkeypatch, name):
    monkeypatch.chdir(ROOT)
    config = ["--config_file", f"launch/{name}.yaml"]
    if EXPECTED[name] is None:
        with pytest.raises(ValueError, match="--num_processes"):
            _dispatch(monkeypatch, *config)
        assert _dispatch(monkeypatch, *config, "--num_processes", "4") == ("multi_gpu_launcher", 4)
    else:
        assert _dispatch(monkeypatch, *config) == EXPECTED[name]


def test_every_shipped_launch_file_is_checked():
    assert sorted(EXPECTED) == sorted(p.stem for p in (ROOT / "launch").glob("*.yaml"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plain_accelerate_launch_of_cpu_yaml_trains_on_two_processes(tiny_bert, tmp_path):
    out = tmp_path / "run"
    over = tiny_overrides(tiny_bert, out, **{"train.max_steps": 2, "train.eval_every": 2, "data.max_examples": 64, "tracking.report_to": "[]"})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/cpu.yaml", "--num_processes", "2",
           "--main_process_port", str(_free_port()), "-m", "shardtune.cli", "train", str(QS), *over]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout + done.stderr
    assert json.loads((out / "metrics.json").read_text())["dist/num_processes"] == 2


def test_a_lone_process_of_a_multi_process_launch_refuses(run_cli, monkeypatch, tiny_bert, tmp_path):
    """What Accelerate's simple launcher leaves the one process it starts for MULTI_CPU (or NO) with --num_processes 2:
    ACCELERATE_USE_CPU and MASTER_ADDR/PORT for the others, no RANK/WORLD_SIZE."""
    for key in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    code, _, err = run_cli("train", QS, *tiny_overrides(tiny_bert, tmp_path / "run", **{"tracking.report_to": "[]"}))
    one_sentence(code, err, "accelerate launch meant several processes but started only this one", "shardtune launch CONFIG",
                 "launch/cpu.yaml")
    assert not (tmp_path / "run").exists()


def test_single_process_torchrun_and_mpirun_launches_are_not_refused(monkeypatch):
    from shardtune.distributed.comm import alone_of_many

    for key in ("RANK", "WORLD_SIZE", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # accelerate launch --config_file launch/single_gpu.yaml: no MASTER_PORT
    assert alone_of_many() is None
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # mpirun: Accelerate forms the group from MPI's ranks
    assert alone_of_many() is None
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("RANK", "0")  # torchrun
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert alone_of_many() is None
