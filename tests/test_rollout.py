"""Generation inside a sharded job (`Strategy.generating`, distributed/rollout.py): under ZeRO-3 and FSDP2 a rollout
all-gathers the parameters once, whatever the number of tokens it generates, where a sharded model's plain
`generate` gathers them again for every token; and it generates the unsharded model's tokens. 2 gloo ranks.

Measured (gather calls on one rank, 4 / 16 new tokens): FSDP2 3 / 3 with it (one per FSDP module), 12 / 48 without;
ZeRO-3 (persistence threshold 0) 21 / 21 with it (one per parameter tensor, once), 24 / 36 without."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forklaunch import free_port


@pytest.mark.parametrize("name", ["zero3", "fsdp"])
def test_a_rollout_gathers_the_parameters_once_not_once_per_token(name, tiny_lm_tokenizer, tmp_path):
    out = tmp_path / "result.json"
    worker = Path(__file__).with_name("rollout_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(worker), str(tiny_lm_tokenizer), str(out), name]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "SHARDTUNE_AUTO_PRECISION": "no"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    short, long = (json.loads(out.read_text())[k] for k in ("4", "16"))
    for r in (short, long):
        assert r["whole"] == r["naive"] == r["reference"]  # the unsharded model's tokens
    assert short["whole_gathers"] == long["whole_gathers"] > 0  # the model gathered once per rollout, whatever its length
    assert long["naive_gathers"] - short["naive_gathers"] >= 16 - 4  # without it: at least one gather per generated token
