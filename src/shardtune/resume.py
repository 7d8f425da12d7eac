"""Resuming a run from a checkpoint, and rolling back to one after a streak of non-finite steps.

On resume the strategy loads model and optimizer state (resharded onto this run's layout where the format
allows, see distributed/), each rank its RNG state, the LR schedule and every rank's data position. What
could not be kept is said in one sentence. A config that changed since the checkpoint is reported key by
key; a changed learning rate is applied from the resumed step on (the schedule's shape comes from the
config anyway), and a changed model or task is refused.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from shardtune import ShardtuneError
from shardtune.checkpoint import CKPT_DIR, find_checkpoint, read_state
from shardtune.config import Config, MeshConfig
from shardtune.distributed import rng
from shardtune.state import RunState
from shardtune.tracking import redact

if TYPE_CHECKING:
    from shardtune.trainer import Trainer

MODEL_KEYS = ("name_or_path", "init", "preset", "arch", "lora")
RESUME_NOISE = {"train.resume", "output.overwrite", "output.dir", "output.staging"}  # differ between a run and its resume by design


def resume(trainer: "Trainer", ckpt: Path) -> RunState:
    """Load `ckpt` into the trainer's strategy, schedule and task; returns its run state."""
    s, cfg = trainer.strategy, trainer.cfg
    saved = read_state(ckpt)
    _check_same_model(saved.config, ckpt, cfg)
    changed = _report_changes(s, saved.config, cfg)
    scratch = trainer.run_dir / CKPT_DIR / f".scratch-{ckpt.name}"
    lost = s.load(ckpt, saved.strategy, saved.world_size, scratch)
    s.barrier()
    if s.is_main:
        shutil.rmtree(scratch, ignore_errors=True)
    saved_mesh = saved.config.get("dist", {}).get("mesh", MeshConfig().model_dump())  # older checkpoints: one axis
    same_layout = saved.world_size == s.world and saved.strategy == s.name and saved_mesh == cfg.dist.mesh.model_dump()
    if same_layout or s.rank < saved.world_size:
        rng.load(ckpt, s.rank)
    trainer.scheduler.load_state_dict(saved.scheduler)
    _apply_lr(trainer, saved.config, changed)
    trainer.task.load_state_dict(saved.data)
    if not same_layout and s.is_main:
        kept = lost or "model, optimizer state, LR schedule and data position are kept"
        fresh = "; the RNG states of the ranks it did not have start from the seed" if s.world > saved.world_size else ""
        warnings.warn(f"{ckpt} was saved by {saved.world_size} process(es) under {saved.strategy}{_mesh(saved_mesh)}, this run is "
                      f"{s.world} under {s.name}{_mesh(cfg.dist.mesh.model_dump())}: {kept}{fresh}.", stacklevel=2)
    elif lost and s.is_main:
        warnings.warn(lost, stacklevel=2)
    return saved.run


def _mesh(axes: dict) -> str:
    named = [f"{k} {v}" for k, v in axes.items() if k in ("dp_replicate", "tp", "sp", "cp") and v != 1]
    return f" (mesh {' x '.join(named)})" if named else ""


def _apply_lr(trainer: "Trainer", saved: dict, changed: dict) -> None:
    """A changed optim.lr is the new peak from the resumed step on (the restored schedule would keep the old one)."""
    if "optim.lr" not in changed:
        return
    sched = trainer.scheduler
    sched.base_lrs = [trainer.cfg.optim.lr for _ in sched.base_lrs]
    for group, lam, base in zip(sched.optimizer.param_groups, sched.lr_lambdas, sched.base_lrs):
        group["lr"] = base * lam(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
    if trainer.strategy.is_main:
        print(f"optim.lr {saved['optim']['lr']} -> {trainer.cfg.optim.lr}: the new peak learning rate applies from step {sched.last_epoch} on", flush=True)


def _check_same_model(saved: dict, ckpt: Path, cfg: Config) -> None:
    """A checkpoint of another model cannot load: say so before a library fails on tensor shapes."""
    was_model = {k: saved["model"].get(k) for k in MODEL_KEYS}
    now_model = {k: cfg.to_dict()["model"][k] for k in MODEL_KEYS}
    if saved["task"] != cfg.task or was_model != now_model:
        diff = ", ".join(f"model.{k}: {was_model[k]!r} -> {now_model[k]!r}" for k in MODEL_KEYS if was_model[k] != now_model[k])
        raise ShardtuneError(
            f"checkpoint {ckpt} is of another model ({diff or 'task ' + saved['task']}); "
            "resume with the config it was saved with, or set train.resume=never."
        )


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _report_changes(strategy, saved: dict, cfg: Config) -> dict:
    """Resuming with another config is allowed (longer runs, new LR...), but never silent: name every changed key."""
    was, now = _flat(redact(saved)), _flat(redact(cfg.to_dict()))
    changed = {k: (was.get(k, "(unset)"), now.get(k, "(unset)")) for k in sorted(set(was) | set(now))
               if k not in RESUME_NOISE and was.get(k) != now.get(k)}
    if changed and strategy.is_main:
        said = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        warnings.warn("resuming with a config that differs from the checkpoint's: " + said, stacklevel=2)
    return changed


def nonfinite(trainer: "Trainer", bad: bool) -> None:
    """Count a skipped step; after `nonfinite_patience` in a row, roll back to the last checkpoint before them."""
    run, s, cfg = trainer.run, trainer.strategy, trainer.cfg
    if not bad:
        run.nonfinite_streak = 0
        return
    run.nonfinite_steps += 1
    run.nonfinite_streak += 1
    trainer.tracker.log({"train/nonfinite_steps": run.nonfinite_steps}, run.step)
    trainer.progress.write(f"step {run.step}: NaN/Inf loss or grad norm on some rank: the update is skipped on every rank "
                           f"({run.nonfinite_streak} in a row, {run.nonfinite_steps} in all)")
    if run.nonfinite_streak < cfg.train.nonfinite_patience:
        return
    first = run.step - run.nonfinite_streak + 1
    ckpt = s.from_main(find_checkpoint(trainer.run_dir, "auto", before=first - 1) if s.is_main else None)
    if ckpt is None:
        raise ShardtuneError(
            f"steps {first}-{run.step} all had a NaN/Inf loss or grad norm and there is no checkpoint before them to roll back to; "
            "lower optim.lr, check the data of those steps, or set train.save_every so the run can roll back."
        )
    if run.rolled_back_at == first - 1:
        raise ShardtuneError(
            f"steps {first}-{run.step} had a NaN/Inf loss or grad norm right after the rollback at step {first - 1}, "
            "so rolling back did not help; stopping: lower optim.lr or optim.max_grad_norm, or inspect the data of those steps."
        )
    s.load(ckpt, s.name, s.world, trainer.run_dir / CKPT_DIR / ".scratch-rollback")  # weights, optimizer state
    rng.load(ckpt, s.rank)  # the step count, LR schedule and data position go on
    run.rollbacks, run.rolled_back_at, run.nonfinite_streak = run.rollbacks + 1, run.step, 0
    trainer.tracker.log({"train/rollbacks": run.rollbacks}, run.step)
    trainer.progress.write(f"rolled back to {Path(ckpt).name} after {cfg.train.nonfinite_patience} non-finite steps in a row; "
                           f"going on with the data after step {run.step}")
