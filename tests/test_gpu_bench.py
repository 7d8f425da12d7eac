"""bench/gpu_bench.py and bench/gpu.sh on CPU: `--cpu-check` builds every config, plans it and prints the
table's rows without CUDA; gpu.sh parses, and with --cpu-check runs only that (no pip, no nvidia-smi)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

ARMS = [
    ("smollm2-135m", "loop eager", "single_gpu", False), ("smollm2-135m", "loop ckpt", "single_gpu", True),
    ("smollm2-135m", "loop compile", "single_gpu", False), ("smollm2-135m", "loop compile+ckpt", "single_gpu", True),
    ("llama-1b", "loop eager", "single_gpu", False), ("llama-1b", "loop ckpt", "single_gpu", True),
    ("llama-1b", "loop compile", "single_gpu", False), ("llama-1b", "loop compile+ckpt", "single_gpu", True),
    ("minilm-l6", "loop eager", "single_gpu", False),
    ("llama-1b", "launch single_gpu", "single_gpu", False), ("llama-1b", "launch zero2", "zero2", False),
    ("llama-1b", "launch zero3", "zero3", False), ("llama-1b", "launch fsdp", "fsdp", False),
    ("smollm2-135m", "shardtune train", "single_gpu", False),
]


@pytest.fixture(scope="module")
def cpu_check() -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "bench/gpu_bench.py", "--cpu-check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _plan_totals(stdout: str) -> dict[tuple[str, bool], dict[str, float]]:
    """{(model, ckpt): {strategy: total GiB}} from the printed `shardtune plan` tables."""
    totals = {}
    for block in stdout.split("\n## plan: ")[1:]:
        head = re.match(r"(\S+), gradient checkpointing (on|off)", block)
        rows = re.findall(r"^(single_gpu|zero1|zero2|zero3|zero3_offload|fsdp) +(?:[\d.]+ +){6}([\d.]+) +(yes|no)", block, re.M)
        totals[head.group(1), head.group(2) == "on"] = {s: float(t) for s, t, _ in rows}
    return totals


def test_cpu_check_prints_every_plan(cpu_check):
    # the models have the shapes they claim: SmolLM2-135M's and MiniLM-L6's published parameter counts
    assert "LlamaForCausalLM: 134,515,008 parameters, bf16, sequence 2048, micro-batch 16" in cpu_check
    assert "LlamaForCausalLM: 1,170,302,976 parameters, bf16, sequence 2048, micro-batch 8" in cpu_check
    assert "BertForSequenceClassification: 22,713,986 parameters, bf16, sequence 128, micro-batch 32" in cpu_check
    assert "dense bf16 peak 989 TFLOP/s" in cpu_check
    totals = _plan_totals(cpu_check)
    assert sorted(totals) == sorted((m, c) for m in ("smollm2-135m", "llama-1b", "minilm-l6") for c in (False, True))
    for rows in totals.values():
        assert sorted(rows) == sorted(["single_gpu", "zero1", "zero2", "zero3", "zero3_offload", "fsdp"])
        assert all(t > 0 for t in rows.values())
    for model in ("smollm2-135m", "llama-1b"):  # checkpointing shrinks the activations
        assert totals[model, True]["single_gpu"] < totals[model, False]["single_gpu"]


def test_cpu_check_table_is_last_and_has_every_arm(cpu_check):
    lines = cpu_check.rstrip().splitlines()
    rows = lines[-len(ARMS):]
    header = lines[-len(ARMS) - 2]
    assert header.startswith("| model | arm | micro-batch x seq | tokens/s | samples/s | step ms | MFU |")
    assert "| plan GiB (row) | meas/plan | plan tokens/s | meas/plan tokens/s |" in header
    totals = _plan_totals(cpu_check)
    for row, (model, arm, strategy, ckpt) in zip(rows, ARMS):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:2] == [model, arm]
        assert cells[-1] == "not run (--cpu-check)"
        assert cells[3] == "-" and cells[-2] == "-" and cells[-4] == "-"  # nothing measured
        assert float(cells[-3].replace(",", "")) > 0  # the planner's tokens/s on this GPU type
        planned = re.fullmatch(r"([\d.]+) \((\w+)(, ckpt)?\)", cells[-5])
        assert planned and planned.group(2) == strategy and bool(planned.group(3)) == ckpt
        assert float(planned.group(1)) == pytest.approx(totals[model, ckpt][strategy], abs=0.006)


def test_gpu_sh_parses():
    assert subprocess.run(["bash", "-n", "bench/gpu.sh"], cwd=ROOT).returncode == 0


def _fakes(tmp_path):
    """A python that only records its arguments, and an nvidia-smi that records being called and fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    py, smi = bin_dir / "fakepy", bin_dir / "nvidia-smi"
    py.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/py.log\n')
    smi.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/smi.log\nexit 9\n')
    py.chmod(0o755)
    smi.chmod(0o755)
    return {**os.environ, "PYTHON": str(py), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_gpu_sh_cpu_check_runs_only_the_check(tmp_path):
    out = subprocess.run(["bash", "bench/gpu.sh", "--cpu-check", "--budget", "5"], cwd=ROOT, env=_fakes(tmp_path),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "py.log").read_text().splitlines() == ["bench/gpu_bench.py --cpu-check --budget 5"]  # no pip
    assert not (tmp_path / "smi.log").exists()


def test_gpu_sh_stops_without_a_gpu(tmp_path):
    out = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=_fakes(tmp_path), capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "no NVIDIA GPU here" in out.stderr
    assert not (tmp_path / "py.log").exists()  # neither pip nor the benchmark ran
