"""Length-grouped batch order for classification: batches of similar lengths, so dynamic padding pads little.

The idea of HF Trainer's LengthGroupedSampler (`group_by_length`): shuffle,
cut the shuffled order into mega-batches of `mega` global batches, sort each
mega-batch by length (longest first), cut it into global batches, then
shuffle the order of those batches and swap the longest full batch to the
front, as the Trainer's sampler does, so that a batch too large for memory
fails at the first step of an epoch, not hours into it. Every example appears once per epoch; the
order depends only on (lengths, global batch, seed, epoch), not on the world
size: each global batch is then split over the ranks.

Written here rather than taken from transformers because the Trainer's
version is a torch Sampler bound to its own seeding and has no epoch-exact,
resumable position; this is a pure function whose output the task can slice
at any saved position.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


GROUPED_ORDER = "length-grouped, longest batch first"  # a checkpoint's position counts into this order (tasks.EpochPosition)


def length_grouped_order(lengths: Sequence[int], global_batch: int, seed: int, epoch: int, mega: int = 50) -> list[int]:
    """A permutation of range(len(lengths)) whose consecutive runs of `global_batch` indices are batches of
    similar length, in a shuffled batch order with the longest full batch first; a last, smaller batch (if any)
    stays last so that every full slice [k * global_batch, (k + 1) * global_batch) is a batch."""
    if global_batch < 1 or mega < 1:
        raise ValueError(f"global_batch and mega must be positive, got {global_batch} and {mega}")
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed % 2**63, epoch % 2**63])
    order = rng.permutation(len(lengths))
    size = mega * global_batch
    batches: list[np.ndarray] = []
    for start in range(0, len(order), size):
        block = order[start : start + size]
        block = block[np.argsort(-lengths[block], kind="stable")]  # ties keep their shuffled order
        batches += [block[i : i + global_batch] for i in range(0, len(block), global_batch)]
    last = [batches.pop()] if batches and len(batches[-1]) < global_batch else []
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if batches:  # each batch is sorted, so its first example is its longest
        longest = max(range(len(batches)), key=lambda k: lengths[batches[k][0]])
        batches[0], batches[longest] = batches[longest], batches[0]
    batches += last
    return np.concatenate(batches).tolist() if batches else []


def padded_tokens(lengths: Sequence[int], order: Sequence[int], batch: int, multiple: int = 8) -> int:
    """Pad tokens when `order` is cut into batches of `batch` and each is padded to its longest, rounded up to
    `multiple` (what data.classification.PadCollator does)."""
    total = 0
    for start in range(0, len(order), batch):
        part = [lengths[i] for i in order[start : start + batch]]
        width = -(-max(part) // multiple) * multiple
        total += width * len(part) - sum(part)
    return total
