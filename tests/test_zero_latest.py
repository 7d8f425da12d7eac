"""A ZeRO checkpoint's zero/ folder is a DeepSpeed checkpoint folder as DeepSpeed documents it: `latest` names the
tag, and the zero_to_fp32.py DeepSpeed copies there, run as a user runs it (`python zero_to_fp32.py . OUT` in
that folder, no -t), writes the same fp32 weights as `shardtune export`, bit for bit."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file

import forklaunch
from conftest import ROOT


def test_zero_to_fp32_in_the_checkpoint_needs_no_tag_and_equals_export(tiny_bert, tmp_path, run_cli):
    over = {
        "dist.strategy": "zero3", "model.name_or_path": tiny_bert, "model.max_length": 32, "model.dropout": 0,
        "data.max_examples": 40, "train.batch_size": 4, "train.max_steps": 3, "train.save_every": 3,
        "train.eval_every": None, "train.async_save": "false", "tracking.report_to": "[]", "output.dir": tmp_path / "run",
    }
    argv = ["train", str(ROOT / "configs" / "quickstart.yaml"), *[f"{k}={v}" for k, v in over.items()]]
    codes = forklaunch.launch(argv, tmp_path, world=2)
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    zero = ckpt / "zero"
    assert (zero / "latest").read_text().strip() == "state"  # the tag save() uses (zero_files.TAG)
    assert (zero / "zero_to_fp32.py").is_file()  # DeepSpeed copies its script there itself

    done = subprocess.run([sys.executable, "zero_to_fp32.py", ".", str(tmp_path / "fp32")], cwd=zero,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    script = torch.load(tmp_path / "fp32" / "pytorch_model.bin", map_location="cpu", weights_only=True)

    code, _, err = run_cli("export", ckpt, "--out", tmp_path / "hf")
    assert code == 0, err
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert exported.keys() <= script.keys() and any(k.endswith("classifier.weight") for k in exported)
    assert not [k for k in set(script) - set(exported) if not k.endswith("position_ids")], sorted(set(script) - set(exported))
    for name, tensor in exported.items():
        assert script[name].dtype == tensor.dtype == torch.float32 and torch.equal(script[name], tensor), name
