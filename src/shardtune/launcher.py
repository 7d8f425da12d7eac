"""Build `accelerate launch` commands and render sbatch scripts. Pure functions: they
read no environment, no files and start nothing, so their output is golden-tested;
`cli.py` reads the templates in slurm/, prints, writes, runs and submits.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shardtune import ShardtuneError
from shardtune.config import STRATEGIES

DEEPSPEED_STRATEGIES = ("zero1", "zero2", "zero3", "zero3_offload")
GPU_ONLY = ("single_gpu", "ddp")


@dataclass
class LaunchSpec:
    """What one launch needs; `gpus` is per node (0 = CPU processes)."""

    config: str
    strategy: str
    launch_dir: Path
    gpus: int = 0
    processes: int | None = None  # CPU processes per node (gpus 0); default 2
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
    for flag, value, least in (("--gpus", spec.gpus, 0), ("--processes", spec.processes, 1), ("--nodes", spec.nodes, 1)):
        if value is not None and value < least:
            raise ShardtuneError(f"{flag} {value} must be at least {least}" + (" (0 = CPU processes)." if flag == "--gpus" else "."))
    if spec.strategy in GPU_ONLY and spec.gpus == 0:
        raise ShardtuneError(
            f"strategy {spec.strategy} needs CUDA GPUs; on CPU use cpu (DDP over gloo), zero1, zero2, zero3, zero3_offload or fsdp."
        )
    if spec.strategy == "single_gpu" and (spec.gpus != 1 or spec.nodes != 1):
        raise ShardtuneError("strategy single_gpu runs one process on one GPU; use ddp for more GPUs.")
    if spec.nodes > 1 and not spec.main_address:
        raise ShardtuneError("a multi-node launch needs --main-address (the first node's address).")
    if not 0 <= spec.node_rank < spec.nodes:
        raise ShardtuneError(f"--node-rank {spec.node_rank} must be in [0, {spec.nodes - 1}] for {spec.nodes} nodes.")
    if not 1024 <= spec.main_port <= 65535:
        raise ShardtuneError(f"--main-port {spec.main_port} is not a usable TCP port; pick one in [1024, 65535], e.g. 29500.")


def processes_per_node(spec: LaunchSpec) -> int:
    return spec.gpus if spec.gpus > 0 else (spec.processes or 2)


def build_command(spec: LaunchSpec) -> list[str]:
    """The `accelerate launch ...` argv for a run; one process in all needs no launcher: `shardtune train` itself.
    The strategy travels as `dist.strategy=S` too, which is how a CPU FSDP2 run (launched as plain CPU processes,
    since Accelerate's FSDP launch wants GPUs) knows it is one."""
    check(spec)
    per_node = processes_per_node(spec)
    train = ["-m", "shardtune.cli", "train", spec.config, *spec.overrides, f"dist.strategy={spec.strategy}"]
    if per_node * spec.nodes == 1 and not spec.extra:
        return [spec.python, *train]
    config = "cpu" if spec.strategy == "fsdp" and spec.gpus == 0 else spec.strategy
    cmd = [spec.python, "-m", "accelerate.commands.launch", "--config_file", str(spec.launch_dir / f"{config}.yaml")]
    if spec.strategy in DEEPSPEED_STRATEGIES:
        cmd += ["--deepspeed_config_file", str(spec.launch_dir / "deepspeed" / f"{spec.strategy}.json")]
    elif config != "single_gpu" and spec.gpus == 0:
        cmd += ["--multi_gpu"]  # torchrun-style spawn; each process then picks gloo on CPU (distributed/)
    cmd += ["--num_processes", str(per_node * spec.nodes), "--num_machines", str(spec.nodes)]
    if spec.nodes > 1:
        cmd += ["--machine_rank", str(spec.node_rank), "--main_process_ip", spec.main_address]
        if spec.strategy in DEEPSPEED_STRATEGIES:
            cmd += ["--deepspeed_multinode_launcher", "standard"]  # torchrun on each node, no pdsh/ssh
    cmd += ["--main_process_port", str(spec.main_port)]
    cmd += list(spec.extra)
    return cmd + train


def render(cmd: list[str]) -> str:
    return shlex.join(cmd)


def find_launch_dir(cwd: Path, package_file: Path) -> Path:
    """`./launch` when run from the repo root, else the checkout's launch/ beside src/."""
    for candidate in (cwd / "launch", package_file.resolve().parents[2] / "launch"):
        if (candidate / "cpu.yaml").is_file():
            return candidate.resolve()
    raise ShardtuneError("no launch/ folder with the strategy configs found; run from the shardtune checkout or pass --launch-dir.")


# ---------------------------------------------------------------- Slurm

RUN_BLOCK_START, RUN_BLOCK_END = "# >>> run", "# <<< run"
# options `shardtune launch --slurm` sets itself; an --sbatch line with one of them replaces ours
SLURM_OWN = ("--job-name", "--nodes", "--gpus-per-node", "--output", "--partition", "--time", "--account")


@dataclass
class SlurmJob:
    """What `shardtune launch --slurm` writes into a job script; `gpus_per_node` 0 = CPU processes."""

    config: str  # absolute: the job may start in another folder
    shardtune: list[str]  # the command on the nodes, e.g. [python, -m, shardtune.cli]
    output: str  # the Slurm log of the job (%j = job id); appended to across requeues
    job_name: str = "shardtune"
    nodes: int = 1
    gpus_per_node: int = 0
    launch_args: list[str] = field(default_factory=list)  # more `shardtune launch` options (--strategy, --processes)
    overrides: list[str] = field(default_factory=list)
    dist_timeout_minutes: float = 30
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    sbatch: list[str] = field(default_factory=list)  # extra #SBATCH options, as given


def slurm_template(nodes: int) -> str:
    """The file in slurm/ a job of `nodes` nodes is rendered from."""
    return "train.sbatch" if nodes == 1 else "multinode.sbatch"


def check_slurm(job: SlurmJob) -> None:
    if job.nodes < 1:
        raise ShardtuneError(f"--nodes {job.nodes} must be at least 1.")
    if job.gpus_per_node < 0:
        raise ShardtuneError(f"--gpus-per-node {job.gpus_per_node} must be 0 (CPU processes) or more.")
    if not job.job_name or any(c.isspace() for c in job.job_name):
        raise ShardtuneError(f"--job-name {job.job_name!r} must be one word without spaces, e.g. {'-'.join(job.job_name.split()) or 'shardtune'}.")
    for line in job.sbatch:
        if not line.startswith("-") or "\n" in line:
            raise ShardtuneError(f"--sbatch {line!r} is not one sbatch option; pass each as --sbatch=--mem=64G (repeat --sbatch for more).")
        if _option(line) in ("--array", "-a"):
            raise ShardtuneError("--sbatch --array would make every array task share one run folder; submit one job per run instead.")


def _option(directive: str) -> str:
    """`--time=1:00:00` -> `--time`; `-p gpu` -> `-p`."""
    return directive.split("=", 1)[0].split(None, 1)[0]


def _directives(job: SlurmJob) -> list[str]:
    own = {
        "--job-name": job.job_name, "--nodes": str(job.nodes), "--gpus-per-node": str(job.gpus_per_node) if job.gpus_per_node else None,
        "--output": job.output, "--partition": job.partition, "--time": job.time, "--account": job.account,
    }
    return [f"{k}={v}" for k, v in own.items() if v is not None]


def render_sbatch(template: str, job: SlurmJob) -> str:
    """The template (slurm/train.sbatch or multinode.sbatch) for this one job: its #SBATCH lines with the job's
    resources, and its run block with the command, config and overrides; the rest of the script is kept as is."""
    check_slurm(job)
    lines = template.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(RUN_BLOCK_START))
        end = next(i for i, line in enumerate(lines) if line.startswith(RUN_BLOCK_END))
    except StopIteration:
        raise ShardtuneError(f"the sbatch template has no `{RUN_BLOCK_START}` ... `{RUN_BLOCK_END}` block; restore slurm/ from the shardtune checkout.") from None
    replaced = set(SLURM_OWN) | {_option(d) for d in job.sbatch}
    head = [line for line in lines[:start] if not (line.startswith("#SBATCH") and _option(line[len("#SBATCH"):].strip()) in replaced)]
    last = max(i for i, line in enumerate(head) if line.startswith("#SBATCH") or i == 0)
    directives = [f"#SBATCH {d}" for d in _directives(job) + job.sbatch]
    run = [
        f"{RUN_BLOCK_START}: written by `shardtune launch --slurm` for this run",
        f"SHARDTUNE=({shlex.join(job.shardtune)})",
        f"LAUNCH_ARGS=({shlex.join(job.launch_args)})",
        f"DIST_TIMEOUT_MINUTES={job.dist_timeout_minutes:g}",
        f"set -- {shlex.join([job.config, *job.overrides])}",
        lines[end],
    ]
    return "\n".join(head[: last + 1] + directives + head[last + 1 :] + run + lines[end + 1 :]) + "\n"
