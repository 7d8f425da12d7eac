"""Shared setup of the benchmark scripts: offline env, the quickstart's real batches, timing, the machine's name."""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import time
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

LABELS = ["fresh", "rotten"]


def cpu_model() -> str:
    """`lscpu`'s Model name (what docs/benchmarks.md records)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown")


def quickstart_batches(n_batches: int, batch: int, max_length: int = 64, grouped: bool = False) -> tuple[object, list[dict]]:
    """(tokenizer, batches) of packaged Rotten Tomatoes snippets tokenized with the packaged MiniLM tokenizer,
    padded per batch to a multiple of 8 (the quickstart's collation): the first n_batches * batch snippets, or
    with `grouped` the first n_batches batches of `length_grouped_order` over all snippets (seed 42, epoch 0)."""
    from transformers import AutoTokenizer

    from shardtune.assets import packaged_data, packaged_model
    from shardtune.data.grouping import length_grouped_order

    with open(packaged_data("rotten-tomatoes"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    tok = AutoTokenizer.from_pretrained(packaged_model("minilm-l6"))
    if grouped:
        lengths = [len(ids) for ids in tok([r["text"] for r in rows], truncation=True, max_length=max_length)["input_ids"]]
        rows = [rows[i] for i in length_grouped_order(lengths, batch, seed=42, epoch=0)]
    rows = rows[: n_batches * batch]
    enc = tok([r["text"] for r in rows], truncation=True, max_length=max_length)
    feats = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": LABELS.index(r["label"])}
             for i, r in enumerate(rows)]
    batches = [tok.pad(feats[i : i + batch], padding=True, pad_to_multiple_of=8, return_tensors="pt")
               for i in range(0, len(feats), batch)]
    return tok, batches


def minilm_classifier():
    from transformers import AutoModelForSequenceClassification

    from shardtune.assets import packaged_model

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(packaged_model("minilm-l6"), num_labels=len(LABELS)).train()


def fresh_state(threads: int) -> None:
    """Between arms in one process: Accelerate keeps process-wide singletons (the HF Trainer and shardtune both build
    an Accelerator), and each arm runs at the same thread count."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(xs) -> float:
    return statistics.median(xs)
