"""A sequence length past the positions a pretrained model has is refused at the start, in one sentence (it would
crash inside the position embedding at the first long row), for every task; a model from scratch is not bounded."""

from __future__ import annotations

import pytest

from conftest import ROOT, lm_overrides, one_sentence, tiny_overrides

QS = ROOT / "configs" / "quickstart.yaml"


def test_minilm_max_length_past_its_512_positions_is_refused(run_cli, tmp_path):
    over = tiny_overrides("minilm-l6", tmp_path / "run", **{"model.max_length": 100000, "tracking.report_to": "[]"})
    code, _, err = run_cli("train", QS, *over)
    line = one_sentence(code, err, "model.max_length 100000", "512 positions minilm-l6", "set model.max_length to at most 512")
    assert line.endswith("was trained with; set model.max_length to at most 512.")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_max_length_at_the_limit_trains(run_cli, tiny_bert, tmp_path):
    over = tiny_overrides(tiny_bert, tmp_path / "run", **{"model.max_length": 128, "train.max_steps": 1,
                                                           "tracking.report_to": "[]"})
    code, _, err = run_cli("train", QS, *over)
    assert code == 0, err[-2000:]


@pytest.mark.parametrize("task, key", [("causal_lm", "data.seq_len"), ("sft", "data.seq_len"), ("dpo", "data.dpo.max_length")])
def test_pretrained_lm_sequence_past_its_positions_is_refused(run_cli, tiny_base, lm_corpus, tmp_path, task, key):
    """tiny_base has 256 positions (a Llama: rotary, so it would not crash, but it never saw position 256 or later)."""
    sources = {"causal_lm": lm_corpus, "sft": ROOT / "data/pydocs-faq-sft.jsonl"}
    over = lm_overrides(tiny_base, sources.get(task, lm_corpus), tmp_path / "run", **{"task": task, "model.init": "pretrained",
                                                                                     "model.preset": "None"})
    if task == "dpo":
        over = [o for o in over if not o.startswith(("data.sources", "data.seq_len", "data.holdout"))]
        over += [f"data.train_file={ROOT / 'data/pydocs-faq-dpo.jsonl'}", "data.max_examples=12", "model.lora={r: 4}"]
    yaml = tmp_path / f"{task}.yaml"
    yaml.write_text(f"task: {task}\n")
    code, _, err = run_cli("train", yaml, *over, f"{key}=300")
    one_sentence(code, err, f"{key} 300 is more than the 256 positions", f"set {key} to at most 256.")


def test_position_limits_of_model_families(tiny_bert):
    """BERT: max_position_embeddings; RoBERTa: two fewer (its positions start after the padding index); GPT-2: n_positions."""
    from transformers import (AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel, RobertaConfig,
                              RobertaForSequenceClassification)

    from shardtune.models import position_limit

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    assert position_limit(AutoModelForSequenceClassification.from_pretrained(tiny_bert)) == 128
    assert position_limit(RobertaForSequenceClassification(RobertaConfig(max_position_embeddings=66, pad_token_id=1, **small))) == 64
    assert position_limit(GPT2LMHeadModel(GPT2Config(n_positions=48, n_embd=32, n_layer=1, n_head=2, vocab_size=100))) == 48


def test_scratch_causal_lm_is_not_bounded_by_a_config(tiny_lm_tokenizer, lm_corpus, tmp_path):
    """From scratch the positions come from the config (the preset sizes them): nothing to refuse; the same model
    loaded as pretrained is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardtune import ShardtuneError
    from shardtune.config import load_config
    from shardtune.models import check_positions

    yaml = tmp_path / "lm.yaml"
    yaml.write_text("task: causal_lm\n")
    over = lm_overrides(tiny_lm_tokenizer, lm_corpus, tmp_path / "run", **{"data.seq_len": 4096})
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         vocab_size=100, max_position_embeddings=2048))
    check_positions(model, load_config(yaml, over))
    with pytest.raises(ShardtuneError, match="data.seq_len 4096 is more than the 2048 positions"):
        check_positions(model, load_config(yaml, [*over, "model.init=pretrained", "model.preset=None"]))
