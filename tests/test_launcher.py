"""The launch command builders: golden argv for each strategy and topology, and bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from shardtune import ShardtuneError
from shardtune.config import STRATEGIES
from shardtune.launcher import LaunchSpec, build_command, default_strategy, find_launch_dir

from conftest import ROOT

L = Path("/repo/launch")
PY = "/py"
HEAD = [PY, "-m", "accelerate.commands.launch", "--config_file"]
TAIL = ["-m", "shardtune.cli", "train", "run.yaml"]


def spec(**kw) -> LaunchSpec:
    return LaunchSpec(config="run.yaml", launch_dir=L, python=PY, **kw)


def test_cpu_two_processes():
    assert build_command(spec(strategy="cpu")) == HEAD + [
        "/repo/launch/cpu.yaml", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "29500", *TAIL
    ]


def test_zero2_on_cpu_with_overrides_and_extra_args():
    cmd = build_command(spec(strategy="zero2", processes=4, overrides=["optim.lr=1e-4"], extra=["--mixed_precision", "no"]))
    assert cmd == HEAD + [
        "/repo/launch/zero2.yaml", "--deepspeed_config_file", "/repo/launch/deepspeed/zero2.json",
        "--num_processes", "4", "--num_machines", "1", "--main_process_port", "29500",
        "--mixed_precision", "no", *TAIL, "optim.lr=1e-4",
    ]


def test_ddp_eight_gpus():
    assert build_command(spec(strategy="ddp", gpus=8)) == HEAD + [
        "/repo/launch/ddp.yaml", "--num_processes", "8", "--num_machines", "1", "--main_process_port", "29500", *TAIL
    ]


def test_zero3_offload_two_nodes():
    cmd = build_command(spec(strategy="zero3_offload", gpus=4, nodes=2, node_rank=1, main_address="node0", main_port=6000))
    assert cmd == HEAD + [
        "/repo/launch/zero3_offload.yaml", "--deepspeed_config_file", "/repo/launch/deepspeed/zero3_offload.json",
        "--num_processes", "8", "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "node0",
        "--deepspeed_multinode_launcher", "standard", "--main_process_port", "6000", *TAIL,
    ]


def test_fsdp_and_single_gpu():
    assert build_command(spec(strategy="fsdp", gpus=2))[4] == "/repo/launch/fsdp.yaml"
    assert build_command(spec(strategy="single_gpu", gpus=1))[4:8] == ["/repo/launch/single_gpu.yaml", "--num_processes", "1", "--num_machines"]


def test_default_strategy():
    assert default_strategy(0) == "cpu" and default_strategy(4) == "ddp"


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"strategy": "zero4"}, ["unknown strategy 'zero4'", "zero3_offload"]),
        ({"strategy": "fsdp"}, ["needs CUDA GPUs", "zero3"]),
        ({"strategy": "ddp", "gpus": 2, "nodes": 2}, ["--main-address"]),
        ({"strategy": "ddp", "gpus": 2, "nodes": 2, "node_rank": 2, "main_address": "a"}, ["--node-rank 2"]),
        ({"strategy": "single_gpu", "gpus": 2}, ["one GPU"]),
    ],
)
def test_bad_launches_say_what_to_do(kw, words):
    with pytest.raises(ShardtuneError) as err:
        build_command(spec(**kw))
    for w in words:
        assert w in str(err.value)


def test_every_strategy_has_its_files():
    launch = find_launch_dir(ROOT, ROOT / "src" / "shardtune" / "cli.py")
    for s in STRATEGIES:
        assert (launch / f"{s}.yaml").is_file(), s
        if s.startswith("zero"):
            assert (launch / "deepspeed" / f"{s}.json").is_file(), s


def test_deepspeed_json_leaves_run_config_values_to_accelerate():
    import json

    for f in (ROOT / "launch" / "deepspeed").glob("*.json"):
        ds = json.loads(f.read_text())
        for key in ["train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"]:
            assert ds[key] == "auto", (f.name, key)
        assert ds["bf16"]["enabled"] == ds["fp16"]["enabled"] == "auto"


def test_cli_dry_run_prints_and_python_m_launch(run_cli):
    code, out, _ = run_cli("launch", ROOT / "configs/quickstart.yaml", "--strategy", "zero3", "--gpus", "0", "--dry-run", "optim.lr=1e-4")
    assert code == 0 and "--deepspeed_config_file" in out and out.strip().endswith("optim.lr=1e-4")
    import subprocess

    shim = subprocess.run(
        [sys.executable, "-m", "launch", "configs/quickstart.yaml", "--gpus", "0", "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert shim.returncode == 0, shim.stderr
    assert "launch/cpu.yaml --multi_gpu --num_processes 2" in shim.stdout


def test_zero3_without_deepspeed_installed(monkeypatch, tmp_path):
    from shardtune.config import Config
    from shardtune.dist import _deepspeed_plugin

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "launch/deepspeed/zero3.json"))
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(ShardtuneError, match="needs DeepSpeed; `pip install deepspeed`"):
        _deepspeed_plugin(Config())


def test_strategy_auto_picks_what_fits(run_cli):
    from shardtune.cli import auto_strategy
    from shardtune.config import load_config

    code, out, _ = run_cli("launch", ROOT / "configs/quickstart.yaml", "--gpus", "0", "--dry-run", "dist.strategy=auto")
    assert code == 0 and "strategy auto -> cpu" in out and out.strip().endswith("dist.strategy=cpu")
    small = load_config(ROOT / "configs/quickstart.yaml")
    assert auto_strategy(small, 8, 1, gpu_memory=80 * 2**30)[0] == "ddp"
    assert auto_strategy(small, 1, 1, gpu_memory=80 * 2**30)[0] == "single_gpu"
    big = load_config(ROOT / "configs/llama-1b-pretrain.yaml", ["train.batch_size=2"])
    strategy, why = auto_strategy(big, 8, 1, gpu_memory=16 * 2**30)
    assert strategy.startswith("zero") and "fits" in why
