"""`shardtune train|predict|generate ...` — the command line.

User errors (`ShardtuneError`) print one sentence and exit 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from shardtune import ShardtuneError, __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardtune", description="Train and fine-tune language models from one YAML config.")
    p.add_argument("--version", action="version", version=f"shardtune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML config", description="Train from a YAML config.")
    t.add_argument("config", help="YAML config file, e.g. configs/quickstart.yaml")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=3e-5 train.max_steps=50")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    la = sub.add_parser(
        "launch",
        help="launch a run on several processes/GPUs/nodes, or submit it to Slurm",
        description="Build the `accelerate launch` command for a run, print it and run it; with --slurm, render "
        "slurm/train.sbatch (one node) or slurm/multinode.sbatch for the run and submit it with sbatch. "
        "Arguments after `--` go to accelerate launch.",
    )
    la.add_argument("config", help="YAML config file")
    la.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides passed to the run")
    la.add_argument("--strategy", help="cpu, single_gpu, ddp, zero1, zero2, zero3, zero3_offload, fsdp (default: dist.strategy)")
    la.add_argument("--gpus", "--gpus-per-node", dest="gpus", type=int, help="GPUs per node (default: all visible; 0 = CPU processes)")
    la.add_argument("--processes", type=int, help="CPU processes per node when --gpus is 0 (default 2)")
    la.add_argument("--nodes", type=int, default=1, help="number of nodes")
    la.add_argument("--node-rank", type=int, help="this node's rank (default 0)")
    la.add_argument("--main-address", help="address of node 0 (multi-node)")
    la.add_argument("--main-port", type=int, help="rendezvous port (default 29500)")
    ms = la.add_argument_group("device mesh", "named axes (dist.mesh in the config; README, 'The device mesh'); with --strategy fsdp")
    ms.add_argument("--dp-replicate", type=int, metavar="N", help="data-parallel replicas (HSDP across nodes)")
    ms.add_argument("--dp-shard", type=int, metavar="N", help="FSDP2 shard ranks (-1 = what the other axes leave)")
    ms.add_argument("--tp", type=int, metavar="N", help="tensor-parallel ranks (within a node)")
    ms.add_argument("--sp", type=int, metavar="N", help="sequence-parallel ranks (Ulysses)")
    la.add_argument("--launch-dir", type=Path, help="folder of strategy configs (default: the checkout's launch/)")
    la.add_argument("--dry-run", action="store_true", help="print the command (with --slurm: the job script), do not run or submit it")
    sl = la.add_argument_group("Slurm", "with --slurm: submit the run as a preemptible, requeueing batch job (see docs/slurm.md)")
    sl.add_argument("--slurm", action="store_true", help="render the sbatch script for this run, write it beside the run folder, submit it")
    sl.add_argument("--partition", help="#SBATCH --partition")
    sl.add_argument("--time", help="#SBATCH --time, e.g. 24:00:00 (USR1 comes 120 s before it: save and requeue)")
    sl.add_argument("--account", help="#SBATCH --account")
    sl.add_argument("--job-name", help="#SBATCH --job-name (default: the run folder's name)")
    sl.add_argument("--sbatch", action="append", default=[], metavar="OPTION", help="one more #SBATCH option, e.g. --sbatch=--mem=64G (repeatable)")

    pp = sub.add_parser(
        "preprocess",
        help="show what the streaming stage makes of a causal_lm config, or build its pretokenized cache",
        description="Stream the config's data once: print the first N packed rows decoded, one [doc G] mark per "
        "document, and the stage's stats. With --write DIR, build the pretokenized cache of the split's sources "
        "(P processes; ranks launched with RANK/WORLD_SIZE each build their share, no collectives; rerun to resume), "
        "a training source: data.sources: [{path: DIR, format: packed}].",
    )
    pp.add_argument("config", help="YAML config file with task: causal_lm")
    pp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.seq_len=256")
    pp.add_argument("--show", type=int, default=3, metavar="N", help="packed rows to print decoded (default 3)")
    pp.add_argument("--write", type=Path, metavar="DIR", help="build the pretokenized cache in DIR (new, empty, or an unfinished build of the same settings)")
    pp.add_argument("--processes", type=int, default=1, metavar="P", help="builder processes for --write (per rank under RANK/WORLD_SIZE; default 1)")
    pp.add_argument("--split", choices=("train", "validation"), default="train", help="which split (default: train; --write validation: data.validation_sources)")
    pp.add_argument("--max-rows", type=int, metavar="R", help="stream at most R rows for --show and the stats (default 1000)")

    pl = sub.add_parser(
        "plan",
        help="memory per GPU for each strategy and mesh, predicted step time and tokens/s/GPU: the fastest that fits",
        description="Estimate parameters, gradients, optimizer state and activations per GPU for ddp, zero1/2/3, "
        "zero3_offload and fsdp, then for every device mesh (FSDP2 x HSDP x tensor x sequence parallel) its memory, "
        "predicted step time and tokens/s/GPU (compute at a calibrated fraction of peak, communication per mesh axis "
        "over the link it crosses; docs/benchmarks.md, 'Planner calibration'), and name the fastest that fits. No GPU needed.",
    )
    pl.add_argument("config", help="YAML config file")
    pl.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.batch_size=4")
    pl.add_argument("--gpus", type=int, help="GPUs per node (default: all visible)")
    pl.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80GiB, 80GB, 24G, 81920MiB (default: GPU 0's)")
    pl.add_argument("--nodes", type=int, default=1, help="number of nodes")
    pl.add_argument("--gpu-type", help="h100, h100-pcie, h200, a100, a100-40gb, l40s, a10, rtx4090: peak FLOP/s, memory "
                    "and link defaults (default: GPU 0's type, else h100)")
    pl.add_argument("--intra-node-bandwidth", type=float, metavar="GB/s", help="one-direction GPU-to-GPU bandwidth within a node "
                    "(default: the GPU type's NVLink or PCIe, e.g. 450 for H100 SXM)")
    pl.add_argument("--inter-node-bandwidth", type=float, metavar="GB/s", help="one-direction network bandwidth per GPU across "
                    "nodes (default: 50 = 400 Gb/s per GPU for H100/H200, 25 for A100)")

    ex = sub.add_parser("export", help="checkpoint -> HF safetensors folder", description="Consolidate a checkpoint (ZeRO shards too) into an HF folder.")
    ex.add_argument("checkpoint", help="runs/.../checkpoints/step-N, or in a store: RUN_URL/checkpoints/step-N or RUN_URL (its newest)")
    ex.add_argument("--out", required=True, help="the HF folder to write (a local path or a URL)")
    ex.add_argument("--max-shard-size", default="2GB", help="split weights into files of at most this size")

    pr = sub.add_parser("predict", help="classify texts with a trained run", description="Print label and probabilities.")
    pr.add_argument("run_dir", help="run folder written by `shardtune train` (or its model/ folder; local or a URL)")
    pr.add_argument("texts", nargs="*", help="texts to classify")
    pr.add_argument("--file", help="JSONL/CSV/TSV/parquet file of texts (local or a URL)")
    pr.add_argument("--column", default="text", help="text column in --file (default: text)")
    pr.add_argument("--json", action="store_true", help="one JSON object per line")

    ge = sub.add_parser(
        "generate",
        help="continue a prompt with a trained causal LM",
        description="Load a run's model (merged, or base + LoRA adapter) and print the continuation of PROMPT; greedy unless --temperature > 0.",
    )
    ge.add_argument("run_dir", help="run folder written by `shardtune train` (or its model/ folder, or any HF model or adapter folder; local or a URL)")
    ge.add_argument("prompt", help="text to continue")
    ge.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most (default 64)")
    ge.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default); > 0 samples at this temperature")
    ge.add_argument("--seed", type=int, default=0, metavar="S", help="seed for sampling (default 0)")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from shardtune.config import dump_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from shardtune.distributed.comm import alone_of_many

    alone = alone_of_many()
    if alone:
        raise ShardtuneError(alone)
    from shardtune.trainer import train

    train(cfg, Path(args.config).stem)
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from shardtune.config import load_config
    from shardtune.preprocess import preprocess

    cfg = load_config(args.config, args.overrides)
    preprocess(cfg, show=args.show, write=args.write, split=args.split, max_rows=args.max_rows, processes=args.processes)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from shardtune.config import load_config
    from shardtune.plan import parse_memory, plan
    from shardtune.plan_time import GPUS, Cluster, gpu_spec

    memory = parse_memory(args.gpu_memory) if args.gpu_memory is not None else None
    for flag in ("intra_node_bandwidth", "inter_node_bandwidth"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ShardtuneError(f"--{flag.replace('_', '-')} must be a positive number of GB/s, e.g. 50 for 400 Gb/s per GPU.")
    spec = gpu_spec(args.gpu_type) if args.gpu_type else None
    cfg = load_config(args.config, args.overrides)
    cuda = torch.cuda.device_count()
    if memory is None and spec is not None:
        memory = spec.memory_mib << 20
    if (args.gpus is None or memory is None) and not cuda:
        raise ShardtuneError("no CUDA GPU is visible here, so say what to plan for: e.g. --gpus 8 --gpu-memory 80GiB "
                             "(or --gpus 8 --gpu-type h100).")
    gpus = args.gpus if args.gpus is not None else cuda
    memory = memory if memory is not None else torch.cuda.get_device_properties(0).total_memory
    if spec is None and cuda:
        try:
            spec = gpu_spec(torch.cuda.get_device_name(0))
        except ShardtuneError:
            pass
    if spec is None:
        print("GPU type not given (--gpu-type): step times are predicted for an H100 SXM.")
    gb = lambda v: v * 1e9 if v is not None else None  # noqa: E731
    cluster = Cluster(spec or GPUS["h100"], gpus, args.nodes, gb(args.intra_node_bandwidth), gb(args.inter_node_bandwidth))
    print(plan(cfg, gpus, memory, args.nodes, cluster=cluster).table())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from shardtune import storage
    from shardtune.export import export_checkpoint
    from shardtune.run_store import fetch_checkpoint, put_folder

    with tempfile.TemporaryDirectory(prefix="shardtune-export-") as scratch:
        ckpt = fetch_checkpoint(args.checkpoint, Path(scratch)) if storage.is_url(args.checkpoint) else Path(args.checkpoint).expanduser()
        out = Path(scratch) / "model" if storage.is_url(args.out) else Path(args.out).expanduser()
        export_checkpoint(ckpt, out, args.max_shard_size)
        if storage.is_url(args.out):
            put_folder(out, args.out)
    print(f"exported {storage.display(args.checkpoint)} -> {storage.display(args.out)}")
    return 0


def _local_run(path: str) -> Path:
    """A run or model folder given as a path or a URL (fetched: exported models are safetensors and JSON)."""
    from shardtune import storage
    from shardtune.run_store import fetch_model

    return fetch_model(path) if storage.is_url(path) else Path(path).expanduser()


def cmd_predict(args: argparse.Namespace) -> int:
    from shardtune.predict import format_prediction, predict, read_texts

    from shardtune import storage

    texts = list(args.texts)
    if args.file is not None:
        if not storage.is_url(args.file) and not Path(args.file).is_file():
            raise ShardtuneError(f"--file {args.file} does not exist; pass a JSONL/CSV/TSV/parquet file of texts.")
        texts += read_texts(args.file, args.column)
    if not texts:
        raise ShardtuneError("predict needs texts: pass them as arguments or with --file.")
    for p in predict(_local_run(args.run_dir), texts):
        print(format_prediction(p, args.json))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from shardtune.generate import generate

    print(generate(_local_run(args.run_dir), args.prompt, args.max_new_tokens, args.temperature, args.seed))
    return 0


def _quiet_libraries() -> None:
    """Our own lines say what matters; the libraries' progress bars and load reports clutter logs."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


COMMANDS = {
    "train": cmd_train, "preprocess": cmd_preprocess, "plan": cmd_plan, "predict": cmd_predict, "export": cmd_export, "generate": cmd_generate,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    # overrides may come after options (`--dry-run optim.lr=1e-4`); argparse leaves those over
    late = [u for u in unknown if "=" in u and not u.startswith("-")]
    if len(late) != len(unknown) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(u for u in unknown if u not in late or not hasattr(args, 'overrides'))}")
    if late:
        args.overrides = list(args.overrides) + late
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from shardtune.tracking import redact_arg

    # for the line that says how to resume; a secret given on the command line is not printed (give it again there)
    command = shlex.join(["shardtune", *map(redact_arg, argv)] + (["--", *extra] if extra else []))
    _quiet_libraries()
    try:
        if args.command == "launch":
            from shardtune.launching import cmd_launch

            return cmd_launch(args, extra, command)
        if args.command == "train":
            from shardtune import trainer

            trainer.COMMAND = os.environ.get("SHARDTUNE_LAUNCH_COMMAND") or command
        if extra:
            raise ShardtuneError(f"arguments after `--` are only for `shardtune launch`: {' '.join(extra)}")
        code = COMMANDS[args.command](args)
    except ShardtuneError as exc:
        print(f"shardtune: error: {exc}", file=sys.stderr)
        code = 2
    except RuntimeError as exc:
        from shardtune.distributed.comm import lost_a_rank

        said = lost_a_rank(exc) if args.command == "train" else None
        if said is None:
            raise
        print(f"shardtune: error: {said}", file=sys.stderr)
        code = 1
    if args.command == "train":
        from shardtune.distributed.comm import leave

        return leave(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
