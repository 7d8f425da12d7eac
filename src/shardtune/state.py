"""The run's state besides model, optimizer and RNG: `trainer_state.json`, written and read only here.

Schema (version 1): {"version", "run": RunState fields, "world_size", "strategy", "scheduler" (the LR
schedule's state_dict), "data" (every rank's data position, in rank order), "labels", "config" (the
resolved config, secrets redacted), "config_sha256"}. A checkpoint of a newer version is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from shardtune import ShardtuneError
from shardtune.jsonfile import write_json

STATE_FILE = "trainer_state.json"
VERSION = 1


@dataclass
class RunState:
    """Counters and the best-model record of a run."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    best_metric: str = "eval/loss"
    greater: bool = False
    best_value: float | None = None
    best_step: int = 0
    bad_evals: int = 0
    best_dir: str | None = None  # where the best model was exported (an earlier run folder, after a resume elsewhere)
    wandb_id: str | None = None
    nonfinite_steps: int = 0  # optimizer steps skipped for a NaN/Inf loss or grad norm, over the whole run
    nonfinite_streak: int = 0
    rollbacks: int = 0
    rolled_back_at: int | None = None  # the step at which the last rollback happened

    def improved(self, value: float) -> bool:
        better = self.best_value is None or (value > self.best_value if self.greater else value < self.best_value)
        self.bad_evals = 0 if better else self.bad_evals + 1
        return better


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


@dataclass
class TrainerState:
    run: RunState
    world_size: int
    strategy: str
    scheduler: dict
    data: list = field(default_factory=list)
    labels: list | None = None
    config: dict = field(default_factory=dict)
    config_sha256: str = ""
    version: int = VERSION

    def write(self, folder: Path) -> None:
        write_json(Path(folder) / STATE_FILE, {**asdict(self), "config_sha256": config_hash(self.config)})

    @classmethod
    def read(cls, folder: Path) -> "TrainerState":
        path = Path(folder) / STATE_FILE
        raw = json.loads(path.read_text())
        version = raw.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise ShardtuneError(
                f"{path} has trainer-state version {version!r}, which this shardtune (version {VERSION}) cannot read; "
                "resume it with the shardtune that wrote it, or set train.resume=never."
            )
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in raw.items() if k in known}, "run": RunState(**raw["run"])})
