"""Reporting to Weights & Biases and TensorBoard (main process only).

W&B goes offline on its own when there is no API key, and when the server
cannot be reached within `tracking.init_timeout_s` (wandb's own init_timeout
bounds the attempt); either way it says once how to upload the run later, and
the offline run keeps every metric. Anything in the config that looks like a
secret is redacted before it leaves the process.
"""

from __future__ import annotations

import contextlib
import json
import netrc
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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


def _secret(value: str) -> bool:
    return redact(value) == REDACTED


def redact_arg(arg: str) -> str:
    """A command-line argument with secrets replaced: `key=value` with a secret-named key, or any secret-looking word
    (an override like `tracking.tags=[ci, hf_...]` holds one inside)."""
    key, eq, value = arg.partition("=")
    if eq and _SECRET_KEY.search(key.rsplit(".", 1)[-1].lstrip("-")):
        return f"{key}={REDACTED}"
    return re.sub(r"[^\s,\[\]{}'\"=:]+", lambda m: REDACTED if _SECRET_VALUE.match(m.group()) else m.group(), arg)


@contextlib.contextmanager
def _argv_redacted():
    """wandb.init records sys.argv[1:] in the run's metadata (Settings._args, no option turns it off alone): the
    command line of a run with a secret override would be uploaded with it."""
    saved = sys.argv
    sys.argv = [saved[0], *map(redact_arg, saved[1:])]
    try:
        yield
    finally:
        sys.argv = saved


def has_wandb_key() -> bool:
    """WANDB_API_KEY, or a `wandb login` entry in the netrc file (NETRC, else ~/.netrc) for the server's host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
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
        self.fell_back = False  # online W&B was unreachable and the run logs offline (said once, with the sync line)
        if not is_main:
            return
        # Every logged row, whatever the backends: for scripts, tests and `tail -f`.
        self.jsonl = open(run_dir / "log.jsonl", "a", buffering=1)
        if "wandb" in cfg.report_to:
            self.run, self.fell_back = _init_wandb(cfg, run_dir, {**redact(config), **(meta or {})}, default_name, run_id)
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

    def log_model(self, folder: Path, name: str, aliases: list[str]) -> None:
        """Log an exported model folder as a W&B artifact of type "model" (e.g. aliases ["best"]). An offline run keeps
        it for `wandb sync`: the files are added in place (policy immutable), so the run folder must keep them."""
        if self.run is None:
            return
        import wandb

        def call(run) -> None:
            artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", name), type="model", metadata={"source": str(folder)})
            artifact.add_dir(str(folder), policy="immutable")
            run.log_artifact(artifact, aliases=list(aliases))

        self._wandb(call)

    def finish(self) -> None:
        if self.run is not None:
            offline = self.run.settings.mode == "offline" or getattr(self.run.settings, "_offline", False)
            path = Path(self.run.dir).parent
            self._wandb(lambda run: run.finish())
            if offline and self.run is not None and not self.fell_back:  # a fallback said it when it happened
                why = "no API key, so this run was logged offline" if not has_wandb_key() else "this run was logged offline (WANDB_MODE or tracking.mode)"
                print(f"W&B: {why}; upload it with: wandb sync {path}", flush=True)
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _init_wandb(cfg: TrackingConfig, run_dir: Path, config: dict, default_name: str, run_id: str | None):
    """(the W&B run or None, whether it fell back to offline because the server could not be reached)."""
    import wandb

    mode = wandb_mode(cfg)
    if mode == "disabled":
        return None, False
    # the run's name, group and tags are W&B metadata, shown and uploaded as they are: a secret pasted there is dropped
    tags = [t for t in list(cfg.tags) + os.environ.get("WANDB_TAGS", "").split(",") if t and not _secret(t)]
    args = dict(
        project=cfg.project or os.environ.get("WANDB_PROJECT") or "shardtune",
        entity=cfg.entity or os.environ.get("WANDB_ENTITY"),
        name=next((n for n in (cfg.run_name, os.environ.get("WANDB_NAME")) if n and not _secret(n)), default_name),
        group=next((g for g in (cfg.group, os.environ.get("WANDB_RUN_GROUP")) if g and not _secret(g)), None),
        tags=tags or None,
        config=config,
        dir=str(run_dir),
        id=run_id or os.environ.get("WANDB_RUN_ID"),
        resume="allow",  # a resumed run continues the same W&B run
        # init_timeout bounds the online attempt (wandb's default is 90 s); the service then answers with a CommError
        settings=wandb.Settings(silent=True, console="off", init_timeout=cfg.init_timeout_s),
    )
    try:
        with _argv_redacted():
            return wandb.init(mode=mode, **args), False
    except wandb.errors.CommError as exc:  # unreachable, timed out, or refused by the server
        if mode in ("offline", "dryrun"):
            raise
        why = str(exc).split("\nConsider increasing", 1)[0]  # the hint names wandb's setting; ours is in the message
        reason = f"{type(exc).__name__}: {' '.join(why.split())}"
    wandb.teardown()  # the failed attempt still holds the run id in W&B's service
    with _argv_redacted():
        run = wandb.init(mode="offline", **args)
    url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    print(
        f"W&B: {url} could not be used within tracking.init_timeout_s={cfg.init_timeout_s:g} s ({reason}), so this run "
        f"logs to W&B offline and keeps every metric; upload it later with: wandb sync {Path(run.dir).parent}",
        flush=True,
    )
    return run, True
