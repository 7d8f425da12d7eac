"""`task: dpo` end to end: 2-rank DDP and ZeRO-2 match one process over a whole run, and a killed run resumes bit for bit.

A tiny Llama with LoRA (the reference is the model with its adapters disabled) on the shipped Python-FAQ pairs:
22 training pairs, so an epoch is 5 steps of 4 and a 6th of 2 (padding on the ranks that get none), 20 steps
across 3 epochs, weight decay on, dropout off.
"""

from __future__ import annotations

import json

import pytest

import forklaunch
from conftest import ROOT


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_lm_tokenizer):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_lm_tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                         eos_token_id=tok.eos_token_id))
    out = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _argv(base, out, **extra) -> list[str]:
    over = {
        "model.name_or_path": base, "model.lora": "{r: 4, alpha: 8, dropout: 0.0}", "data.train_file": ROOT / "data/pydocs-faq-dpo.jsonl",
        "data.max_examples": 27, "data.validation_fraction": 0.17, "data.dpo.max_length": 384, "data.dpo.too_long": "truncate",
        "train.max_steps": 20, "train.batch_size": 4, "train.log_every": 1, "train.eval_batch_size": 4, "train.eval_every": 10,
        "optim.lr": 5e-3, "optim.weight_decay": 0.1, "optim.warmup_steps": 2, "tracking.report_to": "[]", "output.dir": out, **extra,
    }
    return ["train", str(ROOT / "configs" / "smollm2-dpo-lora.yaml"), *[f"{k}={v}" for k, v in over.items()]]


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _curve(run) -> dict[int, tuple]:
    return {r["step"]: (r["train/loss"], r["train/grad_norm"], r["train/rewards/margin"]) for r in _rows(run) if "train/loss" in r}


def _launch(argv, logs, world, failpoints=""):
    codes = forklaunch.launch(argv, logs, world=world, env={"SHARDTUNE_FAILPOINTS": failpoints})
    assert (-9 in codes) if failpoints else codes == [0] * world, (codes, (logs / "rank0.log").read_text()[-3000:])


@pytest.fixture(scope="module")
def one(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo-one")
    _launch(_argv(tiny_base, out / "run"), out, 1)
    return out / "run"


@pytest.mark.parametrize("strategy", ["cpu", "zero2"])
def test_two_ranks_match_one_process(strategy, one, tiny_base, tmp_path):
    _launch(_argv(tiny_base, tmp_path / "run", **{"dist.strategy": strategy, "train.batch_size": 2}), tmp_path, 2)
    got, want = _curve(tmp_path / "run"), _curve(one)
    assert sorted(got) == sorted(want) == list(range(1, 21))
    # fp32, only the reduction order differs: loss and grad norm within 2e-5 relative; the reward margin, a difference
    # of four sums of ~100 log-probs near -6 (~-600: fp32 spacing 6e-5 each) times beta 0.1, within 5e-5 absolute
    assert max(abs(got[s][i] - want[s][i]) / want[s][i] for s in want for i in (0, 1)) < 2e-5
    assert max(abs(got[s][2] - want[s][2]) for s in want) < 5e-5
    evals = {r["step"]: r["eval/rewards/accuracy"] for r in _rows(tmp_path / "run") if "eval/rewards/accuracy" in r}
    assert evals == {r["step"]: r["eval/rewards/accuracy"] for r in _rows(one) if "eval/rewards/accuracy" in r}


def test_a_killed_run_resumes_bit_for_bit(one, tiny_base, tmp_path):
    argv = _argv(tiny_base, tmp_path / "run", **{"train.save_every": 5, "train.async_save": "false"})  # kill@13 finds step 10
    _launch(argv, tmp_path, 1, failpoints="kill@step=13")
    _launch(argv, tmp_path, 1)
    assert "resumed from step-00000010 at step 10" in (tmp_path / "rank0.log").read_text()
    assert _curve(tmp_path / "run") == _curve(one)  # every step, the ones logged before the kill included
