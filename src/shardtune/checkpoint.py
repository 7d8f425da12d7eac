"""Run folders and the final export in HF format (safetensors)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from shardtune import ShardtuneError
from shardtune.config import Config
from shardtune.tracking import redact

MODEL_DIR = "model"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
LABELS_FILE = "label_map.json"


def choose_run_dir(cfg: Config, config_name: str) -> Path:
    """The run folder: output.dir, else runs/<config name>-<timestamp>. Refuses to clobber a used folder."""
    if cfg.output.dir:
        path = Path(cfg.output.dir).expanduser()
    else:
        path = Path("runs") / f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and any(path.iterdir()) and not cfg.output.overwrite:
        raise ShardtuneError(f"run folder {path} is not empty; choose another output.dir or set output.overwrite=true.")
    return path


def write_json(path: Path, data: Any) -> None:
    """Written whole or not at all (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_config(run_dir: Path, cfg: Config) -> None:
    """The resolved config, secrets redacted; `shardtune train RUN/config.yaml` reruns it."""
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False))


def export_model(acc, model, tokenizer, labels: list[str], out: Path) -> None:
    """HF folder: safetensors weights, tokenizer, label map. Collective: call on every rank."""
    state = acc.get_state_dict(model)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        acc.unwrap_model(model).save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
        write_json(out / LABELS_FILE, {"id2label": dict(enumerate(labels))})
    acc.wait_for_everyone()
