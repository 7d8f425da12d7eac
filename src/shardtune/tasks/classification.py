"""Sequence classification: in-memory examples, seeded epochs, loss weighted by examples.

The data is small, so it is tokenized once up front. Batches come from data/batching.py: the same global
batches on any number of ranks and micro-batches, the epoch's last step padded with unlabelled rows; with
data.group_by_length (the default) each step's examples have similar lengths (data/grouping.py). The
position is (epoch, examples of the epoch used); eval and test metrics are sums over every rank's share,
all-reduced (loss, accuracy, macro-F1 from per-class counts).
"""

from __future__ import annotations

import math
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from shardtune.config import TASK_SPECS, Config
from shardtune.data.batching import Padded, StepBatches, seeded_order, shard_eval
from shardtune.data.classification import Encoded, PadCollator, load_splits
from shardtune.data.grouping import GROUPED_ORDER, length_grouped_order
from shardtune.metrics import IGNORE, classification_sums, metrics_from_sums
from shardtune.tasks import EpochPosition, Sizes


def _loader(dataset, index_lists, tokenizer, workers: int) -> DataLoader:
    from shardtune.data.workers import StopSafeLoader

    # its own generator: a loader without one draws its workers' base seed from the global RNG when it starts,
    # which would move the dropout stream of a resumed run against the uninterrupted one
    return StopSafeLoader(dataset, batch_sampler=index_lists, collate_fn=PadCollator(tokenizer), num_workers=workers,
                          generator=torch.Generator().manual_seed(0))


class ClassificationTask(EpochPosition):
    spec: ClassVar = TASK_SPECS["classification"]
    data_name: ClassVar = "classification"

    def __init__(self, cfg: Config, strategy, tokenizer):
        from shardtune.models import check_positions, load_classifier

        self.cfg, self.strategy, self.tokenizer = cfg, strategy, tokenizer
        self.splits = load_splits(cfg.data)
        self.labels = self.splits.labels
        label2id = {lab: i for i, lab in enumerate(self.labels)}
        self.model = load_classifier(cfg.model, self.labels)
        check_positions(self.model, cfg)
        encode = lambda exs: Encoded(exs, tokenizer, label2id, cfg.model.max_length)  # noqa: E731
        self.train_set = Padded(encode(self.splits.train).features, ignore=IGNORE)
        self.eval_sets = {split: Padded(encode(exs).features, ignore=IGNORE)
                          for split, exs in [("eval", self.splits.validation), ("test", self.splits.test)] if exs}
        t = cfg.train
        step_size = t.batch_size * strategy.dp_world * t.grad_accum
        order = seeded_order(len(self.train_set), t.seed)
        if cfg.data.group_by_length:  # steps of similar lengths: dynamic padding then pads little (data/grouping.py)
            lengths = [len(f["input_ids"]) for f in self.train_set.features]
            order = lambda epoch: length_grouped_order(lengths, step_size, t.seed, epoch)  # noqa: E731
            self.order = GROUPED_ORDER
        self.steps = StepBatches(len(self.train_set), order, t.batch_size, strategy.dp_world, strategy.dp_rank, t.grad_accum)
        self._position = {"epoch": 0, "samples": 0}

    def describe(self) -> str:
        s = self.splits
        return f"{len(s.train)} train / {len(s.validation)} eval / {len(s.test)} test examples, {len(self.labels)} labels"

    def seq_len(self) -> int:
        return self.cfg.model.max_length

    def total_steps(self) -> int:
        t = self.cfg.train
        return t.max_steps or math.ceil(t.epochs * self.steps.steps_per_epoch())

    def batches(self) -> Iterator[dict]:
        """Endless epochs from the saved position; the position moves with each micro-batch taken."""
        epoch, start = self._position["epoch"], self._position["samples"]
        plan = self.steps.micro_batches(epoch, start)
        positions = self.steps.micro_batches(epoch, start)  # the same sequence, read alongside the loader's output
        loader = _loader(self.train_set, (idx for idx, _, _ in plan), self.tokenizer, self.cfg.data.num_workers)
        for batch, (_, ep, done) in zip(loader, positions):
            self._position = {"epoch": ep + 1, "samples": 0} if done >= len(self.train_set) else {"epoch": ep, "samples": done}
            yield {k: v.to(self.strategy.device) for k, v in batch.items()}

    def sizes(self, batch: dict) -> Sizes:
        real = batch["labels"] != IGNORE
        tokens = (batch["attention_mask"] * real[:, None]).sum() if "attention_mask" in batch else real.sum() * batch["input_ids"].shape[1]
        return Sizes(weight=real.sum(), samples=real.sum(), tokens=tokens)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum"), (labels != IGNORE).sum()

    def has_split(self, split: str) -> bool:
        return split in self.eval_sets

    def stats(self) -> dict[str, float]:
        return {}

    def generations(self, model) -> list[list[str]]:
        return []

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict[str, float]:
        """Loss, accuracy and macro-F1 over the whole split: every rank's share, the padding counted nowhere."""
        data, s = self.eval_sets[split], self.strategy
        index_lists = shard_eval(len(data), s.dp_world, s.dp_rank, self.cfg.train.eval_batch_size)
        was = model.training
        model.eval()
        sums = torch.zeros(3 + 3 * len(self.labels), dtype=torch.float64, device=s.device)
        for batch in _loader(data, index_lists, self.tokenizer, 0):
            batch = {k: v.to(s.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            sums += classification_sums(model(**batch).logits, labels, len(self.labels))
        model.train(was)
        total = metrics_from_sums(s.data_sum(sums).cpu(), len(self.labels))
        return {f"{split}/{k}": v for k, v in total.items()}
