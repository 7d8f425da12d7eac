"""Hub data sets (`hub:NAME[:CONFIG][@SPLIT]`), streamed through `datasets`: one partition per shard.

A shard's position is the count of its rows already read, so resuming one
re-streams (and skips) the rows before it: the price of a source that has no
byte offsets. Without hub access (HF_HUB_OFFLINE=1, no network) opening one
is one sentence naming the local alternatives.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Optional

from shardtune import ShardtuneError
from shardtune.data.events import OK, Event, Where

HUB = "hub:"


def parse_hub(spec: str) -> tuple[str, Optional[str], str]:
    ref, _, split = spec[len(HUB):].partition("@")
    name, _, config = ref.partition(":")
    return name, config or None, split or "train"


def open_hub(spec: str):
    import datasets

    name, config, split = parse_hub(spec)
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # offline, unknown name or split: one message for the user
        raise ShardtuneError(
            f"could not open hub data set {spec} for streaming ({type(exc).__name__}); without hub access use local files (jsonl, csv, parquet, txt)."
        ) from None


def hub_rows(spec: str, shard: int = 0, num_shards: int = 1) -> Iterator[dict]:
    ds = open_hub(spec)
    if num_shards > 1:
        ds = ds.shard(num_shards=num_shards, index=shard)
    # ds.iter(), not iter(ds): inside a DataLoader worker iter(ds) keeps only that worker's shards.
    for batch in ds.iter(batch_size=256):
        for i in range(len(next(iter(batch.values()), ()))):
            yield {k: v[i] for k, v in batch.items()}


def read_hub(part, cur: dict) -> Iterator[Event]:
    """A shard of a hub data set; resuming re-streams (and skips) the shard's rows before pos."""
    for row in itertools.islice(hub_rows(part.path, part.start, part.end), cur["pos"], None):
        cur["pos"] += 1
        yield (OK, row, Where(part.path, cur["pos"], "row"))
