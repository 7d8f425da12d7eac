"""Strategy configs for `accelerate launch`, and `python -m launch CONFIG ...` (= `shardtune launch`)."""
