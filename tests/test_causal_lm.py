"""Causal LM through the same loop: learning, eval perplexity, generation-free export."""

from __future__ import annotations

import json
import math

import pytest

from conftest import lm_overrides


@pytest.fixture
def lm_yaml(tmp_path):
    f = tmp_path / "lm.yaml"
    f.write_text("task: causal_lm\n")
    return f


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_tiny_llama_overfits_a_few_hundred_tokens(run_cli, lm_yaml, tiny_lm_tokenizer, lm_corpus, tmp_path):
    """The whole path learns: a from-scratch Llama memorizes ~250 tokens of real text to loss < 0.1."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join(lm_corpus.read_text().splitlines(keepends=True)[:4]))
    over = lm_overrides(tiny_lm_tokenizer, small, tmp_path / "r", **{
        "data.sources": f"[{{path: {small}}}]", "data.holdout": 0, "data.on_source_end": "repeat",
        "train.max_steps": 300, "train.log_every": 10, "optim.lr": 1e-2, "optim.scheduler": "cosine", "optim.weight_decay": 0.0,
        "model.arch": "{hidden_size: 128, intermediate_size: 256}",
    })
    code, out, err = run_cli("train", lm_yaml, *over)
    assert code == 0, err
    losses = [r["train/loss"] for r in _log(tmp_path / "r") if "train/loss" in r]
    assert losses[0] > 3 and losses[-1] < 0.1, losses


def test_eval_loss_and_perplexity_on_held_out_documents(run_cli, lm_yaml, tiny_lm_tokenizer, lm_corpus, tmp_path):
    code, out, err = run_cli("train", lm_yaml, *lm_overrides(tiny_lm_tokenizer, lm_corpus, tmp_path / "r", **{"train.eval_every": 10, "train.eval_on_start": True}))
    assert code == 0, err
    rows = _log(tmp_path / "r")
    last = [r for r in rows if "train/loss" in r][-1]  # the stream's counts reach the logs (and W&B) every log_every steps
    assert last["data/tokens"] > 0 and last["data/documents"] > 0 and 0.9 < last["data/packing_efficiency"] <= 1.0
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20] and evals[0]["eval/loss"] > evals[2]["eval/loss"]
    evals = evals[1:]
    for r in evals:
        assert r["eval/perplexity"] == pytest.approx(math.exp(r["eval/loss"])) and r["eval/tokens"] > 100
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["best/step"] == 20 and metrics["train/steps"] == 20
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "model")
    assert model.config.num_hidden_layers == 2 and (tmp_path / "r" / "model" / "tokenizer.json").is_file()


def test_causal_lm_needs_max_steps(run_cli, lm_yaml, tiny_lm_tokenizer, lm_corpus, tmp_path):
    over = [o for o in lm_overrides(tiny_lm_tokenizer, lm_corpus, tmp_path / "r") if not o.startswith("train.max_steps")]
    code, _, err = run_cli("train", lm_yaml, *over)
    assert code == 2 and "set train.max_steps" in err and "Traceback" not in err


def test_more_ranks_than_the_data_can_feed(run_cli, lm_yaml, tiny_lm_tokenizer, tmp_path):
    """A stream that yields no batch stops at once with what to change, not a silent 0-step run."""
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a single short document"}\n')
    over = lm_overrides(tiny_lm_tokenizer, one, tmp_path / "r", **{"data.sources": f"[{{path: {one}}}]", "data.holdout": 0,
                                                                    "data.clean.min_chars": 1000})
    code, _, err = run_cli("train", lm_yaml, *over)
    assert code == 2 and "ran out before the first step" in err and "fewer processes" in err


def test_z_loss_and_generations_at_eval(run_cli, lm_yaml, tiny_lm_tokenizer, lm_corpus, tmp_path):
    import wandb_reader

    base = {"train.max_steps": 4, "train.eval_every": 2}
    code, _, err = run_cli("train", lm_yaml, *lm_overrides(tiny_lm_tokenizer, lm_corpus, tmp_path / "plain", **base))
    assert code == 0, err
    over = lm_overrides(tiny_lm_tokenizer, lm_corpus, tmp_path / "z", **{
        **base, "train.z_loss": 1e-2, "train.eval_prompts": "[the film is, a story about]", "tracking.report_to": "[wandb]",
    })
    code, _, err = run_cli("train", lm_yaml, *over)
    assert code == 0, err
    plain = [r["train/loss"] for r in _log(tmp_path / "plain") if "train/loss" in r]
    with_z = [r["train/loss"] for r in _log(tmp_path / "z") if "train/loss" in r]
    assert with_z[0] > plain[0] + 1e-3  # same weights and data at step 1: the difference is the z term
    tables = [r["eval/generations"] for r in _log(tmp_path / "z") if "eval/generations" in r]
    assert len(tables) == 2 and [row["prompt"] for row in tables[0]] == ["the film is", "a story about"]
    assert all(isinstance(row["completion"], str) for row in tables[0])
    history = wandb_reader.history(wandb_reader.run_file(tmp_path / "z"))
    logged = [r["eval/generations"] for r in history if "eval/generations" in r]
    assert len(logged) == 2 and logged[0]["_type"] == "table-file" and logged[0]["nrows"] == 2


def test_compiled_model_trains_like_the_eager_one(run_cli, lm_yaml, tiny_lm_tokenizer, lm_corpus, tmp_path):
    base = {"train.max_steps": 3, "data.holdout": 0}
    for name, compiled in [("eager", "false"), ("compiled", "true")]:
        over = lm_overrides(tiny_lm_tokenizer, lm_corpus, tmp_path / name, **{**base, "model.compile": compiled})
        code, _, err = run_cli("train", lm_yaml, *over)
        assert code == 0, err
    eager = [r["train/loss"] for r in _log(tmp_path / "eager") if "train/loss" in r]
    compiled = [r["train/loss"] for r in _log(tmp_path / "compiled") if "train/loss" in r]
    assert compiled == pytest.approx(eager, rel=1e-3)


def test_gradient_checkpointing_gives_the_same_losses(run_cli, lm_yaml, tiny_lm_tokenizer, lm_corpus, tmp_path):
    """Recomputing activations in backward changes memory, not the math."""
    losses = {}
    for name, flag in [("plain", "false"), ("ckpt", "true")]:
        over = lm_overrides(tiny_lm_tokenizer, lm_corpus, tmp_path / name, **{"train.max_steps": 4, "data.holdout": 0,
                                                                              "model.gradient_checkpointing": flag})
        code, _, err = run_cli("train", lm_yaml, *over)
        assert code == 0, err
        losses[name] = [r["train/loss"] for r in _log(tmp_path / name) if "train/loss" in r]
    assert losses["ckpt"] == pytest.approx(losses["plain"], rel=1e-5) and len(losses["plain"]) == 4
