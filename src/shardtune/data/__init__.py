"""The data stage: open sources, clean, tokenize, shape, shard."""
