"""W&B on real offline run files: the mode it picks (WANDB_MODE, tracking.mode, an API key), the WANDB_* variables,
secrets kept out of config.yaml and the W&B config, the fallback to offline when the server cannot be reached
(an API key and a base URL at a loopback port that refuses connections), and the model artifact."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

import forklaunch
import wandb_reader
from conftest import ROOT, tiny_overrides
from shardtune.config import ConfigError, TrackingConfig, load_config
from shardtune.tracking import REDACTED, Tracker, has_wandb_key, wandb_mode

QS = ROOT / "configs" / "quickstart.yaml"
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex, the shape of a W&B API key
WANDB_VARS = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME",
              "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_RUN_ID", "WANDB_SERVICE")


def refused_url() -> str:
    """A loopback port that nothing listens on: bound by the OS, then closed again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def wandb_env(monkeypatch):
    """No W&B variables (conftest already points NETRC at /dev/null); returns a setter."""
    for name in WANDB_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    return set_env


def _train(tmp_path: Path, env: dict[str, str], **overrides) -> subprocess.CompletedProcess:
    """`shardtune train` on the tiny BERT in its own process (its own W&B service and environment), forked from
    the preloaded server (tests/forklaunch.py)."""
    clean = {k: v for k, v in os.environ.items() if k not in WANDB_VARS}
    return forklaunch.run(["train", str(QS), *tiny_overrides(**overrides)], env={**clean, **env}, cwd=tmp_path)


# ---------------------------------------------------------------- which mode


@pytest.mark.parametrize(
    "env, mode, want",
    [
        ({}, "auto", "offline"),  # no key
        ({"WANDB_API_KEY": FAKE_KEY}, "auto", "online"),
        ({"WANDB_API_KEY": FAKE_KEY}, "offline", "offline"),
        ({}, "online", "online"),
        ({"WANDB_MODE": "offline"}, "online", "offline"),  # WANDB_MODE wins over tracking.mode
        ({"WANDB_MODE": "disabled", "WANDB_API_KEY": FAKE_KEY}, "auto", "disabled"),
        ({"WANDB_MODE": "online"}, "disabled", "online"),
        ({}, "disabled", "disabled"),
    ],
)
def test_mode_precedence(wandb_env, env, mode, want):
    wandb_env(**env)
    assert wandb_mode(TrackingConfig(mode=mode)) == want


def test_a_wandb_login_in_netrc_counts_as_a_key_for_the_servers_host(wandb_env, monkeypatch, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert has_wandb_key() and wandb_mode(TrackingConfig()) == "online"
    wandb_env(WANDB_BASE_URL="https://wandb.example.org")  # a login for another server does not count
    assert not has_wandb_key() and wandb_mode(TrackingConfig()) == "offline"


def test_wandb_mode_offline_beats_tracking_mode_online_on_a_real_run(wandb_env, tmp_path, capsys):
    """With a key and an unreachable server, an online attempt would fall back; WANDB_MODE=offline never tries."""
    wandb_env(WANDB_MODE="offline", WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=refused_url())
    tracker = Tracker(TrackingConfig(mode="online", init_timeout_s=60), tmp_path, {"a": 1}, True, "t")
    tracker.log({"x": 1.0}, 1)
    tracker.finish()
    out = capsys.readouterr().out
    assert not tracker.fell_back and "could not be used" not in out
    assert "logged offline (WANDB_MODE or tracking.mode); upload it with: wandb sync" in out
    assert [r["x"] for r in wandb_reader.history(wandb_reader.run_file(tmp_path))] == [1.0]
    assert not list(tmp_path.glob("wandb/run-*"))  # no online run folder: it never went online


def test_disabled_writes_no_wandb_files_but_keeps_log_jsonl(wandb_env, tmp_path):
    tracker = Tracker(TrackingConfig(mode="disabled"), tmp_path, {}, True, "t")
    tracker.log({"x": 2.0}, 3)
    tracker.finish()
    assert tracker.run is None and not (tmp_path / "wandb").exists()
    assert json.loads((tmp_path / "log.jsonl").read_text()) == {"step": 3, "x": 2.0}


# ---------------------------------------------------------------- a real run: WANDB_* variables, secrets


def test_wandb_variables_fill_what_the_config_leaves_open_and_secrets_stay_out(tiny_bert, tmp_path):
    hf_token = "hf_" + "Ab3" * 12
    env = {"WANDB_PROJECT": "env-project", "WANDB_ENTITY": "env-entity", "WANDB_NAME": "env-name",
           "WANDB_RUN_GROUP": "env-group", "WANDB_TAGS": "a,b", "WANDB_RUN_ID": "envrun123"}
    run = tmp_path / "r"
    # tracking.project and tracking.tags are set (the config wins, the env's tags are added); a pasted token as the group
    proc = _train(tmp_path, env, model=tiny_bert, out=run, **{"train.max_steps": 2, "tracking.tags": "[ci]",
                                                                "tracking.group": hf_token})
    assert proc.returncode == 0, proc.stderr[-3000:]
    f = wandb_reader.run_file(run)
    info = wandb_reader.run_info(f)
    assert f.name == "run-envrun123.wandb" and info.run_id == "envrun123"
    assert (info.project, info.entity, info.display_name) == ("shardtune-tests", "env-entity", "env-name")
    assert list(info.tags) == ["ci", "a", "b"]

    written = (run / "config.yaml").read_text()
    assert yaml.safe_load(written)["tracking"]["group"] == REDACTED and hf_token not in written
    wb_config = wandb_reader.config(f)
    assert wb_config["tracking"]["group"] == REDACTED and hf_token not in json.dumps(wb_config)
    assert load_config(run / "config.yaml").train.max_steps == 2  # the redacted file still reruns


def test_without_the_group_the_wandb_run_group_comes_from_the_environment(tiny_bert, tmp_path):
    proc = _train(tmp_path, {"WANDB_RUN_GROUP": "env-group"}, model=tiny_bert, out=tmp_path / "r", **{"train.max_steps": 1})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert wandb_reader.run_info(wandb_reader.run_file(tmp_path / "r")).run_group == "env-group"


# ---------------------------------------------------------------- unreachable server


def test_an_unreachable_server_falls_back_to_offline_in_the_set_time_and_keeps_every_step(tiny_bert, tmp_path):
    url, run = refused_url(), tmp_path / "r"
    proc = _train(tmp_path, {"WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": url}, model=tiny_bert, out=run,
                  **{"tracking.init_timeout_s": 4})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (run / "model" / "model.safetensors").is_file()

    # said once, with the reason and the sync line; W&B was told the configured timeout and gave up on it
    said = [line for line in proc.stdout.splitlines() if "could not be used" in line]
    assert len(said) == 1 and proc.stdout.count("wandb sync") == 1, proc.stdout
    assert said[0].startswith(f"W&B: {url} could not be used within tracking.init_timeout_s=4 s (CommError: ")
    assert "connection refused" in said[0] and "keeps every metric" in said[0]
    offline = Path(said[0].rsplit("wandb sync ", 1)[1])
    assert offline.is_dir() and offline.name.startswith("offline-run-") and offline.parent == run / "wandb"
    attempt, = run.glob("wandb/run-*/logs/debug.log")  # the online attempt: wandb's own log of the bound it used
    assert "communicating run to backend with 4.0 second timeout" in attempt.read_text()

    # the offline run file holds every logged row, value for value
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    history = {h["_step"]: h for h in wandb_reader.history(wandb_reader.run_file(run))}
    assert {r["step"] for r in rows} == set(history) == {2, 4, 6, 8, 10, 12}
    for row in rows:
        step = row.pop("step")
        assert row.items() <= history[step].items(), step
    assert "test/accuracy" in wandb_reader.summary(wandb_reader.run_file(run))


# ---------------------------------------------------------------- model artifact


def test_log_model_puts_the_folder_in_the_offline_run_as_a_model_artifact(wandb_env, tiny_bert, tmp_path):
    tracker = Tracker(TrackingConfig(), tmp_path, {}, True, "t")
    tracker.log({"x": 1.0}, 1)
    tracker.log_model(tiny_bert, "tiny bert/run 1", ["best"])
    tracker.finish()
    f = wandb_reader.run_file(tmp_path)
    artifact, = [r.artifact for r in wandb_reader.records(f) if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "model" and artifact.name == "tiny-bert-run-1" and "best" in artifact.aliases
    files = {str(p.relative_to(tiny_bert)): p for p in tiny_bert.rglob("*") if p.is_file()}
    entries = {e.path: e for e in artifact.manifest.contents}
    assert set(entries) == set(files) and "model.safetensors" in entries
    for name, path in files.items():  # the exact bytes, kept in place for `wandb sync`
        e = entries[name]
        assert e.size == path.stat().st_size and Path(e.local_path) == path
        assert e.digest == base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_log_model_is_configured_by_tracking_log_model():
    assert load_config(QS).tracking.log_model == "none"
    assert load_config(QS, ["tracking.log_model=best"]).tracking.log_model == "best"
    assert load_config(QS, ["tracking.log_model=none"]).tracking.log_model == "none"
    with pytest.raises(ConfigError, match="tracking.log_model"):
        load_config(QS, ["tracking.log_model=all"])


@pytest.mark.parametrize("which", ["best", "final"])
def test_a_run_with_tracking_log_model_logs_that_model_as_an_artifact(which, wandb_env, tiny_bert, tmp_path):
    """The Trainer calls log_model at the end: best = RUN/model (the best eval's weights), final = the last step's
    weights (exported beside it when the best step is another); the artifact's files are that folder's."""
    run = tmp_path / "run"
    proc = _train(tmp_path, {}, model=tiny_bert, out=run, **{"tracking.log_model": which, "train.max_steps": 6, "train.eval_every": 2,
                                                            "train.metric_for_best": "eval/loss", "optim.lr": 5e-2})
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = json.loads((run / "metrics.json").read_text())["best/step"]
    folder = run / "model" if which == "best" or best == 6 else run / "model-final"
    artifact, = [r.artifact for r in wandb_reader.records(wandb_reader.run_file(run)) if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "model" and which in artifact.aliases and f"step-{best if which == 'best' else 6}" in artifact.aliases
    entries = {e.path: e for e in artifact.manifest.contents}
    assert Path(entries["model.safetensors"].local_path) == folder / "model.safetensors"
