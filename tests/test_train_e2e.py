"""End to end on real data: train -> outputs -> W&B offline file -> predict."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

import wandb_reader
from conftest import ROOT, tiny_overrides

QS = ROOT / "configs" / "quickstart.yaml"
TRAIN_KEYS = ["train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/tokens_per_s"]
EVAL_KEYS = ["eval/loss", "eval/accuracy", "eval/f1_macro"]


@pytest.fixture(scope="module")
def tiny_run(tiny_bert, tmp_path_factory):
    """One tiny real run shared by the tests that only read its outputs."""
    from accelerate.state import AcceleratorState

    from shardtune.cli import main

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["train", str(QS), *tiny_overrides(tiny_bert, out, **{"tracking.run_name": "tiny-e2e", "tracking.tags": "[ci]"})]) == 0
    return out


def test_run_folder_has_model_tokenizer_labels_config_metrics(tiny_run):
    model = tiny_run / "model"
    for name in ["model.safetensors", "config.json", "tokenizer.json", "label_map.json"]:
        assert (model / name).is_file(), name
    assert not list(model.glob("*.bin")), "weights must be safetensors only"
    assert json.loads((model / "label_map.json").read_text())["id2label"] == {"0": "fresh", "1": "rotten"}
    assert json.loads((model / "config.json").read_text())["id2label"] == {"0": "fresh", "1": "rotten"}
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["train/steps"] == 12 and metrics["train/samples"] == 12 * 16
    from shardtune.config import load_config

    cfg = load_config(tiny_run / "config.yaml")
    assert cfg.train.max_steps == 12
    splits, tok = _splits_and_tokenizer(cfg, model)
    # 12 steps of 16 are the 192 training examples once: every non-padding input token of them, nothing else
    assert metrics["train/tokens"] == sum(len(ids) for ids in tok([e.text for e in splits.train], truncation=True, max_length=32)["input_ids"])
    # the test metrics are those of RUN/model (the best eval's weights, or the final ones) on the test split, computed here
    accuracy, loss = _test_metrics(model, tok, splits)
    assert metrics["test/accuracy"] == pytest.approx(accuracy, abs=1e-9) and metrics["test/loss"] == pytest.approx(loss, rel=1e-5)


def _splits_and_tokenizer(cfg, model_dir):
    from transformers import AutoTokenizer

    from shardtune.data.classification import load_splits

    return load_splits(cfg.data), AutoTokenizer.from_pretrained(model_dir)


def _test_metrics(model_dir, tok, splits) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    label2id = {lab: i for i, lab in enumerate(splits.labels)}
    enc = tok([e.text for e in splits.test], truncation=True, max_length=32, padding=True, return_tensors="pt")
    labels = torch.tensor([label2id[e.label] for e in splits.test])
    with torch.no_grad():
        logits = model(**enc).logits
    return (logits.argmax(-1) == labels).double().mean().item(), torch.nn.functional.cross_entropy(logits, labels).item()


def test_wandb_offline_file_has_every_key_finite(tiny_run):
    f = wandb_reader.run_file(tiny_run)
    rows = wandb_reader.history(f)
    logged = {r["_step"]: r for r in rows}
    for step in range(2, 13, 2):  # log_every=2 over 12 steps
        for key in TRAIN_KEYS:
            assert key in logged[step] and math.isfinite(logged[step][key]), (step, key)
        assert logged[step]["train/samples_per_s"] > 0 and logged[step]["train/tokens_per_s"] > 0
    for step in (6, 12):  # eval_every=6, and at the end
        for key in EVAL_KEYS:
            assert math.isfinite(logged[step][key]), (step, key)
    cfg = wandb_reader.config(f)
    assert cfg["optim"]["lr"] == 1e-3 and cfg["train"]["max_steps"] == 12
    for prev, step in zip(range(2, 13, 2), range(4, 13, 2)):  # throughput, timing and memory, consistent with each other
        row = logged[step]
        assert 0.0 <= row["train/data_wait_fraction"] <= 1.0 and row["memory/peak_rss_gib"] > 0.1
        assert row["train/tokens_per_s_per_device"] == pytest.approx(row["train/tokens_per_s"])  # one process
        phases = row["time/data_s"] + row["time/forward_backward_s"] + row["time/optimizer_s"]
        assert 0 < phases <= row["time/step_s"] * 1.001 and row["time/forward_backward_s"] > 0
        # on a CPU the peak is this machine's measured fp32 matmul peak (hardware.py)
        assert 0 < row["train/mfu"] < 1 and row["train/tokens"] > logged[prev]["train/tokens"]
    env = cfg["env"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert env["git_sha"] == head and len(head) == 40  # the commit the run's code came from
    assert env["versions"]["torch"] and env["hardware"]["num_processes"] == 1
    summary = wandb_reader.summary(f)
    assert math.isfinite(summary["test/accuracy"]) and summary["train/steps"] == 12
    run = wandb_reader.run_info(f)
    assert run.project == "shardtune-tests" and run.display_name == "tiny-e2e" and list(run.tags) == ["ci"]


def test_same_config_twice_gives_the_same_metrics(tiny_run, tiny_bert, tmp_path, run_cli):
    code, out, _ = run_cli("train", QS, *tiny_overrides(tiny_bert, tmp_path / "again", **{"tracking.run_name": "tiny-e2e"}))
    assert code == 0
    first = json.loads((tiny_run / "metrics.json").read_text())
    second = json.loads((tmp_path / "again" / "metrics.json").read_text())
    for key in ["test/loss", "test/accuracy", "test/f1_macro", "best/step", "train/tokens"]:
        assert first[key] == second[key], key


def test_offline_notice_says_how_to_sync(tiny_bert, tmp_path, run_cli):
    code, out, _ = run_cli("train", QS, *tiny_overrides(tiny_bert, tmp_path / "r", **{"train.max_steps": 2}))
    assert code == 0
    assert out.count("wandb sync") == 1 and str(tmp_path / "r" / "wandb" / "offline-run-") in out


def test_predict_texts_and_file(tiny_run, run_cli, tmp_path):
    code, out, _ = run_cli("predict", tiny_run, "a wonderful film", "dull and lifeless", "--json")
    assert code == 0
    preds = [json.loads(line) for line in out.strip().splitlines()]
    assert [p["text"] for p in preds] == ["a wonderful film", "dull and lifeless"]
    for p in preds:
        assert p["label"] in ("fresh", "rotten") and sum(p["probs"].values()) == pytest.approx(1, abs=1e-3)
        assert p["label"] == max(p["probs"], key=p["probs"].get)
    f = tmp_path / "t.csv"
    f.write_text("review\nfine\n\"awful, just awful\"\n")
    code, out, _ = run_cli("predict", tiny_run, "--file", f, "--column", "review")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and lines[1].endswith("awful, just awful")


def test_early_stopping_stops_and_keeps_the_best(tiny_bert, tmp_path, run_cli):
    over = tiny_overrides(tiny_bert, tmp_path / "r", **{
        "train.eval_every": 1, "train.early_stopping_patience": 1, "train.max_steps": 40,
        "train.metric_for_best": "eval/loss", "optim.lr": 0.05, "tracking.report_to": "[]",
    })
    code, out, _ = run_cli("train", QS, *over)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert code == 0 and "early stopping" in out
    assert metrics["train/steps"] < 40 and metrics["best/step"] == metrics["train/steps"] - 1


def test_tensorboard_and_bf16_and_accumulation(tiny_bert, tmp_path, run_cli):
    over = tiny_overrides(tiny_bert, tmp_path / "r", **{
        "tracking.report_to": "[tensorboard]", "train.mixed_precision": "bf16", "train.grad_accum": 2, "train.max_steps": 4,
    })
    code, _, _ = run_cli("train", QS, *over)
    assert code == 0
    assert list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "r" / "wandb").exists()
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["train/samples"] == 4 * 2 * 16 and math.isfinite(metrics["test/loss"])


def test_python_m_train_is_the_same_as_shardtune_train():
    args = [str(QS), "optim.lr=3e-5", "--print-config"]
    shim = subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    cli = subprocess.run([sys.executable, "-m", "shardtune.cli", "train", *args], capture_output=True, text=True, timeout=120)
    assert shim.returncode == cli.returncode == 0, shim.stderr
    assert shim.stdout == cli.stdout and "lr: 3.0e-05" in shim.stdout
