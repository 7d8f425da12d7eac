"""The training loop. The order of a step is written once, here:

forward -> backward -> (on the last micro-batch) clip -> step -> LR step -> zero
-> log -> eval -> best model / early stop -> checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate.utils import DistributedType, set_seed

from shardtune import ShardtuneError, failpoints
from shardtune.checkpoint import (
    METRICS_FILE,
    MODEL_DIR,
    choose_run_dir,
    export_model,
    find_checkpoint,
    read_state,
    save_checkpoint,
    save_config,
    step_dir,
    write_json,
)
from shardtune.config import Config
from shardtune.dist import build_accelerator, from_main, load_state, load_weights, state_bytes, strategy_name
from shardtune.models import load_tokenizer
from shardtune.optim import build_optimizer, build_scheduler
from shardtune.perf import Throughput, Window, environment
from shardtune.guard import StepChecks
from shardtune.preempt import Preemption
from shardtune.progress import Progress
from shardtune.tasks import build_task
from shardtune.tracking import Tracker

BEST_METRICS = {
    "classification": ("eval/loss", "eval/accuracy", "eval/f1_macro"),
    "causal_lm": ("eval/loss", "eval/perplexity"),
    "sft": ("eval/loss", "eval/perplexity"),
}


@dataclass
class RunState:
    """What a checkpoint needs besides model/optimizer/RNG: everything here is JSON."""

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


def train(cfg: Config, config_name: str = "run") -> dict[str, float]:
    allowed = BEST_METRICS[cfg.task]
    if cfg.train.metric_for_best not in allowed:
        raise ShardtuneError(f"train.metric_for_best {cfg.train.metric_for_best!r} is not logged for {cfg.task}; use one of {', '.join(allowed)}.")
    preemption = Preemption(cfg.dist.term_grace_seconds)  # from the start: a signal during model loading counts too
    try:
        return _train(cfg, config_name, preemption)
    finally:
        preemption.restore()


def _train(cfg: Config, config_name: str, preemption: Preemption) -> dict[str, float]:
    acc = build_accelerator(cfg)
    set_seed(cfg.train.seed)
    run_dir = Path(from_main(acc, str(choose_run_dir(cfg, config_name)) if acc.is_main_process else None))
    ckpt = from_main(acc, find_checkpoint(run_dir, cfg.train.resume) if acc.is_main_process else None)

    tokenizer = load_tokenizer(cfg.model)
    task = build_task(cfg, acc, tokenizer)
    optimizer = build_optimizer(task.model, cfg.optim)
    model, optimizer = acc.prepare(task.model, optimizer)
    total = task.total_steps()
    # Stepped by hand on optimizer steps only; Accelerate's wrapper would step it once per process.
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    metric = cfg.train.metric_for_best
    greater = cfg.train.greater_is_better
    run = RunState(best_metric=metric, greater=greater if greater is not None else metric.endswith(("accuracy", "f1_macro")))
    if ckpt is not None:
        run = _resume(acc, ckpt, model, scheduler, task, cfg)

    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(run_dir, cfg)
    perf = Throughput(acc, model, task.seq_len(), cfg.train.mixed_precision)
    tracker = Tracker(
        cfg.tracking, run_dir, cfg.to_dict(), acc.is_main_process, run_dir.name, run_id=run.wandb_id, meta={"env": environment(acc)}
    )
    run.wandb_id = from_main(acc, tracker.run_id)
    progress = Progress(total, acc.is_main_process, cfg.train.progress_bar, start=run.step)
    resumed = f", resumed from {ckpt.name} at step {run.step}" if ckpt else ""
    progress.write(f"shardtune: {task.describe()}, {total} steps, {acc.num_processes} process(es) -> {run_dir}{resumed}")

    started, window, last_eval, stop = time.perf_counter(), Window(), run.step, False
    checks = StepChecks(acc, cfg.train.save_every_minutes, preemption)
    # DeepSpeed steps inside backward and skips a non-finite update itself (fp16, bf16, fp32 with clipping); fp16's grad scaler
    # must see every step to skip an overflow and lower its scale. Elsewhere the loop holds the update back.
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    scaled = getattr(acc, "scaler", None) is not None and acc.scaler.is_enabled()
    model.train()
    batches = task.batches()
    if cfg.train.eval_on_start and task.has_split("eval") and run.step == 0:
        start = task.evaluate(model, "eval")
        tracker.log(start, 0)
        progress.write("eval @ step 0 (the starting model): " + " ".join(f"{k}={v:.4f}" for k, v in start.items()))
        window.start = time.perf_counter()
    clock = perf.clock
    while run.step < total and not stop:
        waited = time.perf_counter()
        batch = next(batches, None)
        window.data_s += time.perf_counter() - waited
        if batch is None:  # the data ran out (a finite stream)
            if run.step == 0 and ckpt is None:
                raise ShardtuneError(
                    f"the training data ran out before the first step: {acc.num_processes} process(es) found no full batch "
                    "each (ranks stop together when one runs out); use fewer processes or workers, a smaller batch, or more data."
                )
            progress.write(f"data exhausted at step {run.step}")
            break
        with acc.accumulate(model):
            t0 = clock.now()
            loss = failpoints.loss(task.loss(model(**batch), batch), acc.process_index, run.step + 1)
            window.add(loss, batch)
            checks.watch_loss(loss)
            acc.backward(loss)
            t1 = clock.now()
            clock.add("forward_backward", t0, t1)
            if acc.sync_gradients:
                grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or math.inf)
                lr = scheduler.get_last_lr()[0]
                verdict = checks.agree(None if scaled else grad_norm)  # fp16: an inf grad is the scaler's to handle
                if not verdict.nonfinite or scaled or deepspeed:  # those hold a non-finite update back themselves
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                clock.add("optimizer", t1, clock.now())
        if not acc.sync_gradients:
            continue
        run.step += 1
        window.steps += 1
        progress.step()
        failpoints.hit("step", acc.process_index, run.step)
        if verdict.nonfinite or run.nonfinite_streak:
            _nonfinite(acc, run, verdict.nonfinite, tracker, progress, run_dir, cfg)
        if verdict.stop:  # save before anything talks to W&B: under Slurm its service gets the signal too
            perf.settle(window, run)
            _checkpoint(acc, task, run, scheduler, run_dir, cfg)
        if run.step % cfg.train.log_every == 0 or run.step == total or verdict.stop:
            metrics = perf.metrics(window, lr, grad_norm, run)
            metrics.update({"train/nonfinite_steps": run.nonfinite_steps, "train/rollbacks": run.rollbacks})
            tracker.log({**metrics, **task.stats()}, run.step)
            progress.log(run.step, metrics)
            window = Window()
        if verdict.stop:
            return _preempted(acc, run, run_dir, preemption, tracker, progress)
        if task.has_split("eval") and cfg.train.eval_every and run.step % cfg.train.eval_every == 0 and run.step < total:
            stop = _eval_and_select(acc, task, model, run, tracker, progress, run_dir, cfg)
            last_eval, window.start = run.step, time.perf_counter()  # throughput counts training time only
        every = cfg.train.save_every
        if verdict.save or (every and (run.step % every == 0 or stop)):
            perf.settle(window, run)
            _checkpoint(acc, task, run, scheduler, run_dir, cfg)
            checks.saved()
            window.start = time.perf_counter()
    preemption.restore()

    return _finish(acc, task, model, optimizer, run, tracker, progress, run_dir, last_eval, started, cfg)


def _resume(acc, ckpt: Path, model, scheduler, task, cfg: Config) -> RunState:
    """Load a checkpoint into the prepared model/optimizer/schedule/data stream; returns its run state."""
    saved = read_state(ckpt)
    _check_same_model(saved, ckpt, cfg)
    _report_changes(acc, saved["config"], cfg)
    if _zero_reshard(acc, saved):
        from shardtune.export import checkpoint_state_dict

        load_state(acc, model, lambda: checkpoint_state_dict(ckpt))
        if acc.is_main_process:
            warnings.warn(
                f"{ckpt} was saved by {saved['world_size']} process(es) under {saved['strategy']}, this run is "
                f"{acc.num_processes} under {strategy_name(acc)}: "
                "the model weights are consolidated and kept; the optimizer state and RNG states start fresh.",
                stacklevel=1,
            )
    else:
        acc.load_state(str(ckpt))  # model, optimizer, every rank's RNG
    scheduler.load_state_dict(saved["scheduler"])
    task.restore(saved["data"])
    return RunState(**saved["run"])


def _finish(acc, task, model, optimizer, run: RunState, tracker, progress, run_dir: Path, last_eval: int, started: float, cfg: Config) -> dict:
    """Final eval, the best (or last) model exported to RUN/model, test metrics, metrics.json and the W&B summary."""
    metric, tokenizer = run.best_metric, task.tokenizer
    bytes_per_rank = state_bytes(acc, model, optimizer)  # training's peak, before final eval and export
    if task.has_split("eval") and last_eval != run.step:
        _eval_and_select(acc, task, model, run, tracker, progress, run_dir, cfg)
    if run.best_value is None:  # no eval: the final weights are the model
        export_model(acc, model, tokenizer, task.labels, run_dir / MODEL_DIR)
    elif run.best_step != run.step:
        load_weights(acc, model, Path(run.best_dir))
        progress.write(f"best model: step {run.best_step} ({metric}={run.best_value:.4f})")
        if Path(run.best_dir) != (run_dir / MODEL_DIR).resolve():
            export_model(acc, model, tokenizer, task.labels, run_dir / MODEL_DIR)
    result = {"train/steps": run.step, "train/runtime_s": time.perf_counter() - started}
    result.update({"train/samples": run.samples, "train/tokens": run.tokens})
    result.update({f"dist/{k}": v for k, v in bytes_per_rank.items()})
    result.update({"dist/strategy": strategy_name(acc), "dist/num_processes": acc.num_processes})
    if run.best_value is not None:
        result.update({"best/step": run.best_step, f"best/{metric}": run.best_value})
    if task.has_split("test"):
        result.update(task.evaluate(model, "test"))
    progress.close()
    if acc.is_main_process:
        write_json(run_dir / METRICS_FILE, result)
        tracker.summary(result)
        shown = {k: round(v, 4) for k, v in result.items() if k.startswith(("test/", "best/"))}
        print(f"done: {shown} -> {run_dir}", flush=True)
    tracker.finish()
    acc.end_training()
    return result


MODEL_KEYS = ("name_or_path", "init", "preset", "arch", "lora")


def _check_same_model(saved: dict, ckpt: Path, cfg: Config) -> None:
    """A checkpoint of another model cannot load: say so before Accelerate fails on tensor shapes."""
    was_model = {k: saved["config"]["model"].get(k) for k in MODEL_KEYS}
    now_model = {k: cfg.to_dict()["model"][k] for k in MODEL_KEYS}
    if saved["config"]["task"] != cfg.task or was_model != now_model:
        diff = ", ".join(f"model.{k}: {was_model[k]!r} -> {now_model[k]!r}" for k in MODEL_KEYS if was_model[k] != now_model[k])
        raise ShardtuneError(
            f"checkpoint {ckpt} is of another model ({diff or 'task ' + saved['config']['task']}); "
            "resume with the config it was saved with, or set train.resume=never."
        )


RESUME_NOISE = {"train.resume", "output.overwrite", "output.dir"}  # differ between a run and its resume by design


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _report_changes(acc, saved: dict, cfg: Config) -> None:
    """Resuming with another config is allowed (longer runs, new LR...), but never silent: name every changed key."""
    from shardtune.tracking import redact

    was, now = _flat(redact(saved)), _flat(redact(cfg.to_dict()))
    changed = [f"{k}: {was.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}"
               for k in sorted(set(was) | set(now)) if k not in RESUME_NOISE and was.get(k) != now.get(k)]
    if changed and acc.is_main_process:
        warnings.warn("resuming with a config that differs from the checkpoint's: " + "; ".join(changed), stacklevel=1)


def _nonfinite(acc, run: RunState, bad: bool, tracker, progress, run_dir: Path, cfg: Config) -> None:
    """Count a skipped step; after `nonfinite_patience` in a row, roll back to the last checkpoint before them."""
    if not bad:
        run.nonfinite_streak = 0
        return
    run.nonfinite_steps += 1
    run.nonfinite_streak += 1
    tracker.log({"train/nonfinite_steps": run.nonfinite_steps}, run.step)
    progress.write(f"step {run.step}: NaN/Inf loss or grad norm on some rank: the update is skipped on every rank "
                   f"({run.nonfinite_streak} in a row, {run.nonfinite_steps} in all)")
    if run.nonfinite_streak < cfg.train.nonfinite_patience:
        return
    first = run.step - run.nonfinite_streak + 1
    ckpt = from_main(acc, find_checkpoint(run_dir, "auto", before=first - 1) if acc.is_main_process else None)
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
    acc.load_state(str(ckpt))  # weights, optimizer state, RNG; the step count, LR schedule and data position go on
    run.rollbacks, run.rolled_back_at, run.nonfinite_streak = run.rollbacks + 1, run.step, 0
    tracker.log({"train/rollbacks": run.rollbacks}, run.step)
    progress.write(f"rolled back to {Path(ckpt).name} after {cfg.train.nonfinite_patience} non-finite steps in a row; "
                   f"going on with the data after step {run.step}")


def _zero_reshard(acc, saved: dict) -> bool:
    """ZeRO shards are per rank and DeepSpeed's own format: into another number of ranks or another
    strategy they load only consolidated (the model; optimizer state starts fresh)."""
    was, now = saved.get("strategy", ""), strategy_name(acc)
    zero = was.startswith("zero") or now.startswith("zero")
    return zero and (saved.get("world_size", 1) != acc.num_processes or was != now)


def _eval_and_select(acc, task, model, run: RunState, tracker, progress, run_dir: Path, cfg: Config) -> bool:
    """Eval; export the model when it is the best so far. True when early stopping says stop."""
    metrics = task.evaluate(model, "eval")
    tracker.log(metrics, run.step)
    rows = task.generations(model)
    if rows:
        tracker.table("eval/generations", ["prompt", "completion"], rows, run.step)
    improved = run.improved(metrics[run.best_metric])
    if improved:
        run.best_value, run.best_step, run.best_dir = metrics[run.best_metric], run.step, str((run_dir / MODEL_DIR).resolve())
        export_model(acc, model, task.tokenizer, task.labels, run_dir / MODEL_DIR)
    progress.write(f"eval @ step {run.step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + (" *" if improved else ""))
    patience = cfg.train.early_stopping_patience
    if patience and run.bad_evals >= patience:
        progress.write(f"early stopping: {run.best_metric} has not improved for {patience} evals")
        return True
    return False


def _preempted(acc, run: RunState, run_dir: Path, preemption, tracker, progress) -> dict:
    """The checkpoint of this step is saved: requeue under Slurm and end the process's run cleanly (exit 0)."""
    from shardtune.preempt import requeue

    ckpt = step_dir(run_dir, run.step)
    progress.write(f"preempted (signal {preemption.received or 'on another rank'}) at step {run.step}: checkpoint saved in {ckpt}")
    progress.close()
    tracker.finish()
    acc.end_training()
    # last: Slurm ends a requeued job at once (SIGTERM to all its processes), so W&B must be closed before
    requeued = requeue() if acc.is_main_process else None
    if acc.is_main_process:
        print(f"requeued job {requeued}" if requeued else "rerun the same command to resume", flush=True)
    preemption.restore()
    return {"train/steps": run.step, "preempted": True}


def _checkpoint(acc, task, run: RunState, scheduler, run_dir: Path, cfg: Config) -> None:
    from shardtune.tracking import redact

    config = redact(cfg.to_dict())
    state = {
        "run": asdict(run), "scheduler": scheduler.state_dict(), "world_size": acc.num_processes, "strategy": strategy_name(acc),
        "labels": task.labels, "data": task.data_state(), "config": config,
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
    }
    save_checkpoint(acc, run_dir, run.step, state, cfg.train.save_total_limit, run.best_step)
