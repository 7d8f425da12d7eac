"""Text classification data: records -> checked examples -> splits -> batches.

Records come through the one reader layer (records.py over readers.py): any
file format the stream reads, a packaged data set, a hub data set, or a
folder with one subfolder of .txt files per label. Labels may be strings or
integers in the file; they are mapped to ids with a label set that is saved
with the model. Batches are padded dynamically to a multiple of 8
(tensor-core friendly, little waste). DataLoader workers ignore stop signals
(workers.py): a preemption signal is the rank's to handle.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from shardtune import ShardtuneError
from shardtune.config import DataConfig
from shardtune.data.records import folder_examples, label_folder, open_records
from shardtune.data.workers import StopSafeLoader


@dataclass
class Example:
    text: str
    label: str


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str]  # id -> label name


def read_examples(spec: str, cfg: DataConfig, need_label: bool = True) -> list[Example]:
    folder = label_folder(spec)
    if folder is not None:
        return [Example(text, label if need_label else "") for text, label in folder_examples(folder, cfg.labels)]
    path, records = open_records(spec)
    if not records:
        raise ShardtuneError(f"data set {path} has no records; point the config at data.")
    columns = records[0][1].keys()
    wanted = [cfg.text_column] + ([cfg.label_column] if need_label else [])
    for col, key in zip(wanted, ["data.text_column", "data.label_column"]):
        if col not in columns:
            raise ShardtuneError(
                f"data file {path} has no column {col!r} (it has: {', '.join(map(str, columns))}); set {key} to one of those."
            )
    out = []
    for where, rec in records:
        text = rec.get(cfg.text_column)
        if not isinstance(text, str):
            raise ShardtuneError(
                f"{where}: {cfg.text_column!r} holds {text!r} ({type(text).__name__}), not text; "
                "fix that record or choose another data.text_column."
            )
        label = _label_str(where, rec.get(cfg.label_column)) if need_label else ""
        out.append(Example(text, label))
    return out


def _label_str(where, value: Any) -> str:
    bad = value is None or value == "" or isinstance(value, (list, dict, bool))
    if isinstance(value, float):
        bad = bad or not math.isfinite(value) or not value.is_integer()
        value = int(value) if not bad else value
    if bad:
        raise ShardtuneError(f"{where}: label {value!r} is not a class name or integer id; fix that record.")
    return str(value)


def _label_order(labels: set[str]) -> list[str]:
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def load_splits(cfg: DataConfig) -> Splits:
    train_path = cfg.train_file
    train = read_examples(train_path, cfg)
    if cfg.max_examples:
        train = train[: cfg.max_examples]
    rng = random.Random(cfg.split_seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    held: dict[str, list[Example]] = {}
    for name, file, frac in [("validation", cfg.validation_file, cfg.validation_fraction), ("test", cfg.test_file, cfg.test_fraction)]:
        if file is not None:
            held[name] = read_examples(file, cfg)
        else:
            n = int(round(len(train) * frac))
            held[name] = [train[i] for i in order[:n]]
            order = order[n:]
    train = [train[i] for i in sorted(order)]
    if not train:
        raise ShardtuneError(f"no training examples remain in {train_path} after the hold-out split; lower the hold-out fractions.")
    labels = list(cfg.labels) if cfg.labels else _label_order({ex.label for ex in train})
    if len(labels) < 2:
        raise ShardtuneError(f"data file {train_path} has only the label {labels}; classification needs at least two.")
    known = set(labels)
    for name, examples in [("train", train), *held.items()]:
        for ex in examples:
            if ex.label not in known:
                raise ShardtuneError(
                    f"{name} label {ex.label!r} is not in the label set {labels}; add it to data.labels or fix the data."
                )
    return Splits(train, held["validation"], held["test"], labels)


class Encoded(torch.utils.data.Dataset):
    """Tokenized once, up front: classification data is small, tokenizing in bulk is fastest."""

    def __init__(self, examples: list[Example], tokenizer, label2id: dict[str, int], max_length: int):
        enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length)
        self.features = [
            {**{k: enc[k][i] for k in enc.keys()}, **({"labels": label2id[ex.label]} if ex.label else {})}
            for i, ex in enumerate(examples)
        ]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]


class PadCollator:
    """Pads a batch to its longest member, rounded up to a multiple of 8."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.tokenizer.pad(features, padding=True, pad_to_multiple_of=8, return_tensors="pt")


def make_loader(dataset: Encoded, tokenizer, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0) -> DataLoader:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return StopSafeLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, collate_fn=PadCollator(tokenizer),
                          num_workers=num_workers)
