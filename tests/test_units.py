"""Pure pieces: optimizer groups, schedules, metrics, secret redaction, label handling."""

from __future__ import annotations

import math

import pytest
import torch

from shardtune.config import DataConfig, OptimConfig
from shardtune.metrics import classification_metrics
from shardtune.optim import build_optimizer, build_scheduler, param_groups
from shardtune.tracking import REDACTED, redact, redact_arg


def test_no_weight_decay_on_biases_and_layernorm(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("LayerNorm" not in names[id(p)] and not names[id(p)].endswith("bias") for p in decay["params"])
    assert any("LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedules_warm_up_then_decay(kind):
    cfg = OptimConfig(lr=0.5, scheduler=kind, warmup_steps=10)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0] / cfg.lr)
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    if kind == "linear":
        assert lrs[55] == pytest.approx(0.5)
    elif kind == "cosine":
        assert lrs[55] == pytest.approx(0.5) and lrs[32] > 0.5 + (55 - 32) / 90 / 2
    else:
        assert lrs[99] == pytest.approx(1.0)


def test_classification_metrics_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1])  # preds 0,1,0,1 -> 2/4 right; F1 per class 0.5
    m = classification_metrics(logits, labels, 2)
    assert m["accuracy"] == 0.5 and m["f1_macro"] == pytest.approx(0.5)
    expected = -(math.log(math.exp(2) / (math.exp(2) + 1)) * 2 + math.log(1 / (math.exp(2) + 1)) * 2) / 4
    assert m["loss"] == pytest.approx(expected, rel=1e-6)


def test_command_line_arguments_lose_their_secrets_and_keep_the_rest():
    """What W&B records as the run's command and the resume line print: a secret-named key's value or a secret-shaped
    word inside an override goes, everything else stays."""
    token, key = "hf_" + "Ab3" * 12, "0123456789abcdef" * 2 + "01234567"
    assert redact_arg(f"tracking.tags=[ci, {token}]") == f"tracking.tags=[ci, {REDACTED}]"
    assert redact_arg("model.hub_token=whatever") == f"model.hub_token={REDACTED}"
    assert redact_arg(f"tracking.run_name={key}") == f"tracking.run_name={REDACTED}"
    for kept in ("optim.lr=1e-3", "configs/quickstart.yaml", "train.max_tokens=5", "--gpus", "data.sources=[{path: a.jsonl}]"):
        assert redact_arg(kept) == kept


def test_secrets_are_redacted_keys_and_values():
    cfg = {"tracking": {"api_key": "abc", "project": "p"}, "hub_token": "x", "note": "hf_" + "a" * 30, "lr": 0.1}
    out = redact(cfg)
    assert out["tracking"]["api_key"] == REDACTED and out["hub_token"] == REDACTED and out["note"] == REDACTED
    assert out["tracking"]["project"] == "p" and out["lr"] == 0.1
    kept = redact({"tokenize_batch": 64, "eos_token_id": 2, "max_tokens": 5})
    assert kept == {"tokenize_batch": 64, "eos_token_id": 2, "max_tokens": 5}
    assert cfg["tracking"]["api_key"] == "abc"  # the input is not changed


def test_integer_labels_sort_numerically(tmp_path):
    from shardtune.data.classification import load_splits

    f = tmp_path / "d.jsonl"
    f.write_text("".join(f'{{"text": "t{i}", "label": {i % 11}}}\n' for i in range(110)))
    splits = load_splits(DataConfig(train_file=str(f)))
    assert splits.labels == [str(i) for i in range(11)]
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 110
    assert len(splits.validation) == len(splits.test) == 11
