"""Batches of in-memory examples (classification, preference pairs), the same global batches on any layout.

Each epoch has a seeded order of all examples (a permutation, or length-grouped). An optimizer step takes
the next G = micro_batch x world x accumulation examples of it; micro-batch i of rank r is the slice
[i*B*W + r*B, +B) of the step's examples. So the set of examples in a step depends on G alone: 1 x 8,
4 x 2 and 2 ranks x (2 x 2) see the same steps, and with the token-weighted loss the same gradients.
The epoch's last step may be short: its missing rows are padding (index -1), which the dataset turns
into a copy of an example with no label, so every rank runs the same number of forwards (ZeRO-3 and
FSDP2 forwards are collectives) and the padding counts for nothing.

Written by hand: Accelerate's data-loader sharding pads the last batch with real, *counted* duplicates,
which changes the gradient with the number of ranks.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

PAD = -1
Order = Callable[[int], Sequence[int]]  # epoch -> the epoch's order of example indices


def seeded_order(n: int, seed: int) -> Order:
    def order(epoch: int) -> list[int]:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()

    return order


class StepBatches:
    """Index lists of one rank's micro-batches, from a position (epoch, examples of the epoch already used) on."""

    def __init__(self, n: int, order: Order, micro: int, world: int, rank: int, accum: int):
        self.n, self.order, self.micro, self.world, self.rank, self.accum = n, order, micro, world, rank, accum
        self.step_size = micro * world * accum

    def steps_per_epoch(self) -> int:
        return -(-self.n // self.step_size)

    def micro_batches(self, epoch: int, start: int) -> Iterator[tuple[list[int], int, int]]:
        """Endless: (indices with PAD for padding, epoch, examples of that epoch used after this micro-batch's step)."""
        while True:
            order = list(self.order(epoch))
            for step_start in range(start, self.n, self.step_size):
                done = min(self.n, step_start + self.step_size)
                for i in range(self.accum):
                    lo = step_start + (i * self.world + self.rank) * self.micro
                    idx = [order[j] if j < done else PAD for j in range(lo, lo + self.micro)]
                    yield idx, epoch, done
            epoch, start = epoch + 1, 0


class Padded(torch.utils.data.Dataset):
    """Examples by index; PAD gives example 0 with its label set to `ignore` (no loss, no count)."""

    def __init__(self, features: Sequence[dict], label_keys: tuple[str, ...] = ("labels",), ignore: int = -100):
        self.features, self.label_keys, self.ignore = features, label_keys, ignore

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        if i != PAD:
            return self.features[i]
        return {k: (_ignored(v, self.ignore) if k in self.label_keys else v) for k, v in self.features[0].items()}


def _ignored(value, ignore: int):
    return [ignore] * len(value) if isinstance(value, (list, tuple)) else ignore


def seeded_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): round(fraction * n) items drawn with Random(seed), both in their original order."""
    import random

    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[: int(round(len(items) * fraction))])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def shard_eval(n: int, world: int, rank: int, batch: int) -> list[list[int]]:
    """Eval batches of this rank: examples r, r+W, ..., padded with PAD so every rank runs the same number of
    batches of the same size."""
    mine = list(range(rank, n, world))
    per_rank = -(-n // world)
    mine += [PAD] * (per_rank - len(mine))
    return [mine[i : i + batch] for i in range(0, len(mine), batch)]
