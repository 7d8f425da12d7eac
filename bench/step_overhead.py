"""Step overhead: shardtune's loop vs the HF `Trainer` vs a plain PyTorch loop.

The same tiny BERT (built from a `BertConfig`, saved once with the packaged
MiniLM tokenizer), the same first N packaged Rotten Tomatoes snippets, the same
max_length, batch size, LR schedule (linear, 6% warmup), AdamW hyper-parameters
(weight decay 0.01, none on biases/LayerNorm), grad clipping at 1.0, dynamic
padding to a multiple of 8, seed, thread count and number of optimizer steps,
the same precision (`--precision bf16`: bf16 autocast in every arm) and the same
batch order kind (`--group-by-length`: length-grouped batches in every arm, each
with its own grouping sampler; default: random order in every arm), trained by

  shardtune  `shardtune.trainer.train(cfg)`, no tracking, no eval/test hold-out
  trainer    `transformers.Trainer`, report_to="none", no eval, no saving,
             `DataCollatorWithPadding(pad_to_multiple_of=8)`, default optimizer
  plain      a seed-script loop: DataLoader + the same collator, `torch.optim.AdamW`
             with its defaults, `get_linear_schedule_with_warmup`,
             `clip_grad_norm_`, loss printed every 10 steps
  plain-shardtune-order  (with --arms) the plain loop in shardtune's
             `length_grouped_order` instead of transformers' LengthGroupedSampler:
             whether the batch order alone explains a difference in grouped runs

How time is measured (the same way for every arm, outside the code under
test): a global optimizer step post-hook
(`torch.optim.optimizer.register_optimizer_step_post_hook`) stamps
`time.perf_counter()` after every optimizer step, whichever loop calls it. The
timed window runs from the end of optimizer step W (the warmup steps, excluded)
to the end of the last step, so it holds exactly `steps - W` whole iterations
of each loop -- data loading, collation, forward, backward, clip, optimizer,
scheduler, zero_grad, logging -- and nothing of model loading, tokenization,
Trainer/Accelerator construction, the final export or teardown. Timing around
the whole `train()` call would instead charge shardtune for reading the CSV,
tokenizing and saving the model, which the other arms do outside their loops.
Samples in the window are counted by a global forward pre-hook on the word
embedding (it also records the padded sequence length, so one can check that
the arms saw comparable batches: each arm shuffles with its own sampler). The
hooks cost the same few microseconds per step in every arm.

In length-grouped runs read the padded tokens/s columns beside samples/s: the
untimed first W steps are not the same batches in every arm. transformers'
LengthGroupedSampler puts the longest batch first and walks each mega-batch
longest first, so the Trainer's and the plain loop's untimed steps are their
longest batches; shardtune's order starts with its longest batch but shuffles
the rest. Before shardtune put its longest batch first, its timed window held
more work per sample than the Trainer's (mean padded length 31.2 vs 30.7 at 200
steps), which samples/s counted against it. Padded tokens/s divides that out.

Arms run in alternating, rotated order for `--repeats` rounds in one process
(the machine may be busy with other jobs); the table shows the median
samples/s per arm and ratios of those medians, plus the best run, and the
median samples per CPU-second of this process (`time.process_time()` over the
same window), which is less sensitive to other jobs stealing the cores.

Threads: every arm runs with the same `torch.set_num_threads(--threads)`,
default 1. On a 2-core machine shared with another training job, 2 OpenMP
threads per process oversubscribe the cores and a step gets 8-20x slower with
huge run-to-run variance (measured while a quickstart run was going); one
thread keeps the numbers stable. Use `--threads 2` on an idle machine.

The optimizer is each arm's own default: shardtune's `optim.build_optimizer`,
the Trainer's `TrainingArguments.optim` (`adamw_torch_fused` with torch >= 2.8;
`--trainer-optim adamw_torch` gives it the same for-loop AdamW shardtune and
the plain loop use on CPU), plain `torch.optim.AdamW(...)` in the plain loop.

Run: .venv/bin/python bench/step_overhead.py   (about 1-2 minutes on a 2-core CPU)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fresh_state  # noqa: E402  (sets the offline environment before torch/transformers load)

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from torch.nn.modules.module import register_module_forward_pre_hook  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

LABELS = ["fresh", "rotten"]  # shardtune's order: sorted label names
LR, WEIGHT_DECAY, WARMUP_RATIO, MAX_GRAD_NORM, SEED, LOG_EVERY = 1e-4, 0.01, 0.06, 1.0, 42, 10


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timed window")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each round runs every arm once")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for all arms (see the docstring)")
    p.add_argument("--arms", default="shardtune,trainer,plain")
    p.add_argument("--trainer-optim", default=None, help="TrainingArguments.optim (default: the Trainer's own, adamw_torch_fused)")
    p.add_argument("--precision", choices=("no", "bf16"), default="no",
                   help="bf16: every arm under bf16 autocast (shardtune train.mixed_precision, the Trainer's bf16=True)")
    p.add_argument("--group-by-length", action="store_true",
                   help="every arm in length-grouped batches (shardtune data.group_by_length, the Trainer's train_sampling_strategy=group_by_length, "
                        "transformers' LengthGroupedSampler in the plain loop); off: every arm in random order")
    p.add_argument("--verbose", action="store_true", help="show the loops' own log lines")
    args = p.parse_args()
    if not 1 <= args.warmup < args.steps:
        p.error("--warmup must be >= 1 (the window starts at the end of a step) and < --steps")
    return args


# ---------------------------------------------------------------- timing hooks


class Recorder:
    """Optimizer-step end times and per-forward (batch, padded length), for every loop alike."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.steps: list[float] = []
        self.cpu: list[float] = []
        self.forwards: list[tuple[int, int]] = []
        self.threads: set[int] = set()
        register_optimizer_step_post_hook(self._on_step)
        register_module_forward_pre_hook(self._on_forward)

    def reset(self) -> None:
        self.steps, self.cpu, self.forwards, self.threads = [], [], [], set()

    def _on_step(self, optimizer, args, kwargs) -> None:
        self.steps.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if len(self.steps) == 1:
            self.threads.add(torch.get_num_threads())

    def _on_forward(self, module, args) -> None:
        # The word embedding is called positionally with input_ids; every other module is skipped cheaply.
        if type(module) is torch.nn.Embedding and module.num_embeddings == self.vocab_size and args and torch.is_grad_enabled():
            self.forwards.append(tuple(args[0].shape))

    def window(self, warmup: int) -> dict:
        n = len(self.steps)
        fw = self.forwards[warmup:n]  # one forward per optimizer step (no grad accumulation)
        if len(self.forwards) != n:
            raise RuntimeError(f"saw {len(self.forwards)} training forwards for {n} optimizer steps; expected one per step")
        seconds = self.steps[-1] - self.steps[warmup - 1]
        cpu_seconds = self.cpu[-1] - self.cpu[warmup - 1]
        samples = sum(b for b, _ in fw)
        tokens = sum(b * t for b, t in fw)
        return {
            "steps": n,
            "seconds": seconds,
            "samples": samples,
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
            "samples_per_cpu_s": samples / cpu_seconds,
            "mean_len": statistics.fmean(t for _, t in fw),
            "threads": sorted(self.threads),
        }


# ---------------------------------------------------------------- shared setup


def build_model_dir(root: Path) -> Path:
    """A tiny BERT classifier (random init, fixed seed) + the packaged MiniLM tokenizer, as an HF folder."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from shardtune.assets import packaged_model

    out = root / "tiny-bert"
    tok = AutoTokenizer.from_pretrained(packaged_model("minilm-l6"))
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=512, max_position_embeddings=128, num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)), label2id={lab: i for i, lab in enumerate(LABELS)},
    )
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_data(root: Path, n: int) -> Path:
    """The first n packaged Rotten Tomatoes rows, as the text,label CSV every arm reads."""
    from shardtune.assets import packaged_data

    with open(packaged_data("rotten-tomatoes"), encoding="utf-8", newline="") as f:
        rows = [row for _, row in zip(range(n), csv.DictReader(f))]
    if len(rows) < n:
        raise SystemExit(f"the packaged data has only {len(rows)} rows; lower --steps or --batch-size")
    out = root / "train.csv"
    with open(out, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows({"text": r["text"], "label": r["label"]} for r in rows)
    return out


def encode(model_dir: Path, data: Path, max_length: int):
    """Tokenized features (a list of dicts) for the Trainer and plain arms; shardtune tokenizes its own."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(data, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    enc = tok([r["text"] for r in rows], truncation=True, max_length=max_length)
    label2id = {lab: i for i, lab in enumerate(LABELS)}
    features = [{**{k: enc[k][i] for k in enc.keys()}, "labels": label2id[r["label"]]} for i, r in enumerate(rows)]
    return tok, features


def load_model(model_dir: Path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir)


# ---------------------------------------------------------------- the arms


def run_shardtune(a, model_dir: Path, data: Path, out: Path) -> None:
    from shardtune.config import load_config
    from shardtune.trainer import train

    overrides = {
        "model.name_or_path": model_dir, "model.max_length": a.max_length,
        "data.train_file": data, "data.validation_fraction": 0, "data.test_fraction": 0,
        "data.max_examples": a.steps * a.batch_size,
        "optim.lr": LR, "optim.weight_decay": WEIGHT_DECAY, "optim.warmup_ratio": WARMUP_RATIO,
        "optim.max_grad_norm": MAX_GRAD_NORM, "optim.scheduler": "linear",
        "train.batch_size": a.batch_size, "train.max_steps": a.steps, "train.seed": SEED,
        "train.log_every": LOG_EVERY, "train.progress_bar": '"off"', "train.mixed_precision": f'"{a.precision}"',
        "data.group_by_length": str(a.group_by_length).lower(),
        "tracking.report_to": "[]", "output.dir": out, "output.overwrite": "true",
    }
    train(load_config(None, [f"{k}={v}" for k, v in overrides.items()]), "bench")


def run_trainer(a, model_dir: Path, tok, features, out: Path) -> None:
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out), report_to="none", per_device_train_batch_size=a.batch_size, max_steps=a.steps,
        learning_rate=LR, weight_decay=WEIGHT_DECAY, warmup_steps=WARMUP_RATIO, lr_scheduler_type="linear",
        max_grad_norm=MAX_GRAD_NORM, seed=SEED, logging_steps=LOG_EVERY, eval_strategy="no", save_strategy="no",
        dataloader_num_workers=0, use_cpu=True, disable_tqdm=True, bf16=a.precision == "bf16",
        train_sampling_strategy="group_by_length" if a.group_by_length else "random",
        **({"optim": a.trainer_optim} if a.trainer_optim else {}),
    )
    trainer = Trainer(
        model=load_model(model_dir), args=args, train_dataset=features,
        data_collator=DataCollatorWithPadding(tok, pad_to_multiple_of=8),
    )
    trainer.train()


def plain_order(a, features, arm: str) -> dict:
    """The plain loop's batch order: random, or length-grouped by transformers' LengthGroupedSampler (each
    mega-batch's batches together, longest first) or, for the plain-shardtune-order arm, by shardtune's
    `length_grouped_order` (the same mega-batches, every batch's place shuffled but the longest batch first)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from shardtune.data.grouping import length_grouped_order

    lengths = [len(f["input_ids"]) for f in features]
    if arm == "plain-shardtune-order":
        return {"sampler": length_grouped_order(lengths, a.batch_size, SEED, 0)}
    return {"sampler": LengthGroupedSampler(a.batch_size, lengths=lengths)} if a.group_by_length else {"shuffle": True}


def run_plain(a, model_dir: Path, tok, features, arm: str = "plain") -> None:
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

    torch.manual_seed(SEED)
    model = load_model(model_dir)
    order = plain_order(a, features, arm)
    loader = DataLoader(features, batch_size=a.batch_size, collate_fn=DataCollatorWithPadding(tok, pad_to_multiple_of=8), **order)
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or n.endswith(".bias")]
    decay = [p for n, p in model.named_parameters() if not (p.ndim < 2 or n.endswith(".bias"))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(WARMUP_RATIO * a.steps), a.steps)
    model.train()
    step = 0
    while step < a.steps:
        for batch in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % LOG_EVERY == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)
            if step >= a.steps:
                break


# ---------------------------------------------------------------- main


def main() -> int:
    a = parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(a.threads)
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    unknown = set(arms) - {"shardtune", "trainer", "plain", "plain-shardtune-order"}
    if unknown:
        raise SystemExit(f"unknown arm(s) {sorted(unknown)}; use shardtune, trainer, plain, plain-shardtune-order")

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="shardtune-bench-") as tmp:
        root = Path(tmp)
        model_dir = build_model_dir(root)
        data = write_data(root, a.steps * a.batch_size)
        tok, features = encode(model_dir, data, a.max_length)
        rec = Recorder(tok.vocab_size)
        results: dict[str, list[dict]] = {arm: [] for arm in arms}
        for r in range(a.repeats):
            order = arms[r % len(arms):] + arms[: r % len(arms)]  # rotate: no arm always runs first or last
            for arm in order:
                fresh_state(a.threads)
                rec.reset()
                out = root / f"{arm}-{r}"
                sink = contextlib.nullcontext() if a.verbose else contextlib.redirect_stdout(io.StringIO())
                with sink:
                    if arm == "shardtune":
                        run_shardtune(a, model_dir, data, out)
                    elif arm == "trainer":
                        run_trainer(a, model_dir, tok, features, out)
                    else:
                        run_plain(a, model_dir, tok, features, arm)
                res = rec.window(a.warmup)
                if res["steps"] != a.steps:
                    raise RuntimeError(f"{arm} ran {res['steps']} optimizer steps, expected {a.steps}")
                results[arm].append(res)
                print(
                    f"round {r + 1}/{a.repeats} {arm:9s} {res['samples_per_s']:7.1f} samples/s "
                    f"{res['samples_per_cpu_s']:7.1f} samples/cpu-s ({res['samples']} samples in {res['seconds']:.2f}s, "
                    f"mean padded len {res['mean_len']:.1f}, threads {res['threads']}, load {os.getloadavg()[0]:.2f})",
                    file=sys.stderr, flush=True,
                )
    print_table(a, results, (load_before, os.getloadavg()[0]))
    return 0


def print_table(a, results: dict[str, list[dict]], load: tuple[float, float]) -> None:
    med = {arm: statistics.median(r["samples_per_s"] for r in rs) for arm, rs in results.items()}
    best = {arm: max(r["samples_per_s"] for r in rs) for arm, rs in results.items()}
    cpu = {arm: statistics.median(r["samples_per_cpu_s"] for r in rs) for arm, rs in results.items()}
    mlen = {arm: statistics.fmean(r["mean_len"] for r in rs) for arm, rs in results.items()}
    tok = {arm: statistics.median(r["tokens_per_s"] for r in rs) for arm, rs in results.items()}

    def ratio(arm: str, base: str, of: dict = med) -> str:
        return f"{of[arm] / of[base]:.2f}x" if base in of else "-"

    print(
        f"\nsteps={a.steps} (first {a.warmup} untimed), batch={a.batch_size}, max_length={a.max_length}, "
        f"threads={a.threads}, precision={a.precision}, group_by_length={a.group_by_length}, repeats={a.repeats}, 1-min load average {load[0]:.2f} before / {load[1]:.2f} after; "
        "median of runs, ratios of medians\n"
    )
    print(
        "| arm | samples/s (median) | samples/s (best) | vs HF Trainer | vs plain loop "
        "| samples/CPU-s (median) | vs HF Trainer (CPU) | vs plain loop (CPU) | mean padded len "
        "| padded tokens/s (median) | vs HF Trainer (tokens) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arm in results:
        print(
            f"| {arm} | {med[arm]:.1f} | {best[arm]:.1f} | {ratio(arm, 'trainer')} | {ratio(arm, 'plain')} "
            f"| {cpu[arm]:.1f} | {ratio(arm, 'trainer', cpu)} | {ratio(arm, 'plain', cpu)} | {mlen[arm]:.1f} "
            f"| {tok[arm]:.0f} | {ratio(arm, 'trainer', tok)} |"
        )


if __name__ == "__main__":
    sys.exit(main())
