"""Time to 0.80 test accuracy on the quickstart data: shardtune at its documented defaults vs the HF Trainer at its own.

Both systems fine-tune the packaged MiniLM-L6 (2 labels) for one epoch at batch size 32, max_length 64, on the
same training examples: shardtune's seeded 80/10/10 split of the packaged Rotten Tomatoes snippets
(`shardtune.data.classification.load_splits` on the quickstart's data section).

  shardtune  `configs/quickstart.yaml` as shipped: train.mixed_precision auto (bf16 where the CPU computes it
             natively), 6% warmup, weight decay 0.01, length-grouped batches, its own validation every 100 steps;
             only tracking (off) and output.dir (a temp folder) changed
  trainer    `transformers.Trainer` with `TrainingArguments` defaults for everything the comparison does not fix:
             lr 5e-5, linear decay, no warmup, no weight decay, fp32, adamw_torch_fused, random order, its default
             collator (DataCollatorWithPadding, since the tokenizer is passed); set: output_dir, 1 epoch,
             batch size 32, report_to none, no saving, no progress bar
  shardtune-fp32, shardtune-random   (with --arms) the shipped config with train.mixed_precision no, or with
             data.group_by_length false: where a difference comes from

The judge is the same for every arm and sits outside the code under test: a global optimizer-step post-hook
(`register_optimizer_step_post_hook`) evaluates the model being trained every `--judge-every` steps on the test
split (1,281 examples, never trained on), in fp32, eval mode, no grad, in length-sorted batches of 256, and stops
the arm's clock while it runs. The model is found by a global forward pre-hook (the first training forward of a
`*ForSequenceClassification`). "train s" runs from that first training forward; "wall s" from the start of the
arm (tokenization, model loading, the Trainer's or shardtune's setup included); both exclude the judge. Each
system's own work inside the loop (shardtune's periodic validation, the Trainer's logging) is counted: it is part
of its defaults. Time to the target is the clock at the first judged step whose test accuracy is >= `--target`.

Run: .venv/bin/python bench/time_to_accuracy.py   (about 12 minutes on the 2-core CPU; run it alone on the machine)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, fresh_state  # noqa: E402  (sets the offline environment before torch/transformers load)

import torch  # noqa: E402
from torch.nn.modules.module import register_module_forward_pre_hook  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QS = ROOT / "configs" / "quickstart.yaml"
ARMS = ("shardtune", "trainer", "shardtune-fp32", "shardtune-random")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", default="shardtune,trainer", help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--target", type=float, default=0.80, help="test accuracy to reach")
    p.add_argument("--judge-every", type=int, default=20, help="optimizer steps between test-set evaluations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--verbose", action="store_true", help="show the systems' own output")
    a = p.parse_args()
    a.arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    if set(a.arms) - set(ARMS):
        p.error(f"unknown arm(s) {sorted(set(a.arms) - set(ARMS))}; use {', '.join(ARMS)}")
    return a


class Judge:
    """Evaluates the model being trained on the test split every `every` optimizer steps, off the clock."""

    def __init__(self, tokenizer, test, labels: list[str], every: int):
        enc = tokenizer([ex.text for ex in test], truncation=True, max_length=64)
        rows = sorted(zip(enc["input_ids"], [labels.index(ex.label) for ex in test]), key=lambda r: len(r[0]))
        self.batches = [self._pad(tokenizer, rows[i : i + 256]) for i in range(0, len(rows), 256)]
        self.every = every
        register_optimizer_step_post_hook(self._on_step)
        register_module_forward_pre_hook(self._on_forward)
        self.reset()

    @staticmethod
    def _pad(tokenizer, rows):
        batch = tokenizer.pad([{"input_ids": ids} for ids, _ in rows], padding=True, return_tensors="pt")
        return batch, torch.tensor([label for _, label in rows])

    def reset(self) -> None:
        self.model, self.started, self.first_forward, self.off_clock = None, time.perf_counter(), None, 0.0
        self.steps, self.points = 0, []  # (step, train s, wall s, accuracy)

    def _on_forward(self, module, args) -> None:
        if self.model is None and type(module).__name__.endswith("ForSequenceClassification") and module.training and torch.is_grad_enabled():
            self.model, self.first_forward = module, time.perf_counter()

    def _on_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.model is None or self.steps % self.every:
            return
        now = time.perf_counter()
        accuracy = self.accuracy()
        self.points.append((self.steps, now - self.first_forward - self.off_clock, now - self.started - self.off_clock, accuracy))
        self.off_clock += time.perf_counter() - now

    @torch.no_grad()
    def accuracy(self) -> float:
        was, model = self.model.training, self.model
        model.eval()
        right = total = 0
        with torch.autocast("cpu", enabled=False):
            for batch, labels in self.batches:
                right += int((model(**batch).logits.argmax(-1) == labels).sum())
                total += len(labels)
        model.train(was)
        return right / total


def quickstart_config(overrides: dict):
    from shardtune.config import load_config

    return load_config(QS, [f"{k}={v}" for k, v in overrides.items()])


def run_shardtune(arm: str, out: Path) -> str:
    from shardtune.hardware import resolve_mixed_precision
    from shardtune.trainer import train

    over = {"tracking.report_to": "[]", "output.dir": out, "output.overwrite": "true", "train.progress_bar": '"off"'}
    over.update({"shardtune-fp32": {"train.mixed_precision": '"no"'}, "shardtune-random": {"data.group_by_length": "false"}}.get(arm, {}))
    cfg = quickstart_config(over)
    train(cfg, "bench")
    return resolve_mixed_precision(cfg.train.mixed_precision, "cpu")[0]


def run_trainer(train_examples, labels: list[str], out: Path) -> str:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from shardtune.assets import packaged_model

    tok = AutoTokenizer.from_pretrained(packaged_model("minilm-l6"))
    enc = tok([ex.text for ex in train_examples], truncation=True, max_length=64)
    rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels.index(ex.label)}
            for i, ex in enumerate(train_examples)]
    model = AutoModelForSequenceClassification.from_pretrained(
        packaged_model("minilm-l6"), num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)})
    args = TrainingArguments(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=32, report_to="none",
                             save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, processing_class=tok).train()
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "no"


def main() -> int:
    a = parse_args()
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from shardtune.assets import packaged_model
    from shardtune.data.classification import load_splits

    hf_logging.set_verbosity_error()
    splits = load_splits(quickstart_config({}).data)
    judge = Judge(AutoTokenizer.from_pretrained(packaged_model("minilm-l6")), splits.test, splits.labels, a.judge_every)
    load, results = [os.getloadavg()[0]], {}
    for arm in a.arms:
        fresh_state(a.threads)
        judge.reset()
        with tempfile.TemporaryDirectory(prefix="shardtune-bench-") as tmp:
            sink = contextlib.nullcontext() if a.verbose else contextlib.redirect_stdout(io.StringIO())
            with sink:
                precision = run_trainer(splits.train, splits.labels, Path(tmp)) if arm == "trainer" else run_shardtune(arm, Path(tmp))
        results[arm] = (precision, judge.steps, list(judge.points))
        hit = next((p for p in judge.points if p[3] >= a.target), None)
        print(f"{arm}: {precision}, {judge.steps} steps, accuracy by step {[(s, round(acc, 3)) for s, _, _, acc in judge.points]}, "
              f"target at {hit[0] if hit else 'never'}, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    load.append(os.getloadavg()[0])
    print_table(a, results, load)
    return 0


def print_table(a, results: dict, load: list[float]) -> None:
    base = results.get("trainer")
    base_hit = next((p for p in base[2] if p[3] >= a.target), None) if base else None
    print(f"\n{cpu_model()}, torch {torch.__version__}, {a.threads} thread(s), judged every {a.judge_every} steps on "
          f"the test split, target test accuracy {a.target}, 1-min load {load[0]:.1f} -> {load[1]:.1f}")
    print("| arm | precision | steps | first step >= target | train s to target | vs trainer | wall s to target | vs trainer "
          "| epoch train s | final judged accuracy |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arm, (precision, steps, points) in results.items():
        hit = next((p for p in points if p[3] >= a.target), None)
        cols = [f"{hit[0]}", f"{hit[1]:.1f}", ratio(hit, base_hit, 1), f"{hit[2]:.1f}", ratio(hit, base_hit, 2)] if hit else ["never"] + ["-"] * 4
        last = points[-1] if points else (0, float("nan"), float("nan"), float("nan"))
        print(f"| {arm} | {precision} | {steps} | {' | '.join(cols)} | {last[1]:.1f} | {last[3]:.3f} |")


def ratio(hit, base_hit, i: int) -> str:
    return f"{hit[i] / base_hit[i]:.2f}x" if hit and base_hit else "-"


if __name__ == "__main__":
    sys.exit(main())
