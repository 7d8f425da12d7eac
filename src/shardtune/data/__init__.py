"""The data stage: open sources, clean, tokenize, shape, shard.

Streaming causal-LM preprocessing (public API and state format: stream.py):
    readers.py    local files (jsonl/json/csv/tsv/parquet/txt, globs, folders) and hub:NAME
                  streams, each with an exact, JSON-small position
    docstream.py  the global document order: seeded mixture, hold-out, block shuffle;
                  which documents a slot (rank, worker) owns
    clean.py      pure cleaning functions, counted by reason
    pack.py       batched tokenization, packing into seq_len rows, batches
    stream.py     StreamConfig, StreamLoader (workers, state, resharding, equal batches), preview
"""
