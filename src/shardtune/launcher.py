"""Build `accelerate launch` commands. Pure functions: they read no environment and
start nothing, so their output is golden-tested; `cli.py` prints and runs it.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shardtune import ShardtuneError
from shardtune.config import STRATEGIES

DEEPSPEED_STRATEGIES = ("zero1", "zero2", "zero3", "zero3_offload")
GPU_ONLY = ("single_gpu", "ddp", "fsdp")


@dataclass
class LaunchSpec:
    """What one launch needs; `gpus` is per node (0 = CPU processes)."""

    config: str
    strategy: str
    launch_dir: Path
    gpus: int = 0
    processes: int | None = None  # CPU processes (strategy cpu or DeepSpeed on CPU); default 2
    nodes: int = 1
    node_rank: int = 0
    main_address: str | None = None
    main_port: int = 29500
    overrides: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    python: str = sys.executable


def default_strategy(gpus: int) -> str:
    return "ddp" if gpus > 0 else "cpu"


def check(spec: LaunchSpec) -> None:
    if spec.strategy not in STRATEGIES:
        raise ShardtuneError(f"unknown strategy {spec.strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    if spec.strategy in GPU_ONLY and spec.gpus == 0:
        raise ShardtuneError(
            f"strategy {spec.strategy} needs CUDA GPUs (Accelerate runs it only on GPUs); on CPU use cpu, zero1, zero2, zero3 or zero3_offload."
        )
    if spec.strategy == "single_gpu" and (spec.gpus != 1 or spec.nodes != 1):
        raise ShardtuneError("strategy single_gpu runs one process on one GPU; use ddp for more GPUs.")
    if spec.nodes > 1 and not spec.main_address:
        raise ShardtuneError("a multi-node launch needs --main-address (the first node's address).")
    if not 0 <= spec.node_rank < spec.nodes:
        raise ShardtuneError(f"--node-rank {spec.node_rank} must be in [0, {spec.nodes - 1}] for {spec.nodes} nodes.")


def processes_per_node(spec: LaunchSpec) -> int:
    return spec.gpus if spec.gpus > 0 else (spec.processes or 2)


def build_command(spec: LaunchSpec) -> list[str]:
    """The `accelerate launch ...` argv for a run."""
    check(spec)
    per_node = processes_per_node(spec)
    cmd = [spec.python, "-m", "accelerate.commands.launch", "--config_file", str(spec.launch_dir / f"{spec.strategy}.yaml")]
    if spec.strategy in DEEPSPEED_STRATEGIES:
        cmd += ["--deepspeed_config_file", str(spec.launch_dir / "deepspeed" / f"{spec.strategy}.json")]
    elif spec.strategy != "single_gpu" and spec.gpus == 0:
        cmd += ["--multi_gpu"]  # torchrun-style spawn; each process then picks gloo on CPU (dist.py)
    cmd += ["--num_processes", str(per_node * spec.nodes), "--num_machines", str(spec.nodes)]
    if spec.nodes > 1:
        cmd += ["--machine_rank", str(spec.node_rank), "--main_process_ip", spec.main_address]
        if spec.strategy in DEEPSPEED_STRATEGIES:
            cmd += ["--deepspeed_multinode_launcher", "standard"]  # torchrun on each node, no pdsh/ssh
    cmd += ["--main_process_port", str(spec.main_port)]
    cmd += list(spec.extra)
    cmd += ["-m", "shardtune.cli", "train", spec.config, *spec.overrides]
    return cmd


def render(cmd: list[str]) -> str:
    return shlex.join(cmd)


def find_launch_dir(cwd: Path, package_file: Path) -> Path:
    """`./launch` when run from the repo root, else the checkout's launch/ beside src/."""
    for candidate in (cwd / "launch", package_file.resolve().parents[2] / "launch"):
        if (candidate / "cpu.yaml").is_file():
            return candidate.resolve()
    raise ShardtuneError("no launch/ folder with the strategy configs found; run from the shardtune checkout or pass --launch-dir.")
