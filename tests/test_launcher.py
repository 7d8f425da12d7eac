"""The launch command builders: golden argv for each strategy and topology, and bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from shardtune import ShardtuneError
from shardtune.config import STRATEGIES
from shardtune.launcher import LaunchSpec, SlurmJob, build_command, default_strategy, find_launch_dir, render_sbatch, slurm_template

from conftest import ROOT

L = Path("/repo/launch")
PY = "/py"
HEAD = [PY, "-m", "accelerate.commands.launch", "--config_file"]
TAIL = ["-m", "shardtune.cli", "train", "run.yaml"]


def spec(**kw) -> LaunchSpec:
    return LaunchSpec(config="run.yaml", launch_dir=L, python=PY, **kw)


def tail(strategy: str, *overrides: str) -> list[str]:
    return [*TAIL, *overrides, f"dist.strategy={strategy}"]


def test_cpu_two_processes():
    assert build_command(spec(strategy="cpu")) == HEAD + [
        "/repo/launch/cpu.yaml", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "29500", *tail("cpu")
    ]


def test_zero2_on_cpu_with_overrides_and_extra_args():
    cmd = build_command(spec(strategy="zero2", processes=4, overrides=["optim.lr=1e-4"], extra=["--mixed_precision", "no"]))
    assert cmd == HEAD + [
        "/repo/launch/zero2.yaml", "--deepspeed_config_file", "/repo/launch/deepspeed/zero2.json",
        "--num_processes", "4", "--num_machines", "1", "--main_process_port", "29500",
        "--mixed_precision", "no", *tail("zero2", "optim.lr=1e-4"),
    ]


def test_ddp_eight_gpus():
    assert build_command(spec(strategy="ddp", gpus=8)) == HEAD + [
        "/repo/launch/ddp.yaml", "--num_processes", "8", "--num_machines", "1", "--main_process_port", "29500", *tail("ddp")
    ]


def test_zero3_offload_two_nodes():
    cmd = build_command(spec(strategy="zero3_offload", gpus=4, nodes=2, node_rank=1, main_address="node0", main_port=6000))
    assert cmd == HEAD + [
        "/repo/launch/zero3_offload.yaml", "--deepspeed_config_file", "/repo/launch/deepspeed/zero3_offload.json",
        "--num_processes", "8", "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "node0",
        "--deepspeed_multinode_launcher", "standard", "--main_process_port", "6000", *tail("zero3_offload"),
    ]


def test_fsdp_on_gpus_and_on_cpu_processes_and_single_gpu():
    assert build_command(spec(strategy="fsdp", gpus=2))[4] == "/repo/launch/fsdp.yaml"
    # CPU FSDP2: plain CPU processes (Accelerate's FSDP launch wants GPUs); dist.strategy=fsdp tells the ranks
    assert build_command(spec(strategy="fsdp", processes=2)) == HEAD + [
        "/repo/launch/cpu.yaml", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "29500", *tail("fsdp")
    ]
    assert build_command(spec(strategy="single_gpu", gpus=1)) == [PY, *tail("single_gpu")]  # one process: no launcher


def test_one_process_runs_without_a_launcher():
    """Accelerate refuses --multi_gpu with one process; one process needs none: `shardtune train` with the strategy."""
    assert build_command(spec(strategy="cpu", processes=1)) == [PY, *tail("cpu")]
    assert build_command(spec(strategy="zero2", processes=1, overrides=["optim.lr=1e-4"])) == [PY, *tail("zero2", "optim.lr=1e-4")]


def test_default_strategy():
    assert default_strategy(0) == "cpu" and default_strategy(4) == "ddp"


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"strategy": "zero4"}, ["unknown strategy 'zero4'", "zero3_offload"]),
        ({"strategy": "ddp"}, ["needs CUDA GPUs", "fsdp"]),
        ({"strategy": "cpu", "gpus": -1}, ["--gpus -1 must be at least 0"]),
        ({"strategy": "cpu", "processes": 0}, ["--processes 0 must be at least 1"]),
        ({"strategy": "cpu", "processes": -2}, ["--processes -2 must be at least 1"]),
        ({"strategy": "ddp", "gpus": 2, "nodes": 2}, ["--main-address"]),
        ({"strategy": "ddp", "gpus": 2, "nodes": 2, "node_rank": 2, "main_address": "a"}, ["--node-rank 2"]),
        ({"strategy": "single_gpu", "gpus": 2}, ["one GPU"]),
        ({"strategy": "cpu", "main_port": 123456}, ["--main-port 123456", "[1024, 65535]"]),
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
        assert ds["bf16"]["check_grad_overflow"] is True, f.name  # DeepSpeed's own NaN/Inf skip in bf16, stated not assumed


def test_cli_dry_run_prints_and_python_m_launch(run_cli):
    code, out, _ = run_cli("launch", ROOT / "configs/quickstart.yaml", "--strategy", "zero3", "--gpus", "0", "--dry-run", "optim.lr=1e-4")
    assert code == 0 and "--deepspeed_config_file" in out and out.strip().endswith("optim.lr=1e-4 dist.strategy=zero3")
    shim = subprocess.run(
        [sys.executable, "-m", "launch", "configs/quickstart.yaml", "--gpus", "0", "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert shim.returncode == 0, shim.stderr
    assert "launch/cpu.yaml --multi_gpu --num_processes 2" in shim.stdout


def test_zero3_without_deepspeed_installed(monkeypatch, tmp_path):
    from shardtune.config import Config
    from shardtune.distributed.zero import _plugin

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "launch/deepspeed/zero3.json"))
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(ShardtuneError, match="needs DeepSpeed; `pip install deepspeed`"):
        _plugin(Config(), "zero3")


def test_strategy_auto_picks_what_fits(run_cli):
    from shardtune.launching import auto_strategy
    from shardtune.config import load_config

    code, out, _ = run_cli("launch", ROOT / "configs/quickstart.yaml", "--gpus", "0", "--dry-run", "dist.strategy=auto")
    assert code == 0 and "strategy auto -> cpu" in out and out.strip().endswith("dist.strategy=cpu")
    small = load_config(ROOT / "configs/quickstart.yaml")
    assert auto_strategy(small, 8, 1, gpu_memory=80 * 2**30)[0] == "ddp"
    assert auto_strategy(small, 1, 1, gpu_memory=80 * 2**30)[0] == "single_gpu"
    big = load_config(ROOT / "configs/llama-1b-pretrain.yaml", ["train.batch_size=2"])
    strategy, why, mesh = auto_strategy(big, 8, 1, gpu_memory=16 * 2**30)
    assert strategy in ("fsdp", "zero1", "zero2", "zero3") and "fits" in why and mesh.world == 8  # ddp's 16 bytes/param do not fit


# ---------------------------------------------------------------- Slurm (the scripts themselves run in tests/test_slurm.py)

TEMPLATE = """#!/bin/bash
# a job
#SBATCH --job-name=shardtune
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out

# >>> run: the template's defaults
SHARDTUNE=(shardtune)
LAUNCH_ARGS=()
DIST_TIMEOUT_MINUTES=30
# <<< run

srun "${SHARDTUNE[@]}" launch "$@" "${LAUNCH_ARGS[@]}"
"""


def slurm_job(**kw) -> SlurmJob:
    base = dict(config="/c/run.yaml", shardtune=["/venv/bin/python", "-m", "shardtune.cli"], output="/runs/r.slurm-%j.out", job_name="r")
    return SlurmJob(**{**base, **kw})


def test_render_sbatch_golden():
    job = slurm_job(
        nodes=4, gpus_per_node=8, launch_args=["--gpus", "8", "--strategy", "zero3"], overrides=["optim.lr=1e-4", "tracking.tags=[a b]"],
        dist_timeout_minutes=45.0, time="24:00:00", account="proj", sbatch=["--mem=64G", "--signal=B:USR1@300"],
    )
    assert render_sbatch(TEMPLATE, job) == """#!/bin/bash
# a job
#SBATCH --requeue
#SBATCH --job-name=r
#SBATCH --nodes=4
#SBATCH --gpus-per-node=8
#SBATCH --output=/runs/r.slurm-%j.out
#SBATCH --time=24:00:00
#SBATCH --account=proj
#SBATCH --mem=64G
#SBATCH --signal=B:USR1@300

# >>> run: written by `shardtune launch --slurm` for this run
SHARDTUNE=(/venv/bin/python -m shardtune.cli)
LAUNCH_ARGS=(--gpus 8 --strategy zero3)
DIST_TIMEOUT_MINUTES=45
set -- /c/run.yaml optim.lr=1e-4 'tracking.tags=[a b]'
# <<< run

srun "${SHARDTUNE[@]}" launch "$@" "${LAUNCH_ARGS[@]}"
"""


def test_render_sbatch_cpu_job_asks_for_no_gpus():
    out = render_sbatch(TEMPLATE, slurm_job(nodes=1, gpus_per_node=0, dist_timeout_minutes=0.5))
    directives = [line for line in out.splitlines() if line.startswith("#SBATCH")]
    assert directives == ["#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --job-name=r", "#SBATCH --nodes=1", "#SBATCH --output=/runs/r.slurm-%j.out"]
    assert "DIST_TIMEOUT_MINUTES=0.5\nset -- /c/run.yaml\n" in out


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"nodes": 0}, ["--nodes 0", "at least 1"]),
        ({"gpus_per_node": -1}, ["--gpus-per-node -1"]),
        ({"job_name": "my run"}, ["--job-name 'my run'", "my-run"]),
        ({"sbatch": ["mem=64G"]}, ["--sbatch 'mem=64G'", "--sbatch=--mem=64G"]),
        ({"sbatch": ["--array=0-3"]}, ["share one run folder", "one job per run"]),
    ],
)
def test_bad_slurm_jobs_say_what_to_do(kw, words):
    with pytest.raises(ShardtuneError) as err:
        render_sbatch(TEMPLATE, slurm_job(**kw))
    for w in words:
        assert w in str(err.value)


def test_template_without_run_block_is_refused():
    with pytest.raises(ShardtuneError, match="restore slurm/"):
        render_sbatch("#!/bin/bash\n#SBATCH --nodes=1\n", slurm_job())


@pytest.mark.parametrize("nodes, name", [(1, "train.sbatch"), (3, "multinode.sbatch")])
def test_cli_dry_run_renders_the_real_script(run_cli, tmp_path, nodes, name):
    assert slurm_template(nodes) == name
    code, out, err = run_cli("launch", ROOT / "configs/quickstart.yaml", "--slurm", "--nodes", nodes, "--gpus-per-node", 4, "--partition", "gpu",
                             "--dry-run", f"output.dir={tmp_path}/run", "optim.lr=1e-4")
    assert code == 0, err
    body = (ROOT / "slurm" / name).read_text().split("# <<< run\n", 1)[1]
    assert out.endswith("# <<< run\n" + body)  # everything after the run block is the file as it is
    for line in [f"#SBATCH --nodes={nodes}", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu", "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --job-name=run", f"#SBATCH --output={tmp_path}/run.slurm-%j.out",
                 f"SHARDTUNE=({sys.executable} -m shardtune.cli)", "LAUNCH_ARGS=(--gpus 4)", "DIST_TIMEOUT_MINUTES=30",
                 f"set -- {ROOT}/configs/quickstart.yaml output.dir={tmp_path}/run optim.lr=1e-4"]:
        assert line in out.splitlines(), line
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0
    assert not tmp_path.joinpath("run.sbatch").exists()  # a dry run writes nothing


def test_cli_slurm_pins_the_run_folder(run_cli, tmp_path, monkeypatch):
    """Without output.dir the job would pick a new timestamped folder at each requeue: the script names one."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("launch", ROOT / "configs/quickstart.yaml", "--slurm", "--gpus-per-node", 0, "--dry-run")
    assert code == 0, err
    pinned = re.search(r"^set -- \S+ output.dir=(\S+)$", out, re.M).group(1)
    assert Path(pinned).parent == tmp_path / "runs" and Path(pinned).name.startswith("quickstart-")
    assert f"#SBATCH --output={pinned}.slurm-%j.out" in out and "LAUNCH_ARGS=(--gpus 0)" in out


@pytest.mark.parametrize(
    "args, words",
    [
        (["--node-rank", "1"], ["--node-rank", "drop --node-rank"]),
        (["--main-address", "n0", "--main-port", "7000"], ["drop --main-address, --main-port"]),
        ([], ["needs --gpus-per-node"]),
        (["--gpus-per-node", "0", "--", "--debug"], ["after `--`", "launch/ strategy config"]),
    ],
)
def test_cli_bad_slurm_launches(run_cli, tmp_path, args, words):
    from conftest import one_sentence

    one_sentence(*run_cli("launch", ROOT / "configs/quickstart.yaml", "--slurm", *args, f"output.dir={tmp_path}/run")[::2], *words)


def test_cli_without_sbatch_says_where_to_run(run_cli, tmp_path, monkeypatch):
    from conftest import one_sentence

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    code, _, err = run_cli("launch", ROOT / "configs/quickstart.yaml", "--slurm", "--gpus-per-node", 0, f"output.dir={tmp_path}/run")
    one_sentence(code, err, "`sbatch` is not on PATH", "Slurm login node", "--dry-run")
    assert not (tmp_path / "run.sbatch").exists()
