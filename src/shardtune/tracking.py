"""Reporting to Weights & Biases and TensorBoard (main process only).

W&B goes offline on its own when there is no API key, and says once how to
upload the run later. Anything in the config that looks like a secret is
redacted before it leaves the process.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from shardtune.config import TrackingConfig

# a key *named* like a secret (hub_token, api_key, password), not one that mentions tokens (eos_token_id, tokenize_batch)
_SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|token|secret|password|passwd|credentials?|auth)$", re.I)
_SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{20,}|[0-9a-f]{40}|sk-[A-Za-z0-9]{20,}|(local-)?[0-9a-f]{40,86})$")
REDACTED = "***redacted***"


def redact(value: Any, key: str = "") -> Any:
    """A copy of `value` with secret-looking keys and values replaced."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, key) for v in value]
    if value is not None and (_SECRET_KEY.search(key) or (isinstance(value, str) and _SECRET_VALUE.match(value))):
        return REDACTED
    return value


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode(cfg: TrackingConfig) -> str:
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if has_wandb_key() else "offline"


class Tracker:
    """Fan-out of scalar metrics to the configured backends; a no-op off the main process."""

    def __init__(
        self, cfg: TrackingConfig, run_dir: Path, config: dict, is_main: bool, default_name: str,
        run_id: str | None = None, meta: dict | None = None,
    ):
        """`config` is the user's config (secret-looking values redacted); `meta` is ours (git SHA, versions), kept as is."""
        self.run = None
        self.tb = None
        self.jsonl = None
        if not is_main:
            return
        # Every logged row, whatever the backends: for scripts, tests and `tail -f`.
        self.jsonl = open(run_dir / "log.jsonl", "a", buffering=1)
        if "wandb" in cfg.report_to:
            self.run = _init_wandb(cfg, run_dir, {**redact(config), **(meta or {})}, default_name, run_id)
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def _wandb(self, call) -> None:
        """Hand `call(run)` to W&B. Its service is a separate process that Slurm's SIGTERM ends too (it reaches every
        process of the job): then say so once and go on without W&B, so the run can still save and requeue."""
        if self.run is None:
            return
        try:
            call(self.run)
        except ConnectionError as exc:
            warnings.warn(
                f"W&B's service is gone ({type(exc).__name__}: {exc}), so this process logs no more to W&B; every metric "
                f"still goes to log.jsonl, and what W&B got before is in {self.run.dir} (a resumed run continues it).",
                stacklevel=3,
            )
            self.run = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._wandb(lambda run: run.log(clean, step=step))
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        """A small table (e.g. generations at an eval): a W&B Table, TensorBoard text, a log.jsonl row."""
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, name: [dict(zip(columns, r)) for r in rows]}) + "\n")
        if self.run is not None:
            import wandb

            self._wandb(lambda run: run.log({name: wandb.Table(columns=columns, data=rows)}, step=step))
        if self.tb is not None:
            self.tb.add_text(name, "\n\n".join(" | ".join(map(str, r)) for r in rows), step)

    def summary(self, values: dict[str, Any]) -> None:
        self._wandb(lambda run: run.summary.update(values))

    def finish(self) -> None:
        if self.run is not None:
            offline = self.run.settings.mode == "offline" or getattr(self.run.settings, "_offline", False)
            path = Path(self.run.dir).parent
            self._wandb(lambda run: run.finish())
            if offline and self.run is not None:
                print(f"W&B: no API key, so this run was logged offline; upload it with: wandb sync {path}", flush=True)
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _init_wandb(cfg: TrackingConfig, run_dir: Path, config: dict, default_name: str, run_id: str | None):
    import wandb

    mode = wandb_mode(cfg)
    if mode == "disabled":
        return None
    tags = list(cfg.tags) + [t for t in os.environ.get("WANDB_TAGS", "").split(",") if t]
    return wandb.init(
        project=cfg.project or os.environ.get("WANDB_PROJECT") or "shardtune",
        entity=cfg.entity or os.environ.get("WANDB_ENTITY"),
        name=cfg.run_name or os.environ.get("WANDB_NAME") or default_name,
        group=cfg.group or os.environ.get("WANDB_RUN_GROUP"),
        tags=tags or None,
        config=config,
        dir=str(run_dir),
        mode=mode,
        id=run_id or os.environ.get("WANDB_RUN_ID"),
        resume="allow",  # a resumed run continues the same W&B run
        settings=wandb.Settings(silent=True, console="off"),
    )
