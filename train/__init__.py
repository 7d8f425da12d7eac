"""`python -m train CONFIG [KEY=VALUE ...]` from the repo root: the same as `shardtune train`."""
