"""The loss is token-weighted: a step's gradient is that of the mean over every label token (classification: every
example) of the step, whatever its split into micro-batches and ranks.

SFT rows hold whole examples, so label tokens vary from row to row: with a mean of per-micro-batch means (or of
per-rank means), 1 x 8, 4 x 2 and 2 ranks x (2 x 2) rows per step train differently. The stream's rows depend on
the number of data slots (ranks x workers), so every run here has 2: one process with 2 DataLoader workers, or 2
ranks with none (data/stream.py: a rank stacks its workers' rows in turn, so a step holds the same rows either way).
Classification: the same, with the epoch's last step short (37 examples, 4 full steps of 8 and one of 5).
"""

from __future__ import annotations

import json


import forklaunch
from conftest import ROOT, lm_overrides, tiny_overrides

LAYOUTS = [(1, 8, 1), (1, 2, 4), (2, 2, 2)]  # (processes, micro-batch, accumulation): 8 rows or examples per step


def _eval_loss(run) -> float:
    return [json.loads(line)["eval/loss"] for line in (run / "log.jsonl").read_text().splitlines() if "eval/loss" in line][-1]


def _launch(argv, logs, world):
    logs.mkdir(parents=True, exist_ok=True)
    codes = forklaunch.launch(argv, logs, world=world)
    assert codes == [0] * world, (logs / "rank0.log").read_text()[-3000:]


def _run_layouts(argv_for, tmp_path) -> list[float]:
    losses = []
    for world, micro, accum in LAYOUTS:
        out = tmp_path / f"{world}x{micro}x{accum}"
        _launch(argv_for(out, world, micro, accum), out.with_suffix(".logs"), world)
        losses.append(_eval_loss(out))
    return losses


def test_sft_eval_loss_is_the_same_for_1x8_4x2_and_2_ranks_x_2x2(tiny_lm_tokenizer, lm_corpus, tmp_path):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("task: sft\n")

    def argv(out, world, micro, accum):
        over = lm_overrides(tiny_lm_tokenizer, lm_corpus, out, **{
            "task": "sft", "data.sources": f"[{{path: {ROOT / 'data/pydocs-faq-sft.jsonl'}}}]", "data.seq_len": 160, "data.holdout": 10,
            "data.num_workers": 2 if world == 1 else 0, "train.batch_size": micro, "train.grad_accum": accum, "train.max_steps": 5,
            "train.eval_batch_size": 4, "optim.lr": 3e-3, "optim.weight_decay": 0.1,
        })
        return ["train", str(cfg), *over]

    losses = _run_layouts(argv, tmp_path)
    assert max(losses) - min(losses) < 1e-6 * losses[0], losses


def test_classification_eval_loss_is_the_same_with_a_short_last_step(tiny_bert, tmp_path):
    def argv(out, world, micro, accum):
        return ["train", str(ROOT / "configs/quickstart.yaml"), *tiny_overrides(tiny_bert, out, **{
            "data.max_examples": 45, "model.dropout": 0, "train.batch_size": micro, "train.grad_accum": accum, "train.max_steps": 5,
            "train.eval_every": None, "optim.lr": 1e-3, "optim.weight_decay": 0.1, "tracking.report_to": "[]",
        })]

    losses = _run_layouts(argv, tmp_path)
    assert max(losses) - min(losses) < 1e-6 * losses[0], losses
