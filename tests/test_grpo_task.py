"""task: grpo end to end on a tiny pretrained Llama and generated arithmetic prompts (real runs, gloo ranks):

- 2 ranks under DDP, ZeRO-2, ZeRO-3 and FSDP2 match the 1-process run over 22 steps: the
  same completions (their rewards equal, step by step: the rollout of a prompt is seeded by the prompt, not by the
  layout) and the loss and grad norm within 1e-4, with weight decay, completions of varying length, a padded last
  step of an epoch and scale_rewards batch (the std of the whole step's rewards: 2 micro-batches of 2 prompts
  there, 2 ranks x 2 micro-batches of 1 prompt here);
- a run killed at step 13 resumes from its step-10 checkpoint with the uninterrupted run's losses and rewards bit for bit;
- with LoRA the reference is the model with its adapters off, and LoRA under ZeRO-3 and FSDP2 (base weights sharded)
  matches the 1-process LoRA run over 22 steps;
- a reward function that raises, returns NaN or the wrong number of values ends the run in one sentence naming it.
"""

from __future__ import annotations

import json
import random
import sys

import pytest

import forklaunch
from conftest import one_sentence

STEPS, SAVE, TOL = 22, 10, 1e-4


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """29 prompts, 26 to train on: the global batch of 4 leaves a padded last step in each epoch."""
    rng = random.Random(0)
    out = tmp_path_factory.mktemp("grpo") / "arith.jsonl"
    rows = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(29)]
    out.write_text("".join(json.dumps({"prompt": f"{a} plus {b} is", "answer": str(a + b)}) + "\n" for a, b in rows))
    return out


def _argv(base, prompts, out, **extra) -> list[str]:
    config = out.parent / "grpo.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("task: grpo\n")
    over = {"model.name_or_path": base, "data.train_file": prompts, "data.validation_fraction": 0.1, "data.grpo.num_generations": 4,
            "data.grpo.max_new_tokens": 6, "data.grpo.beta": 0.04, "data.grpo.temperature": 1.0,
            "data.grpo.rewards": "[{name: exact_match}, {name: length_penalty, weight: 0.1, options: {target: 3}}]",
            "data.grpo.scale_rewards": "batch", "train.batch_size": 2, "train.grad_accum": 2, "train.max_steps": STEPS, "train.log_every": 1, "train.eval_every": None, "train.async_save": "false",
            "optim.lr": 3e-3, "optim.weight_decay": 0.1, "optim.warmup_steps": 2, "tracking.report_to": "[]", "output.dir": out,
            "train.mixed_precision": "no", **extra}
    return ["train", str(config), *[f"{k}={v}" for k, v in over.items()]]


def _rows(run) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "train/loss" in r}


def _launch(argv, logs, world, failpoints=""):
    logs.mkdir(parents=True, exist_ok=True)
    return forklaunch.launch(argv, logs, world=world, env={"SHARDTUNE_FAILPOINTS": failpoints})


@pytest.fixture(scope="module")
def reference(tiny_base, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo-ref")
    assert _launch(_argv(tiny_base, prompts, out / "run", **{"train.save_every": SAVE}), out, 1) == [0]
    return _rows(out / "run")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-8)


@pytest.mark.parametrize("strategy", ["cpu", "zero2", "zero3", "fsdp"])
def test_two_ranks_match_one_process(strategy, reference, tiny_base, prompts, tmp_path):
    # 1 prompt a micro-batch here, 2 there: a std of each micro-batch's own rewards would differ
    argv = _argv(tiny_base, prompts, tmp_path / "run", **{"dist.strategy": strategy, "train.batch_size": 1})
    assert _launch(argv, tmp_path, 2) == [0, 0]
    rows = _rows(tmp_path / "run")
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert any(reference[s]["train/reward_std"] > 0 for s in reference)  # some groups have a signal to learn from
    assert reference[1]["train/kl"] == 0 < reference[STEPS]["train/kl"]  # the reference is the starting weights
    for step, ref in reference.items():
        got = rows[step]
        assert got["train/reward"] == pytest.approx(ref["train/reward"], rel=1e-9, abs=1e-12), step  # the same completions
        assert got["train/completion_length"] == ref["train/completion_length"], step
        assert _rel(got["train/advantage_abs"], ref["train/advantage_abs"]) < 1e-6, step  # the step's std, whatever its layout
        assert _rel(got["train/entropy"], ref["train/entropy"]) < TOL, step
        assert _rel(got["train/loss"], ref["train/loss"]) < TOL and _rel(got["train/grad_norm"], ref["train/grad_norm"]) < TOL, (step, got, ref)


def test_a_killed_run_resumes_with_the_same_losses_and_completions(reference, tiny_base, prompts, tmp_path):
    argv = _argv(tiny_base, prompts, tmp_path / "run", **{"train.save_every": SAVE})
    assert _launch(argv, tmp_path, 1, failpoints="kill@step=13") != [0]
    assert _launch(argv, tmp_path, 1) == [0]
    rows = _rows(tmp_path / "run")
    assert "resumed from step-00000010 at step 10" in (tmp_path / "rank0.log").read_text()
    for step, ref in reference.items():
        keys = ("train/loss", "train/grad_norm", "train/reward", "train/completion_length", "train/kl", "train/entropy")
        assert {k: rows[step][k] for k in keys} == {k: ref[k] for k in keys}, step


BAD_REWARDS = '''
def raises(completions, records):
    raise ValueError("no answer field")

def nan(completions, records):
    return [float("nan")] * len(completions)

def short(completions, records):
    return [0.0]
'''


@pytest.mark.parametrize("fn,words", [("raises", ("raised ValueError",)), ("nan", ("returned nan",)), ("short", ("returned 1 values",))])
def test_a_bad_reward_function_is_one_sentence_naming_it(fn, words, tiny_base, prompts, tmp_path, run_cli, monkeypatch):
    (tmp_path / "bad_grpo_rewards.py").write_text(BAD_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bad_grpo_rewards", raising=False)  # imported fresh, and gone after: no other test sees it
    argv = _argv(tiny_base, prompts, tmp_path / "run", **{"data.grpo.rewards": f"[{{name: 'bad_grpo_rewards:{fn}'}}]", "train.max_steps": 2})
    code, _, err = run_cli(*argv)
    assert one_sentence(code, err, f"bad_grpo_rewards:{fn}", *words)


def test_a_rollouts_rows_mask_what_follows_its_end():
    """Completion masks end at the first EOS (kept) or at the padding after a stop string (dropped); prompts are
    left-padded and positions count real tokens only."""
    import torch

    from shardtune.data.prompts import rollout_rows

    eos, pad = 2, 0
    rows = rollout_rows([[5, 6, 7], [8]], [torch.tensor([9, 2, 9, 9]), torch.tensor([9, 9, 0])], eos, pad)
    assert rows["completion_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert rows["input_ids"][1].tolist() == [0, 0, 8, 9, 9, 0, 0]
    assert rows["attention_mask"][1].tolist() == [0, 0, 1, 1, 1, 0, 0]
    assert rows["position_ids"][1].tolist()[2:5] == [0, 1, 2] and rows["position_ids"][0].tolist()[:5] == [0, 1, 2, 3, 4]


LORA = {"model.lora": "{r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}", "optim.lr": 1e-2,
        "data.grpo.rewards": "[{name: format, options: {pattern: '[13579]'}}]"}  # an odd digit: most groups have a spread to learn from


@pytest.fixture(scope="module")
def lora_reference(tiny_base, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo-lora")
    assert _launch(_argv(tiny_base, prompts, out / "run", **LORA), out, 1) == [0]
    return _rows(out / "run")


def test_with_lora_the_reference_is_the_model_with_its_adapters_off(lora_reference):
    """LoRA: no frozen copy; the KL of the first rollout is exactly 0 (the adapters start at zero), then grows."""
    assert lora_reference[1]["train/kl"] == 0 < lora_reference[STEPS]["train/kl"]
    assert sum(r["train/grad_norm"] > 1e-2 for r in lora_reference.values()) > STEPS * 2 // 3  # most steps: a reward spread


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_lora_under_sharded_parameters_matches_one_process(strategy, lora_reference, tiny_base, prompts, tmp_path):
    """LoRA with the base weights sharded: the rollout gathers base and adapters, the reference forward turns the
    adapters off on the sharded model; 2 ranks give the 1-process run's completions, loss and grad norm."""
    argv = _argv(tiny_base, prompts, tmp_path / "run", **{**LORA, "dist.strategy": strategy, "train.batch_size": 1})
    assert _launch(argv, tmp_path, 2) == [0, 0]
    rows = _rows(tmp_path / "run")
    assert sorted(rows) == list(range(1, STEPS + 1))
    for step, ref in lora_reference.items():
        got = rows[step]
        assert got["train/reward"] == pytest.approx(ref["train/reward"], rel=1e-9, abs=1e-12), step
        assert got["train/completion_length"] == ref["train/completion_length"], step
        # on-policy, the clipped term is ~0 in value (advantages centred, ratio 1): the loss is compared absolutely
        assert abs(got["train/loss"] - ref["train/loss"]) < 1e-6 and _rel(got["train/grad_norm"], ref["train/grad_norm"]) < TOL, (step, got, ref)
