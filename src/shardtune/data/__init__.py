"""The data stage: readers -> partitions -> documents -> clean -> tokenize -> pack -> batches; cache.

One reader layer for every task:
    readers.py     the records of one partition of a file (jsonl/json/csv/tsv/parquet/txt, compressed or not, local
                   or at a URL: storage.py), exact positions, UTF-8 BOM and CRLF tolerated, bad records as events
                   (events.py); hub.py for hub:NAME data sets
    records.py     whole records for classification and `shardtune predict` (and folders of per-label .txt)
Streaming for language-model tasks (public API and state format: stream.py):
    partitions.py  sources -> a fixed partition table (byte ranges, row groups, files, hub shards); the deal to slots
    plan.py        what a split reads (SplitPlan), the hold-out
    settings.py    the settings a saved position depends on
    docstream.py   one slot's documents: its partitions only, hold-out, clean, dedup and shuffle per partition, mixture
    clean.py       pure cleaning functions, counted by reason
    pack.py        batched tokenization, packing into seq_len rows, batches
    sft.py         chat / prompt-response records -> ids + labels on responses
    stream.py      StreamLoader (slots, workers, state, re-deal, equal batches), preview
    cache.py       the pretokenized cache, built in parallel; packed.py reads it back (a source with format: packed)
    workers.py     DataLoader workers ignore stop signals (their rank handles them)
Classification: classification.py (examples, splits, dynamic padding).
"""
