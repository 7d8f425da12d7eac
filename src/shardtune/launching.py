"""`shardtune launch`: resolve and check the run in this one process, then exec `accelerate launch` (or render and
submit a Slurm job). Everything the ranks would refuse without a model (strategy, precision, mesh) and with the
model's shape alone (its positions, heads and sequence against the mesh: read on the meta device, no weights) is
refused here in one sentence, before anything is spawned; `strategy: auto` is chosen here too.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shardtune import ShardtuneError


def precheck(cfg, strategy: str, world: int, cuda: bool, per_node: int) -> None:
    """What the ranks would refuse, refused here: the strategy, precision and mesh for this launch, then the model's
    positions and shape against the config and mesh (the model built on the meta device)."""
    from shardtune.distributed import check_launch
    from shardtune.mesh import check_run, resolve
    from shardtune.models import check_positions
    from shardtune.plan_memory import meta_model

    check_launch(cfg, strategy, world, cuda, per_node)
    model = meta_model(cfg)
    check_positions(model, cfg)
    if strategy == "fsdp":
        check_run(resolve(cfg.dist.mesh, world, strategy, per_node if cuda else None), model.config, cfg)


def auto_strategy(cfg, gpus: int, nodes: int, gpu_memory: int | None = None):
    """`strategy: auto` -> (strategy, why, mesh): the fastest layout that fits this machine's GPUs by the planner's
    predicted step time. A dist.mesh the config sets is kept (only layouts it runs); else the mesh is chosen too."""
    import torch

    from shardtune.mesh import Mesh

    if gpus == 0:
        return "cpu", "no GPUs, so CPU processes over gloo", Mesh(dp_shard=1)
    from shardtune.plan import choose_strategy
    from shardtune.plan_time import GPUS, Cluster, gpu_spec

    memory = gpu_memory if gpu_memory is not None else torch.cuda.get_device_properties(0).total_memory
    try:
        spec = gpu_spec(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else GPUS["h100"]
    except ShardtuneError:
        spec = GPUS["h100"]  # an unknown GPU: the memory plan is exact, the step times are an H100's
    strategy, why, mesh = choose_strategy(cfg, gpus, memory, nodes, cluster=Cluster(spec, gpus, nodes),
                                          launchable=not cfg.dist.mesh.is_default)
    return ("single_gpu" if strategy == "ddp" and gpus * nodes == 1 else strategy), why, mesh


MESH_FLAGS = ("dp_replicate", "dp_shard", "tp", "sp")


def mesh_overrides(args: argparse.Namespace) -> list[str]:
    """--tp 2 and the other mesh flags of `shardtune launch` as dist.mesh.* overrides."""
    return [f"dist.mesh.{axis}={getattr(args, axis)}" for axis in MESH_FLAGS if getattr(args, axis) is not None]


def cmd_launch(args: argparse.Namespace, extra: list[str], command: str) -> int:
    import signal

    import torch

    from shardtune.config import load_config
    from shardtune.launcher import LaunchSpec, build_command, default_strategy, find_launch_dir, render

    args.overrides = list(args.overrides) + mesh_overrides(args)
    cfg = load_config(args.config, args.overrides)  # fail here, not in N processes
    if args.slurm:
        return launch_slurm(args, cfg, extra)
    gpus = args.gpus if args.gpus is not None else torch.cuda.device_count()
    strategy = args.strategy or cfg.dist.strategy or default_strategy(gpus)
    overrides = list(args.overrides)
    if strategy == "auto":
        strategy, why, mesh = auto_strategy(cfg, gpus, args.nodes)
        print(f"strategy auto -> {strategy}: {why}", flush=True)  # dist.strategy=S in the command records the choice
        if cfg.dist.mesh.is_default and not mesh.one_axis:  # the chosen mesh travels as overrides, as the strategy does
            overrides += [f"dist.mesh.{axis}={getattr(mesh, axis)}" for axis in MESH_FLAGS if getattr(mesh, axis) != 1]
            cfg = load_config(args.config, overrides)
    spec = LaunchSpec(
        config=args.config,
        strategy=strategy,
        launch_dir=args.launch_dir or find_launch_dir(Path.cwd(), Path(__file__)),
        gpus=gpus,
        processes=args.processes,
        nodes=args.nodes,
        node_rank=args.node_rank or 0,
        main_address=args.main_address,
        main_port=args.main_port or 29500,
        overrides=overrides,
        extra=extra,
    )
    from shardtune.launcher import processes_per_node

    per_node = processes_per_node(spec)
    precheck(cfg, strategy, per_node * args.nodes, gpus > 0, per_node)  # one sentence here, not one per rank
    cmd = build_command(spec)
    print(render(cmd), flush=True)
    if args.dry_run:
        return 0
    # Under Slurm a signal reaches every process of the job step. SIGUSR1 means "save and requeue" to
    # the ranks (preempt.py installs their handler), but would kill the torchrun agent, which does not
    # handle it; ignored here, it stays ignored across exec in the agent. Exec, not a child: no process
    # between Slurm and the agent that SIGTERM could end early (the step ends when its task does).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.environ["SHARDTUNE_LAUNCH_COMMAND"] = command  # the ranks' way to say how to resume the launch (set only here: exec)
    os.execv(cmd[0], cmd)


def launch_slurm(args: argparse.Namespace, cfg, extra: list[str]) -> int:
    """Render slurm/train.sbatch or multinode.sbatch for this run, write it beside the run folder and submit it."""
    import shutil
    import subprocess

    from shardtune.checkpoint import choose_run_dir
    from shardtune.launcher import SlurmJob, render_sbatch, slurm_template

    bad = [o for o, v in (("--node-rank", args.node_rank), ("--main-address", args.main_address), ("--main-port", args.main_port)) if v is not None]
    if bad:
        raise ShardtuneError(f"with --slurm the job picks {', '.join(bad)} itself (node ranks, first node, a port from the job id); drop {', '.join(bad)}.")
    if extra:
        raise ShardtuneError("arguments after `--` are not passed on with --slurm; put accelerate options in the launch/ strategy config instead.")
    if args.gpus is None:
        raise ShardtuneError("a Slurm job needs --gpus-per-node G (0 = CPU processes, then --processes P per node).")
    run_dir = choose_run_dir(cfg, Path(args.config).stem).resolve()  # refuses a used folder now, not in the job
    overrides = list(args.overrides) + ([] if cfg.output.dir else [f"output.dir={run_dir}"])  # a requeued job resumes there
    launch_args = ["--gpus", str(args.gpus)] + (["--strategy", args.strategy] if args.strategy else [])
    launch_args += ["--processes", str(args.processes)] if args.processes is not None else []
    per_node = args.gpus or args.processes or 2
    precheck(cfg, args.strategy or cfg.dist.strategy or ("ddp" if args.gpus else "cpu"), per_node * args.nodes, args.gpus > 0, per_node)
    job = SlurmJob(
        config=str(Path(args.config).resolve()), shardtune=[sys.executable, "-m", "shardtune.cli"],
        output=str(run_dir.parent / f"{run_dir.name}.slurm-%j.out"), job_name=args.job_name or run_dir.name, nodes=args.nodes,
        gpus_per_node=args.gpus, launch_args=launch_args, overrides=overrides, dist_timeout_minutes=cfg.dist.timeout_minutes,
        partition=args.partition, time=args.time, account=args.account, sbatch=args.sbatch,
    )
    template = Path(__file__).resolve().parents[2] / "slurm" / slurm_template(args.nodes)
    if not template.is_file():
        raise ShardtuneError(f"the job script template {template} is missing; run from a shardtune checkout (its slurm/ folder).")
    script = render_sbatch(template.read_text(), job)
    if args.dry_run:
        print(script, end="")
        return 0
    if shutil.which("sbatch") is None:
        raise ShardtuneError("`sbatch` is not on PATH, so the job cannot be submitted from here; run this on a Slurm login node (or add --dry-run to print the script).")
    path = run_dir.parent / f"{run_dir.name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(f"job script: {path}", flush=True)
    proc = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no message"])[-1].removeprefix("sbatch: error: ")
        raise ShardtuneError(f"sbatch refused {path} ({why}); fix the Slurm options (--partition, --account, --time, --sbatch) and submit again.")
    print(proc.stdout.strip(), flush=True)  # "Submitted batch job N"
    job_id = proc.stdout.split()[-1] if proc.stdout.strip() else "%j"
    print(f"Slurm log: {job.output.replace('%j', job_id)}; the run folder: {run_dir}", flush=True)
    return 0
