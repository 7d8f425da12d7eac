"""Tasks: one module per task behind one typed protocol, and the registry the Trainer builds them from.

A task owns its model and data; the Trainer owns the order of a step. Per optimizer step the Trainer takes
`grad_accum` micro-batches from `batches()`, sums `sizes(batch).weight` over them and over all ranks (one
all-reduce, no host read), and backpropagates each `loss(model, batch)[0]` divided by that total: the
step's loss is the mean over every label token (or example, or pair) of the step, whatever the number of
micro-batches and ranks. Adding a task: one module here with its class in TASKS, and its config model and
TaskSpec in config.py (the config is a leaf module, so the spec lives there). Nothing in the Trainer
changes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator, Optional, Protocol, runtime_checkable

import torch

from shardtune import ShardtuneError, storage
from shardtune.config import TASK_SPECS, Config, TaskSpec

if TYPE_CHECKING:
    from shardtune.distributed import Strategy


@dataclass
class Sizes:
    """What one micro-batch holds, as device tensors (summed without a host read)."""

    weight: torch.Tensor  # what the loss is averaged over: label tokens, examples or pairs
    samples: torch.Tensor  # real examples (rows that are not padding)
    tokens: torch.Tensor  # input tokens that are not padding (throughput)


@runtime_checkable
class Task(Protocol):
    spec: ClassVar[TaskSpec]  # config model, metrics, default best metric, export class (config.TASK_SPECS)
    model: torch.nn.Module  # before the strategy wraps it
    tokenizer: object
    labels: list[str] | None  # classification's label names (saved with the model); None otherwise

    def describe(self) -> str: ...  # one line for the run's start

    def total_steps(self) -> int: ...  # optimizer steps of the run

    def seq_len(self) -> int: ...  # tokens per row (FLOPs per token)

    def batches(self) -> Iterator[dict]: ...  # this rank's micro-batches from the restored position; ends when out of data

    def sizes(self, batch: dict) -> Sizes: ...

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]: ...  # (sum, count)

    def position(self) -> object: ...  # a cheap handle on this rank's data position after the batches taken so far

    def state_dict(self, position: object) -> dict: ...  # that position as JSON (at checkpoints only)

    def load_state_dict(self, states: list[dict]) -> None: ...  # every rank's saved position (any earlier layout)

    def has_split(self, split: str) -> bool: ...

    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, float]: ...  # over every rank's part; collective

    def stats(self) -> dict[str, float]: ...  # this rank's stream counts (the Trainer sums them over ranks)

    def generations(self, model: torch.nn.Module) -> list[list[str]]: ...  # [[prompt, completion]] at each eval


class EpochPosition:
    """The data position of a task whose examples sit in memory, the same on every rank: (epoch, samples into it).
    A mixin for the Task protocol's position / state_dict / load_state_dict (classification, dpo)."""

    _position: dict
    data_name: ClassVar[str]  # for the message of a damaged checkpoint
    order: Optional[str] = None  # which batch order `samples` counts into, when it is not the seeded random one

    def position(self) -> dict:
        return dict(self._position)

    def state_dict(self, position: dict) -> dict:
        return {**position, "order": self.order} if self.order else dict(position)

    def load_state_dict(self, states: list[dict]) -> None:
        if any(s != states[0] for s in states):
            from shardtune import ShardtuneError

            raise ShardtuneError(f"the checkpoint's ranks disagree on the {self.data_name} data position; it is damaged, resume from another one.")
        saved = dict(states[0])
        order = saved.pop("order", None)
        if order != self.order and saved["samples"]:
            warnings.warn(
                f"the checkpoint stopped {saved['samples']} examples into epoch {saved['epoch']} of batch order "
                f"{order or 'random (or length-grouped by an older shardtune)'}, and this run's order is {self.order or 'random'}: "
                "the rest of that epoch follows this run's order, so some of its examples repeat and others are skipped", stacklevel=2)
        self._position = saved


def task_classes() -> dict[str, type]:
    from shardtune.tasks.causal_lm import CausalLMTask, SFTTask
    from shardtune.tasks.classification import ClassificationTask
    from shardtune.tasks.dpo import DPOTask
    from shardtune.tasks.grpo import GRPOTask

    return {"classification": ClassificationTask, "causal_lm": CausalLMTask, "sft": SFTTask, "dpo": DPOTask, "grpo": GRPOTask}


def build_task(cfg: Config, strategy: "Strategy", tokenizer) -> Task:
    share_listings(cfg, strategy)
    return task_classes()[cfg.task](cfg, strategy, tokenizer)


def share_listings(cfg: Config, strategy: "Strategy") -> None:
    """The main rank lists every object-store source once and the others take its listing: one listing per run,
    not one per rank (storage.seed_listings). A listing error is every rank's, in one sentence. Collective when
    the config has such sources (every rank has the same config)."""
    specs = [*getattr(cfg.data, "sources", []), *getattr(cfg.data, "validation_sources", [])]
    urls = [spec.path for spec in specs if storage.is_url(spec.path) and spec.format != "packed"]  # a cache reads its manifest
    if not urls:
        return
    found = None
    if strategy.is_main:
        try:
            found = {url: storage.listing(url) for url in urls}
        except ShardtuneError as exc:
            found = str(exc)
    found = strategy.from_main(found)
    if isinstance(found, str):
        raise ShardtuneError(found)
    storage.seed_listings(found)


__all__ = ["Sizes", "Task", "TASK_SPECS", "build_task", "task_classes"]
