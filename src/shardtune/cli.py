"""`shardtune train|predict ...` — the command line.

User errors (`ShardtuneError`) print one sentence and exit 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
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

    pr = sub.add_parser("predict", help="classify texts with a trained run", description="Print label and probabilities.")
    pr.add_argument("run_dir", type=Path, help="run folder written by `shardtune train` (or its model/ folder)")
    pr.add_argument("texts", nargs="*", help="texts to classify")
    pr.add_argument("--file", type=Path, help="JSONL/CSV/TSV/parquet file of texts")
    pr.add_argument("--column", default="text", help="text column in --file (default: text)")
    pr.add_argument("--json", action="store_true", help="one JSON object per line")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from shardtune.config import dump_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from shardtune.loop import train

    train(cfg, Path(args.config).stem)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from shardtune.predict import format_prediction, predict, read_texts

    texts = list(args.texts)
    if args.file is not None:
        if not args.file.is_file():
            raise ShardtuneError(f"--file {args.file} does not exist; pass a JSONL/CSV/TSV/parquet file of texts.")
        texts += read_texts(args.file, args.column)
    if not texts:
        raise ShardtuneError("predict needs texts: pass them as arguments or with --file.")
    for p in predict(args.run_dir, texts):
        print(format_prediction(p, args.json))
    return 0


def _quiet_libraries() -> None:
    """Our own lines say what matters; the libraries' progress bars and load reports clutter logs."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


COMMANDS = {"train": cmd_train, "predict": cmd_predict}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ShardtuneError as exc:
        print(f"shardtune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
