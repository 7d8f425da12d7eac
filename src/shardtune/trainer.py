"""The Trainer: setup, one optimizer step, eval, checkpoint, finish. The order of a step is written once, here:

fetch -> count -> forward/backward per micro-batch -> clip -> fetch the next step -> agree (one collective)
-> update (or skip) -> LR step -> log -> eval -> best model / early stop -> checkpoint.

The run's parts live on the Trainer: the strategy (distributed/), the task (tasks/), the run state
(state.py), the tracker, the progress, the run folder and the config. Resume and rollback are in resume.py.
"""

from __future__ import annotations

import copy
import itertools
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from shardtune import ShardtuneError, failpoints, storage
from shardtune.checkpoint import (
    CONFIG_FILE, METRICS_FILE, MODEL_DIR, begin_checkpoint, choose_run_dir, export_model, resume_point, save_config, seal_checkpoint,
    step_dir, write_json,
)
from shardtune.config import Config
from shardtune.distributed import build_strategy
from shardtune.guard import StepChecks, Verdict
from shardtune.models import is_peft, load_tokenizer, read_exported_state
from shardtune.optim import build_scheduler
from shardtune.perf import Throughput, Window, environment
from shardtune.preempt import Preemption
from shardtune.progress import Progress
from shardtune.run_store import RunStore
from shardtune.state import RunState, TrainerState
from shardtune.tasks import build_task
from shardtune.tracking import Tracker, redact


def train(cfg: Config, config_name: str = "run") -> dict[str, float]:
    preemption = Preemption(cfg.dist.term_grace_seconds)  # from the start: a signal during model loading counts too
    try:
        return Trainer(cfg, config_name, preemption).train()
    finally:
        preemption.restore()


COMMAND = "shardtune train CONFIG"  # what was run: cli.main sets it (shardtune launch ... for launched ranks)


def resume_command(cfg: Config, run_dir: Path) -> str:
    """The command that resumes this run: what was run, with the run folder pinned when it was a default one (a
    timestamped name would be new the next time)."""
    import shlex

    return COMMAND if cfg.output.dir else f"{COMMAND} {shlex.quote(f'output.dir={run_dir}')}"


class Trainer:
    def __init__(self, cfg: Config, config_name: str, preemption: Preemption):
        from shardtune.resume import resume

        self.strategy = s = build_strategy(cfg)
        self.cfg = cfg = s.cfg  # mixed_precision resolved: what the run records (config.yaml, W&B)
        self.preemption = preemption
        set_seed(cfg.train.seed)
        self.store = RunStore(cfg.output.dir) if cfg.output.dir and storage.is_url(cfg.output.dir) else None
        self.run_dir = Path(s.from_main(str(choose_run_dir(cfg, config_name)) if s.is_main else None))
        self.ckpt = resume_point(s, cfg, self.run_dir, self.store)
        self.task = build_task(cfg, s, load_tokenizer(cfg.model))
        failpoints.hit("load", s.rank, 0)
        s.prepare(self.task.model)
        self.total = self.task.total_steps()
        # Stepped by hand on optimizer steps only; Accelerate's wrapper would step it once per process.
        self.scheduler = build_scheduler(s.optimizer, cfg.optim, self.total)
        metric, greater = cfg.train.metric_for_best, cfg.train.greater_is_better
        self.run = RunState(best_metric=metric, greater=greater if greater is not None else metric.endswith(("accuracy", "f1_macro", "margin", "reward")))
        if s.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        s.barrier()
        if self.ckpt is not None:
            self.run = resume(self, self.ckpt)
        if s.is_main:
            save_config(self.run_dir, cfg)
            self.mirror(self.run_dir / CONFIG_FILE)
        self.perf = Throughput(s, s.unwrapped(), self.task.seq_len(), s.mixed_precision)
        self.tracker = Tracker(cfg.tracking, self.run_dir, cfg.to_dict(), s.is_main, self.run_dir.name, run_id=self.run.wandb_id,
                               meta={"env": environment(s.world)})
        self.run.wandb_id = s.from_main(self.tracker.run_id)
        if self.ckpt is not None:  # what the resume restored of the optimizer (0: it started fresh)
            self.tracker.log({"resume/optim_state_norm": s.optimizer_state_norm()}, self.run.step)
        self.progress = Progress(self.total, s.is_main, cfg.train.progress_bar, start=self.run.step)
        self.progress.write(f"mixed precision: {s.precision_note}")
        self.checks = StepChecks(s, cfg.train.save_every_minutes, preemption)
        self.window = Window()
        self.pending = None  # a checkpoint being written in the background (checkpoint.PendingSave)
        self.data_position = None  # the task's position after the last step's batches (taken before the next step's)
        self.first_step = self.run.step

    # -------------------------------------------------------------- the run
    def train(self) -> dict[str, float]:
        started, run, s = time.perf_counter(), self.run, self.strategy
        resumed = f", resumed from {self.ckpt.name} at step {run.step}" if self.ckpt else ""
        self.progress.write(f"shardtune: {self.task.describe()}, {self.total} steps, {s.world} process(es) [{s.name}] -> {self.run_dir}{resumed}")
        s.model.train()
        self.batches = self.task.batches()
        self.eval_on_start()
        micro = self.fetch()
        if not self.checks.everyone_has(micro is not None):
            if run.step == 0 and self.ckpt is None:
                raise ShardtuneError(
                    f"the training data ran out before the first step: {s.world} process(es) found no full step of "
                    f"{self.cfg.train.grad_accum} micro-batch(es) each; use fewer processes or workers, a smaller batch, or more data."
                )
            micro = None
        last_eval, stop = run.step, False
        while micro is not None and run.step < self.total and not stop:
            verdict, micro, lr = self.step(micro)
            self.after_step(verdict)
            if verdict.stop:  # save before anything talks to W&B: under Slurm its service gets the signal too
                self.checkpoint()
            self.maybe_log(verdict, lr)
            if verdict.stop:
                return self.preempted()
            if self.eval_due():
                stop = self.eval_and_select()
                last_eval, self.window.start = run.step, time.perf_counter()  # throughput counts training time only
            if verdict.save or (self.cfg.train.save_every and (run.step % self.cfg.train.save_every == 0 or stop)):
                self.checkpoint(asynchronous=self.cfg.train.async_save and not stop)
                self.checks.saved()
                self.window.start = time.perf_counter()
            if verdict.out_of_data and run.step < self.total:
                self.progress.write(f"data exhausted at step {run.step}")
                micro = None
        return self.finish(last_eval, started)

    def fetch(self) -> list[dict] | None:
        """The next step's micro-batches from this rank's data, or None when it has no full step left."""
        waited = time.perf_counter()
        micro = list(itertools.islice(self.batches, self.cfg.train.grad_accum))
        self.window.data_s += time.perf_counter() - waited
        return micro if len(micro) == self.cfg.train.grad_accum else None

    def step(self, micro: list[dict]) -> tuple[Verdict, list[dict] | None, float]:
        """One optimizer step; returns the agreement, the next step's micro-batches and the LR it used."""
        s, task, clock, step = self.strategy, self.task, self.perf.clock, self.run.step + 1
        micro = [s.split_batch(b) for b in micro]  # this rank's share of each sequence (the mesh's sp axis)
        sizes = [task.sizes(b) for b in micro]
        # the step's label count over all micro-batches and ranks: each loss sum / it is a share of the global mean
        total = s.data_sum(torch.stack([z.weight for z in sizes]).sum().float().reshape(1)).clamp(min=1)
        t0 = clock.now()
        for i, (batch, size) in enumerate(zip(micro, sizes)):
            with s.micro_batch(last=i == len(micro) - 1):
                loss_sum, _ = task.loss(s.model, batch)
                loss_sum = failpoints.loss(loss_sum, s.rank, step)
                self.window.add(loss_sum, size)
                self.checks.watch_loss(loss_sum)
                s.backward(loss_sum / total[0])
                if self.run.step == self.first_step:
                    s.note_grad_bytes()  # per-rank gradient bytes, the most after any micro-batch of the first step
        t1 = clock.now()
        clock.add("forward_backward", t0, t1)
        failpoints.grads(s.model, s.rank, step)
        norm = s.clip_grad_norm(self.cfg.optim.max_grad_norm)
        self.data_position = task.position()  # after this step's batches, before the next step's
        clock.add("optimizer", t1, clock.now())
        upcoming = self.fetch() if step < self.total else []  # its time is data time
        t2 = clock.now()
        writing = self.pending is not None and not self.pending.done()
        verdict = self.checks.agree(None if s.holds_back_nonfinite else norm, has_next=upcoming is not None, writing=writing)
        if self.pending is not None and not verdict.writing:  # every rank's background write is done: seal it
            self.seal()
        applied = s.optimizer_step(skip=verdict.nonfinite)
        verdict.nonfinite = verdict.nonfinite or (not applied and not s.scales_loss)  # DeepSpeed skipped it itself
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        clock.add("optimizer", t2, clock.now())
        self.grad_norm = s.grad_norm_after_step(norm)
        return verdict, upcoming, lr

    def after_step(self, verdict: Verdict) -> None:
        from shardtune.resume import nonfinite

        self.run.step += 1
        self.window.steps += 1
        self.progress.step()
        failpoints.hit("step", self.strategy.rank, self.run.step)
        if verdict.nonfinite or self.run.nonfinite_streak:
            nonfinite(self, verdict.nonfinite)

    def maybe_log(self, verdict: Verdict, lr: float) -> None:
        run = self.run
        if not (run.step % self.cfg.train.log_every == 0 or run.step == self.total or verdict.stop):
            return
        metrics = self.perf.metrics(self.window, lr, self.grad_norm, run)
        metrics.update({"train/nonfinite_steps": run.nonfinite_steps, "train/rollbacks": run.rollbacks})
        self.tracker.log({**metrics, **self.task.stats()}, run.step)
        self.progress.log(run.step, metrics)
        self.window = Window()

    def eval_due(self) -> bool:
        every = self.cfg.train.eval_every
        return self.task.has_split("eval") and bool(every) and self.run.step % every == 0 and self.run.step < self.total

    def eval_on_start(self) -> None:
        if self.cfg.train.eval_on_start and self.task.has_split("eval") and self.run.step == 0:
            start = self.task.evaluate(self.strategy.model, "eval")
            self.tracker.log(start, 0)
            self.progress.write("eval @ step 0 (the starting model): " + " ".join(f"{k}={v:.4f}" for k, v in start.items()))
            self.window.start = time.perf_counter()

    def eval_and_select(self) -> bool:
        """Eval; export the model when it is the best so far. True when early stopping says stop."""
        run, task = self.run, self.task
        failpoints.hit("eval", self.strategy.rank, run.step)
        metrics = task.evaluate(self.strategy.model, "eval")
        self.tracker.log(metrics, run.step)
        rows = task.generations(self.strategy.model)
        if rows:
            self.tracker.table("eval/generations", ["prompt", "completion", "reward"][: len(rows[0])], rows, run.step)
        improved = run.improved(metrics[run.best_metric])
        if improved:
            run.best_value, run.best_step, run.best_dir = metrics[run.best_metric], run.step, str((self.run_dir / MODEL_DIR).resolve())
            export_model(self.strategy, task.tokenizer, task.labels, self.run_dir / MODEL_DIR)
            self.mirror(self.run_dir / MODEL_DIR)
        self.progress.write(f"eval @ step {run.step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + (" *" if improved else ""))
        patience = self.cfg.train.early_stopping_patience
        if patience and run.bad_evals >= patience:
            self.progress.write(f"early stopping: {run.best_metric} has not improved for {patience} evals")
            return True
        return False

    def checkpoint(self, asynchronous: bool = False) -> None:
        """Checkpoint this step: written and sealed now, or (asynchronous) sealed at the first step where every
        rank's background write is done. An earlier pending checkpoint is sealed first. Logs how long training
        waited for it (`checkpoint/blocked_s`: all of it when synchronous, the copy to host memory when not). Collective."""
        started = time.perf_counter()
        self.seal()
        self.perf.settle(self.window, self.run)
        s, config = self.strategy, redact(self.cfg.to_dict())
        state = TrainerState(run=copy.deepcopy(self.run), world_size=s.world, strategy=s.name, scheduler=self.scheduler.state_dict(),
                             data=s.per_slot(s.gather_objects(self.task.state_dict(self.data_position))), labels=self.task.labels, config=config)
        self.pending = begin_checkpoint(s, self.run_dir, self.run.step, state, self.cfg.train.save_total_limit, self.run.best_step,
                                        asynchronous=asynchronous, store=self.store)
        if not asynchronous:
            self.seal(log=False)
        self.tracker.log({"checkpoint/blocked_s": time.perf_counter() - started, "checkpoint/async": float(asynchronous)}, self.run.step)

    def seal(self, log: bool = True) -> None:
        """Seal the pending checkpoint (waiting for this rank's write first); logs `checkpoint/seal_s`. Collective."""
        if self.pending is not None:
            pending, self.pending, started = self.pending, None, time.perf_counter()
            seal_checkpoint(self.strategy, self.run_dir, pending, self.store)
            if log:
                self.tracker.log({"checkpoint/seal_s": time.perf_counter() - started, "checkpoint/sealed_step": pending.step}, self.run.step)

    def mirror(self, path: Path) -> None:
        """A file or folder of the run folder, to the store when the run has one (by the process that wrote it)."""
        if self.store is None or not self.strategy.is_main:
            return
        if path.is_dir():
            self.store.put_folder(path, path.name)
        else:
            self.store.put_file(path)

    def best_model(self) -> Path:
        """The best model's folder; from the store when it was exported on another node (a resume elsewhere). Collective."""
        best = Path(self.run.best_dir)
        if self.store is not None and self.strategy.is_main and not best.is_dir():
            best = self.run_dir / MODEL_DIR
            self.store.get_folder(MODEL_DIR, best)
        return Path(self.strategy.from_main(str(best) if self.strategy.is_main else None))

    def preempted(self) -> dict:
        """The checkpoint of this step is saved: requeue under Slurm and end the process's run cleanly (exit 0)."""
        from shardtune.preempt import requeue

        ckpt = step_dir(self.run_dir, self.run.step)
        self.progress.write(f"preempted (signal {self.preemption.received or 'on another rank'}) at step {self.run.step}: checkpoint saved in {ckpt}")
        self.progress.close()
        self.tracker.finish()
        main = self.strategy.is_main  # read before end(): without a process group every rank reads as rank 0
        self.strategy.end()
        # last, and by rank 0 alone: Slurm ends a requeued job at once (SIGTERM to all its processes), so rank 0's
        # W&B run must be closed before
        requeued = requeue() if main else None
        if main:
            print(f"requeued job {requeued}" if requeued else f"to resume, run: {resume_command(self.cfg, self.run_dir)}", flush=True)
        self.preemption.restore()
        return {"train/steps": self.run.step, "preempted": True}

    def log_model(self, best_dir: Path, final_dir: Path) -> None:
        """tracking.log_model: the best (RUN/model) or the final model as a W&B artifact."""
        which, run = self.cfg.tracking.log_model, self.run
        if which == "none":
            return
        folder, aliases = (best_dir, ["best", f"step-{run.best_step or run.step}"]) if which == "best" else (final_dir, ["final", f"step-{run.step}"])
        self.tracker.log_model(folder, f"{self.run_dir.name}-model", aliases)

    def finish(self, last_eval: int, started: float) -> dict:
        """Final eval, the best (or last) model exported to RUN/model, test metrics, metrics.json and the W&B summary."""
        s, run, task, model_dir = self.strategy, self.run, self.task, self.run_dir / MODEL_DIR
        # Training is done: a stop signal from here on is recorded, not obeyed, so the final eval, test and export
        # complete (a rank killed halfway would lose them); the TERM grace timer is off, as during a save.
        self.preemption.acknowledge()
        failpoints.hit("export", s.rank, 0)
        self.seal()
        bytes_per_rank = s.state_bytes()  # training's peak, before final eval and export
        if task.has_split("eval") and last_eval != run.step:
            self.eval_and_select()
        final_dir = model_dir
        if self.cfg.tracking.log_model == "final" and run.best_value is not None and run.best_step != run.step:
            final_dir = self.run_dir / "model-final"  # the final weights, before the best model replaces them
            export_model(s, task.tokenizer, task.labels, final_dir)
            self.mirror(final_dir)
        if run.best_value is None:  # no eval: the final weights are the model
            export_model(s, task.tokenizer, task.labels, model_dir)
            self.mirror(model_dir)
        elif run.best_step != run.step:
            best = self.best_model()
            s.load_full_state_dict(lambda: read_exported_state(best, s.unwrapped()), partial=is_peft(s.unwrapped()))
            self.progress.write(f"best model: step {run.best_step} ({run.best_metric}={run.best_value:.4f})")
            if best != model_dir.resolve():
                export_model(s, task.tokenizer, task.labels, model_dir)
                self.mirror(model_dir)
        result = {"train/steps": run.step, "train/runtime_s": time.perf_counter() - started,
                  "train/samples": run.samples, "train/tokens": run.tokens,
                  **{f"dist/{k}": v for k, v in bytes_per_rank.items()}, "dist/strategy": s.name, "dist/num_processes": s.world,
                  "dist/mesh": s.mesh.describe() if s.mesh else f"dp {s.world}"}
        if run.best_value is not None:
            result.update({"best/step": run.best_step, f"best/{run.best_metric}": run.best_value})
        if task.has_split("test"):
            result.update(task.evaluate(s.model, "test"))
        self.progress.close()
        self.log_model(model_dir, final_dir)
        if s.is_main:
            write_json(self.run_dir / METRICS_FILE, result)
            self.mirror(self.run_dir / METRICS_FILE)
            self.tracker.summary(result)
            shown = {k: round(v, 4) for k, v in result.items() if k.startswith(("test/", "best/"))}
            print(f"done: {shown} -> {self.run_dir}", flush=True)
            if self.preemption.received:
                print(f"signal {self.preemption.received} came after training, during the final eval or export: both were finished", flush=True)
        self.tracker.finish()
        s.end()
        return result
