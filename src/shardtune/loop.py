"""The training loop. The order of a step is written once, here:

LR -> forward -> backward -> (on the last micro-batch) clip -> step -> zero
-> log -> eval -> early stop / best model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed

from shardtune import ShardtuneError
from shardtune.checkpoint import METRICS_FILE, choose_run_dir, export_model, save_config, write_json, MODEL_DIR
from shardtune.config import Config
from shardtune.data.classification import Encoded, load_splits, make_loader
from shardtune.dist import (
    build_accelerator,
    from_main,
    full_state_dict,
    load_full_state_dict,
    state_bytes,
    strategy_name,
)
from shardtune.metrics import evaluate
from shardtune.models import load_classifier, load_tokenizer
from shardtune.optim import build_optimizer, build_scheduler
from shardtune.progress import Progress
from shardtune.tracking import Tracker

BEST_METRICS = ("eval/loss", "eval/accuracy", "eval/f1_macro")


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    loss: torch.Tensor | float = 0.0  # tensors, so the hot path never waits on the device
    micro_batches: int = 0
    samples: int = 0
    tokens: torch.Tensor | int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, batch: dict) -> None:
        self.loss = self.loss + loss.detach().float()
        self.micro_batches += 1
        self.samples += batch["input_ids"].shape[0]
        mask = batch.get("attention_mask")
        self.tokens = self.tokens + (mask.sum() if mask is not None else batch["input_ids"].numel())


@dataclass
class Best:
    metric: str
    greater: bool
    value: float | None = None
    step: int = 0
    state: dict | None = None
    bad_evals: int = 0

    def update(self, metrics: dict[str, float], step: int, state_fn) -> bool:
        """Record an eval; True when it improved on the best so far."""
        v = metrics[self.metric]
        if self.value is None or (v > self.value if self.greater else v < self.value):
            self.value, self.step, self.bad_evals = v, step, 0
            self.state = state_fn()
            return True
        self.bad_evals += 1
        return False


def train(cfg: Config, config_name: str = "run") -> dict[str, float]:
    if cfg.train.metric_for_best not in BEST_METRICS:
        raise ShardtuneError(f"train.metric_for_best {cfg.train.metric_for_best!r} is not logged; use one of {', '.join(BEST_METRICS)}.")
    acc = build_accelerator(cfg)
    set_seed(cfg.train.seed)
    run_dir = Path(from_main(acc, str(choose_run_dir(cfg, config_name)) if acc.is_main_process else None))

    tokenizer = load_tokenizer(cfg.model)
    splits = load_splits(cfg.data)
    label2id = {lab: i for i, lab in enumerate(splits.labels)}
    model = load_classifier(cfg.model, splits.labels)
    encode = lambda exs: Encoded(exs, tokenizer, label2id, cfg.model.max_length)  # noqa: E731
    train_loader = make_loader(encode(splits.train), tokenizer, cfg.train.batch_size, True, cfg.train.seed, cfg.data.num_workers)
    eval_loaders = {
        name: make_loader(encode(exs), tokenizer, cfg.train.eval_batch_size, False, 0, cfg.data.num_workers)
        for name, exs in [("eval", splits.validation), ("test", splits.test)]
        if exs
    }
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer, train_loader = acc.prepare(model, optimizer, train_loader)
    eval_loaders = {k: acc.prepare(v) for k, v in eval_loaders.items()}

    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum)
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    # Stepped by hand on optimizer steps only; Accelerate's wrapper would step it once per process.
    scheduler = build_scheduler(optimizer, cfg.optim, total)

    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(run_dir, cfg)
    tracker = Tracker(cfg.tracking, run_dir, cfg.to_dict(), acc.is_main_process, run_dir.name)
    progress = Progress(total, acc.is_main_process, cfg.train.progress_bar)
    progress.write(
        f"shardtune: {len(splits.train)} train / {len(splits.validation)} eval / {len(splits.test)} test examples, "
        f"{len(splits.labels)} labels, {total} steps, {acc.num_processes} process(es) -> {run_dir}"
    )

    greater = cfg.train.greater_is_better
    best = Best(cfg.train.metric_for_best, greater if greater is not None else not cfg.train.metric_for_best.endswith("loss"))
    step, last_eval, grad_norm, window, started = 0, 0, 0.0, Window(), time.perf_counter()
    seen = {"train/samples": 0, "train/tokens": 0}
    stop = False
    model.train()
    while step < total and not stop:
        for batch in train_loader:
            with acc.accumulate(model):
                loss = model(**batch).loss
                window.add(loss, batch)
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = _clip(acc, model, cfg.optim.max_grad_norm)
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if not acc.sync_gradients:
                continue
            step += 1
            progress.step()
            if step % cfg.train.log_every == 0 or step == total:
                metrics = _window_metrics(acc, window, lr, grad_norm, seen)
                tracker.log(metrics, step)
                progress.log(step, metrics)
                window = Window()
            if "eval" in eval_loaders and cfg.train.eval_every and (step % cfg.train.eval_every == 0) and step < total:
                stop = _eval_and_select(acc, model, eval_loaders["eval"], best, splits.labels, step, tracker, progress, cfg)
                last_eval = step
                window.start = time.perf_counter()  # throughput counts training time only
            if step >= total or stop:
                break

    if "eval" in eval_loaders and last_eval != step:
        _eval_and_select(acc, model, eval_loaders["eval"], best, splits.labels, step, tracker, progress, cfg)
    if best.value is not None and best.step != step:
        load_full_state_dict(acc, model, best.state)
        progress.write(f"best model: step {best.step} ({best.metric}={best.value:.4f})")
    result = {"train/steps": step, "train/runtime_s": time.perf_counter() - started, **seen}
    result.update({f"dist/{k}": v for k, v in state_bytes(acc, model, optimizer).items()})
    result.update({"dist/strategy": strategy_name(acc), "dist/num_processes": acc.num_processes})
    if best.value is not None:
        result.update({"best/step": best.step, f"best/{best.metric}": best.value})
    if "test" in eval_loaders:
        result.update(evaluate(acc, model, eval_loaders["test"], len(splits.labels), "test"))
    export_model(acc, model, tokenizer, splits.labels, run_dir / MODEL_DIR)
    progress.close()
    if acc.is_main_process:
        write_json(run_dir / METRICS_FILE, result)
        tracker.summary(result)
        shown = {k: round(v, 4) for k, v in result.items() if k.startswith(("test/", "best/"))}
        print(f"done: {shown} -> {run_dir}", flush=True)
    tracker.finish()
    acc.end_training()
    return result


def _clip(acc, model, max_norm: float | None) -> torch.Tensor:
    """Clip (when configured) and return the global grad norm before clipping."""
    return acc.clip_grad_norm_(model.parameters(), max_norm if max_norm is not None else math.inf)


def _window_metrics(acc, w: Window, lr: float, grad_norm, seen: dict) -> dict[str, float]:
    elapsed = time.perf_counter() - w.start
    sums = torch.tensor([float(w.loss), w.micro_batches, w.samples, float(w.tokens)], dtype=torch.float64, device=acc.device)
    sums = acc.reduce(sums, reduction="sum")
    loss, micro, samples, tokens = sums.tolist()
    seen["train/samples"] += int(samples)
    seen["train/tokens"] += int(tokens)
    return {
        "train/loss": loss / max(micro, 1),
        "train/lr": lr,
        "train/grad_norm": float(grad_norm),
        "train/samples_per_s": samples / elapsed,
        "train/tokens_per_s": tokens / elapsed,
    }


def _eval_and_select(acc, model, loader, best: Best, labels, step, tracker, progress, cfg: Config) -> bool:
    """Eval, update the best model; True when early stopping says stop."""
    metrics = evaluate(acc, model, loader, len(labels), "eval")
    tracker.log(metrics, step)
    improved = best.update(metrics, step, lambda: full_state_dict(acc, model))
    progress.write(f"eval @ step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + (" *" if improved else ""))
    patience = cfg.train.early_stopping_patience
    if patience and best.bad_evals >= patience:
        progress.write(f"early stopping: {best.metric} has not improved for {patience} evals")
        return True
    return False
