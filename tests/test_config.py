"""The config tree: YAML + dotted overrides, validation, every shipped config loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shardtune.config import Config, ConfigError, load_config

from conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path: Path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    # what the file says is what the config holds (nothing silently dropped)
    _assert_subset(raw, cfg.to_dict(), path.name)


def _assert_subset(want, got, where: str) -> None:
    if isinstance(want, dict):
        for key, value in want.items():
            _assert_subset(value, got[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(want) == len(got), where
        for i, (w, g) in enumerate(zip(want, got)):
            _assert_subset(w, g, f"{where}[{i}]")
    else:
        assert want == got, where


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["optim.lr=3e-5", "train.max_steps=50", "tracking.tags=[a, b]"])
    assert cfg.optim.lr == 3e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 50
    assert cfg.tracking.tags == ["a", "b"]


def test_yaml_booleans_mean_the_words(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  mixed_precision: no\n  progress_bar: off\n")
    cfg = load_config(f, ["train.progress_bar=on"])
    assert cfg.train.mixed_precision == "no" and cfg.train.progress_bar == "on"


def test_defaults_without_a_file():
    assert load_config(None) == Config()


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["optim.lrr=1"], ["optim.lrr", "did you mean optim.lr"]),
        (["trian.epochs=1"], ["trian", "did you mean train"]),
        (["train.batch_size=abc"], ["train.batch_size", "'abc'", "integer"]),
        (["optim.lr=-1"], ["optim.lr", "-1", "greater than 0"]),
        (["train.mixed_precision=fp8"], ["train.mixed_precision", "'fp8'", "'bf16'"]),
        (["data.validation_fraction=0.6", "data.test_fraction=0.5"], ["validation_fraction + data.test_fraction"]),
        (["optim"], ["section.key=value"]),
        (["optim.lr.x=1"], ["lr is a value"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/quickstart.yaml", overrides)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: minilm-l6\noptim:\n  lr: [1e-5\n  weight_decay: 0\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(bad)


def test_top_level_must_be_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_config_file_is_refused_naming_the_quickstart(tmp_path, text):
    f = tmp_path / "empty.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, ["train.max_steps=5"])
    msg = str(err.value)
    assert "\n" not in msg and str(f) in msg and "holds no settings" in msg and "configs/quickstart.yaml" in msg


@pytest.mark.parametrize(
    "task, extra, metric",
    [
        ("classification", {}, "eval/accuracy"),
        ("causal_lm", {"data": {"sources": [{"path": "x.jsonl"}]}}, "eval/loss"),
        ("sft", {"data": {"sources": [{"path": "x.jsonl"}]}}, "eval/loss"),
    ],
)
def test_metric_for_best_defaults_to_the_tasks(task, extra, metric):
    from shardtune.config import TASK_SPECS, validate

    cfg = validate({"task": task, **extra})
    assert cfg.train.metric_for_best == metric == TASK_SPECS[task].best and metric in TASK_SPECS[task].metrics
    # an explicit choice that the task logs is kept
    other = [m for m in TASK_SPECS[task].metrics if m != metric][0]
    assert validate({"task": task, "train": {"metric_for_best": other}, **extra}).train.metric_for_best == other


def test_a_minimal_causal_lm_config_validates(tmp_path):
    """The shape a new user writes first: no train section at all."""
    f = tmp_path / "lm.yaml"
    f.write_text("task: causal_lm\ndata:\n  sources: [{path: docs.jsonl}]\n")
    assert load_config(f).train.metric_for_best == "eval/loss"


@pytest.mark.parametrize(
    "task, metric, allowed",
    [
        ("causal_lm", "eval/accuracy", "eval/loss, eval/perplexity"),
        ("classification", "eval/perplexity", "eval/loss, eval/accuracy, eval/f1_macro"),
        ("classification", "eval/bleu", "eval/loss, eval/accuracy, eval/f1_macro"),
    ],
)
def test_a_best_metric_the_task_does_not_log_is_a_config_error(tmp_path, task, metric, allowed):
    data = "data:\n  sources: [{path: docs.jsonl}]\n" if task != "classification" else ""
    f = tmp_path / "c.yaml"
    f.write_text(f"task: {task}\n{data}")
    with pytest.raises(ConfigError) as err:
        load_config(f, [f"train.metric_for_best={metric}"])
    msg = str(err.value)
    assert "\n" not in msg and f"train.metric_for_best {metric!r} is not logged for task {task}" in msg and allowed in msg


def test_shardtune_train_on_an_empty_file_says_one_sentence_and_trains_nothing(tmp_path, run_cli):
    from conftest import one_sentence

    f = tmp_path / "empty.yaml"
    f.write_text("")
    code, out, err = run_cli("train", f, f"output.dir={tmp_path}/r")
    one_sentence(code, err, "holds no settings", "configs/quickstart.yaml")
    assert not (tmp_path / "r").exists()
