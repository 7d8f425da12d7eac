"""The device mesh as numbers (mesh.py) and its validation: in the config, on `shardtune launch` (before anything is
spawned), against the model; which rank reads which data."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, one_sentence
from shardtune import ShardtuneError
from shardtune.config import MeshConfig
from shardtune.mesh import Mesh, check_model, resolve

QS = ROOT / "configs" / "quickstart.yaml"


def test_axes_order_ranks_as_torchtitan_does():
    """tp innermost (neighbouring ranks: one node), then sp, then dp_shard, dp_replicate outermost."""
    m = Mesh(dp_replicate=2, dp_shard=2, tp=2)
    assert m.world == 8 and m.dp == 4 and m.batch == 4
    assert [m.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]  # a tp pair reads one data slot
    assert m.coords(5) == {"dp_replicate": 1, "dp_shard": 0, "cp": 0, "sp": 0, "tp": 1}
    s = Mesh(dp_shard=2, sp=2)
    assert [s.dp_rank(r) for r in range(4)] == [0, 0, 1, 1] and [s.seq_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert s.batch == 4  # sp ranks hold different tokens: they count, tp ranks do not


def test_one_data_state_per_slot_is_saved():
    """Strategy.per_slot keeps the first rank of each data slot, in slot order: a checkpoint of a tp run holds one
    stream state per data-parallel rank, as a run without tp of that many ranks would."""
    from shardtune.distributed.base import Strategy

    class S:
        mesh = Mesh(dp_shard=2, tp=2)

    assert Strategy.per_slot(S(), ["r0", "r1", "r2", "r3"]) == ["r0", "r2"]
    S.mesh = None
    assert Strategy.per_slot(S(), ["r0", "r1"]) == ["r0", "r1"]


@pytest.mark.parametrize("axes,world,strategy,words", [
    ({"tp": 3}, 4, "fsdp", ["does not divide the 4 processes"]),
    ({"dp_shard": 3, "tp": 2}, 4, "fsdp", ["must multiply to the 4 processes", "dp_shard=-1"]),
    ({"tp": 2}, 4, "zero3", ["runs under strategy fsdp", "not zero3"]),
    ({"dp_replicate": 2}, 4, "cpu", ["--strategy fsdp"]),
    ({"cp": 2}, 4, "fsdp", ["dist.mesh.cp", "dist.mesh.sp"]),
])
def test_a_mesh_that_cannot_be_is_one_sentence(axes, world, strategy, words):
    with pytest.raises(ShardtuneError) as err:
        resolve(MeshConfig(**axes), world, strategy)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_tp_stays_within_a_node_unless_asked():
    with pytest.raises(ShardtuneError, match="more than the 8 GPUs of one node"):
        resolve(MeshConfig(tp=16), 32, "fsdp", gpus_per_node=8)
    assert resolve(MeshConfig(tp=16, allow_tp_across_nodes=True), 32, "fsdp", gpus_per_node=8).dp_shard == 2
    assert resolve(MeshConfig(dp_replicate=2), 8, "fsdp", gpus_per_node=4) == Mesh(dp_replicate=2, dp_shard=4)


@pytest.mark.parametrize("mesh,heads,kv,seq,causal,words", [
    (Mesh(dp_shard=1, tp=4), 6, 2, 32, True, ["tp 4 must divide", "6 attention heads", "choose tp among 1, 2"]),
    (Mesh(sp=4), 8, 2, 32, True, ["sp 4 must divide"]),
    (Mesh(sp=2), 4, 2, 33, True, ["sequence length 33", "multiple of 2"]),
    (Mesh(sp=2), 4, 4, 32, False, ["causal-LM tasks"]),
])
def test_the_model_must_split_along_the_mesh(mesh, heads, kv, seq, causal, words):
    with pytest.raises(ShardtuneError) as err:
        check_model(mesh, heads, kv, seq, causal)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_config_rejects_dp_shard_zero(run_cli):
    code, _, err = run_cli("train", QS, "dist.mesh.dp_shard=0", "--print-config")
    one_sentence(code, err, "dp_shard must be -1 (fill) or at least 1")


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardtune.cli", "launch", str(QS), "--gpus", "0", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_a_config_error_the_ranks_would_find_is_said_once_before_anything_is_spawned():
    """Before: torchrun's 40-line ChildFailedError traceback after each rank's sentence."""
    proc = _launch("--strategy", "fsdp", "--processes", "2", "train.mixed_precision=fp16")
    one_sentence(proc.returncode, proc.stderr, "train.mixed_precision=fp16 needs a CUDA GPU")
    assert "accelerate" not in proc.stdout  # no command was printed, so none was run


@pytest.mark.parametrize("args,words", [
    (["--strategy", "cpu", "model.max_length=100000"], ["model.max_length 100000 is more than the 512 positions"]),
    (["--strategy", "fsdp", "--tp", "2"], ["BertConfig declares no tensor-parallel plan"]),
])
def test_what_the_model_cannot_do_is_refused_by_the_launch(run_cli, args, words):
    """Read from the model built on the meta device, before any rank exists (the ranks would each say it, then
    torchrun its traceback)."""
    code, out, err = run_cli("launch", QS, "--gpus", "0", "--processes", "2", "--dry-run", *args)
    one_sentence(code, err, *words)
    assert "accelerate" not in out


def test_launch_mesh_flags_become_the_config_and_what_the_model_cannot_split_is_refused(run_cli, tiny_lm_tokenizer, lm_corpus, tmp_path):
    cfg = tmp_path / "lm.yaml"
    cfg.write_text("task: causal_lm\n")
    over = [f"model.name_or_path={tiny_lm_tokenizer}", "model.init=scratch", "model.preset=tiny", "train.max_steps=2",
            "data.seq_len=32", f"data.sources=[{{path: {lm_corpus}}}]"]
    launch = ("launch", cfg, "--gpus", "0", "--strategy", "fsdp", "--dry-run")
    code, out, err = run_cli(*launch, "--processes", "4", "--tp", "2", "--dp-replicate", "2", *over)
    assert code == 0, err
    assert "dist.mesh.dp_replicate=2 dist.mesh.tp=2 dist.strategy=fsdp" in out
    code, _, err = run_cli(*launch, "--processes", "4", "--tp", "3", *over)
    one_sentence(code, err, "does not divide the 4 processes")
    code, _, err = run_cli(*launch, "--processes", "8", "--tp", "8", *over)
    one_sentence(code, err, "dist.mesh.tp 8 must divide the model's 4 attention heads")
    code, _, err = run_cli(*launch, "--processes", "4", "--sp", "2", *over, "data.seq_len=33")
    one_sentence(code, err, "sequence length 33 must be divisible by 2")
