"""LoRA via PEFT: only adapters (and a classifier's head) train; merged and adapter exports; reading them back."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, lm_overrides, tiny_overrides

ATOL = 1e-5


def _train(argv: list[str]) -> None:
    from accelerate.state import AcceleratorState, GradientState

    from shardtune.cli import main

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert main(argv) == 0


def _lm_lora_run(tmp_path_factory, base, tokenizer, corpus, merge: bool):
    out = tmp_path_factory.mktemp("lora") / "run"
    yaml = out.parent / "lm.yaml"
    yaml.write_text("task: causal_lm\n")
    over = lm_overrides(tokenizer, corpus, out, **{
        "model.name_or_path": base, "model.init": "pretrained", "model.preset": "None", "model.lora": "{r: 4, alpha: 8}",
        "model.lora.merge": str(merge).lower(), "train.max_steps": 8, "train.save_every": 8, "train.log_every": 4, "optim.lr": 1e-2,
    })
    _train(["train", str(yaml), *over])
    return out


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory, tiny_base, tiny_lm_tokenizer, lm_corpus):
    return _lm_lora_run(tmp_path_factory, tiny_base, tiny_lm_tokenizer, lm_corpus, merge=True)


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_base, tiny_lm_tokenizer, lm_corpus):
    return _lm_lora_run(tmp_path_factory, tiny_base, tiny_lm_tokenizer, lm_corpus, merge=False)


def _probe(tokenizer_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return torch.tensor([tok("a gorgeous, witty, seductive movie.")["input_ids"]])


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits


def _from_checkpoint(run):
    """The PEFT model of a run's last checkpoint, built the way training built it."""
    from transformers import AutoTokenizer

    from shardtune.checkpoint import read_state
    from shardtune.config import validate
    from shardtune.export import checkpoint_state_dict
    from shardtune.models import load_causal_lm

    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    cfg = validate(read_state(ckpt).config)
    model = load_causal_lm(cfg.model, AutoTokenizer.from_pretrained(cfg.model.name_or_path))
    model.load_state_dict(checkpoint_state_dict(ckpt), strict=True)
    return model, ckpt


def _strategy(lr: float = 5e-5):
    """The one-process strategy, as `shardtune train` builds it."""
    from shardtune.config import Config
    from shardtune.distributed import build_strategy

    return build_strategy(Config.model_validate({"optim": {"lr": lr}}))


def _lora_cfg(base, **lora):
    from shardtune.config import LoraConfig, ModelConfig

    return ModelConfig(name_or_path=str(base), lora=LoraConfig(**{"r": 4, "dropout": 0.0, **lora}))


def _perturbed(model):
    """Nonzero LoRA B (PEFT starts it at zero) and a changed head, so that exports differ from the base."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


# ---------------------------------------------------------------- what trains


def test_only_adapters_require_grad_and_reach_the_optimizer(tiny_base):
    from transformers import AutoTokenizer

    from shardtune.config import OptimConfig
    from shardtune.models import load_causal_lm
    from shardtune.optim import build_optimizer

    model = load_causal_lm(_lora_cfg(tiny_base, target_modules=["q_proj", "v_proj"]), AutoTokenizer.from_pretrained(tiny_base))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * 2 and all(".lora_A." in n or ".lora_B." in n for n in trainable), sorted(trainable)
    in_optimizer = [p for g in build_optimizer(model, OptimConfig()).param_groups for p in g["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in trainable.values()}
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert 0 < sum(p.numel() for p in in_optimizer) < frozen / 10


def test_classifier_trains_adapters_and_the_whole_head(tiny_bert):
    from shardtune.config import OptimConfig
    from shardtune.models import load_classifier
    from shardtune.optim import build_optimizer

    model = load_classifier(_lora_cfg(tiny_bert, target_modules=["query", "value"]), ["neg", "pos", "mixed"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    head = [n for n in trainable if ".classifier.modules_to_save." in n]
    assert [n.rsplit(".", 1)[-1] for n in head] == ["bias", "weight"]
    assert all(".lora_A." in n or ".lora_B." in n for n in set(trainable) - set(head)) and len(trainable) == 2 + 2 * 2 * 2
    assert sum(len(g["params"]) for g in build_optimizer(model, OptimConfig()).param_groups) == len(trainable)


def test_unknown_target_module_is_one_clear_line(run_cli, tiny_lm_tokenizer, lm_corpus, tiny_base, tmp_path):
    yaml = tmp_path / "lm.yaml"
    yaml.write_text("task: causal_lm\n")
    over = lm_overrides(tiny_lm_tokenizer, lm_corpus, tmp_path / "r", **{
        "model.name_or_path": tiny_base, "model.init": "pretrained", "model.preset": "None",
        "model.lora.target_modules": "[q_proj, qkv_proj]",
    })
    code, _, err = run_cli("train", yaml, *over)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "target_modules names qkv_proj," in err and "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head" in err


def test_unknown_target_module_names_the_classifiers_layers(tiny_bert):
    from shardtune import ShardtuneError
    from shardtune.models import load_classifier

    with pytest.raises(ShardtuneError, match=r"names q_proj, k_proj, v_proj, o_proj, which BertForSequenceClassification .* query, key, value, dense"):
        load_classifier(_lora_cfg(tiny_bert), ["a", "b"])  # the default targets are Llama's


def test_scratch_model_cannot_export_the_adapter_alone(tiny_lm_tokenizer):
    from transformers import AutoTokenizer

    from shardtune import ShardtuneError
    from shardtune.config import LoraConfig, ModelConfig
    from shardtune.models import load_causal_lm

    cfg = ModelConfig(name_or_path=str(tiny_lm_tokenizer), init="scratch", preset="tiny", lora=LoraConfig(merge=False))
    with pytest.raises(ShardtuneError, match="lora.merge=true"):
        load_causal_lm(cfg, AutoTokenizer.from_pretrained(tiny_lm_tokenizer))


# ---------------------------------------------------------------- exports


def test_export_merges_a_copy_not_the_live_model(tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardtune.checkpoint import export_model
    from shardtune.models import load_causal_lm

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = _perturbed(load_causal_lm(_lora_cfg(tiny_base), tok))
    ids = _probe(tiny_base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _logits(model, ids)
    strategy = _strategy()
    strategy.prepare(model)
    export_model(strategy, tok, None, tmp_path / "model")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=0)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=0, atol=ATOL)


def test_lora_run_exports_a_merged_plain_model(merged_run, tiny_base, run_cli, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = merged_run / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    assert not (model_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    ids = _probe(model_dir)
    adapter_model, ckpt = _from_checkpoint(merged_run)
    expected = _logits(adapter_model, ids)
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=0, atol=ATOL)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert (_logits(base, ids) - expected).abs().max() > 1e-3  # the adapters learned something
    code, out, err = run_cli("export", ckpt, "--out", tmp_path / "exported")
    assert code == 0, err
    assert not (tmp_path / "exported" / "adapter_config.json").exists()
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "exported"), ids), expected, rtol=0, atol=ATOL)


def test_lora_run_exports_the_adapter_alone(adapter_run, tiny_base, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    from shardtune.export import export_checkpoint

    model_dir = adapter_run / "model"
    assert (model_dir / "adapter_model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    assert not (model_dir / "model.safetensors").exists()
    config = json.loads((model_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base.resolve()) and config["r"] == 4
    ids = _probe(model_dir)
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), model_dir)
    adapter_model, ckpt = _from_checkpoint(adapter_run)
    expected = _logits(adapter_model, ids)
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=ATOL)
    export_checkpoint(ckpt, tmp_path / "merged", merge=True)  # the same weights, merged
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids), expected, rtol=0, atol=ATOL)


# ---------------------------------------------------------------- reading an export back into the live model


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_read_exported_state_restores_what_was_exported(tiny_base, tmp_path, merge):
    from transformers import AutoTokenizer

    from shardtune.models import load_causal_lm, read_exported_state, save_lora

    tok = AutoTokenizer.from_pretrained(tiny_base)
    trained = _perturbed(load_causal_lm(_lora_cfg(tiny_base), tok))
    save_lora(trained, tmp_path / "model", merge=merge)
    live = load_causal_lm(_lora_cfg(tiny_base), tok)  # base weights + a fresh adapter
    restored = read_exported_state(tmp_path / "model", live)  # part of the state: the frozen base or lora_A stay
    assert restored and not set(restored) - set(live.state_dict())
    live.load_state_dict(restored, strict=False)
    ids = _probe(tiny_base)
    torch.testing.assert_close(_logits(live, ids), _logits(trained, ids), rtol=0, atol=ATOL)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_read_exported_state_of_a_classifier(tiny_bert, tmp_path, merge):
    from shardtune.models import load_classifier, read_exported_state, save_lora

    cfg = _lora_cfg(tiny_bert, target_modules=["query", "value"])
    trained = _perturbed(load_classifier(cfg, ["a", "b"]))
    save_lora(trained, tmp_path / "model", merge=merge)
    torch.manual_seed(5)  # another random head
    live = load_classifier(cfg, ["a", "b"])
    live.load_state_dict(read_exported_state(tmp_path / "model", live), strict=False)
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
    torch.testing.assert_close(_logits(live, ids), _logits(trained, ids), rtol=0, atol=ATOL)


# ---------------------------------------------------------------- classification end to end


def test_lora_classification_run_merges_head_and_adapters(tiny_bert, tmp_path, run_cli):
    from transformers import AutoModelForSequenceClassification

    from shardtune.config import load_config
    from shardtune.export import checkpoint_state_dict
    from shardtune.models import load_classifier


    out = tmp_path / "run"
    over = tiny_overrides(tiny_bert, out, **{
        "model.lora": "{r: 4, target_modules: [query, value]}", "train.eval_every": "None", "train.save_every": 12,
        "tracking.report_to": "[]",
    })
    code, _, err = run_cli("train", ROOT / "configs" / "quickstart.yaml", *over)
    assert code == 0, err
    cfg = load_config(out / "config.yaml")
    labels = json.loads((out / "model" / "label_map.json").read_text())["id2label"]
    adapter_model = load_classifier(cfg.model, [labels[str(i)] for i in range(len(labels))])
    state = checkpoint_state_dict(out / "checkpoints" / "step-00000012")
    adapter_model.load_state_dict(state, strict=True)
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model")
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102], [101, 1037, 9202, 1010, 11771, 102]])
    expected = _logits(adapter_model, ids)
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=0, atol=ATOL)
    initial_head = state["base_model.model.classifier.original_module.weight"]  # PEFT's frozen copy of the new head
    assert (merged.classifier.weight - initial_head).abs().max() > 1e-4  # the head trained
    code, out_text, err = run_cli("predict", out, "a gorgeous, witty movie")
    assert code == 0 and out_text.split("\t")[0] in ("fresh", "rotten"), err


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_best_export_loads_back_into_the_prepared_model(tiny_base, tmp_path, merge):
    """The Trainer's path: export at an eval, train on, then load the best export back into the prepared model."""
    from transformers import AutoTokenizer

    from shardtune.checkpoint import export_model
    from shardtune.models import load_causal_lm, read_exported_state

    tok = AutoTokenizer.from_pretrained(tiny_base)
    strategy = _strategy(lr=1e-2)
    strategy.prepare(load_causal_lm(_lora_cfg(tiny_base, merge=merge), tok))
    model = strategy.model
    ids = _probe(tiny_base)

    def steps(n):
        model.train()
        for _ in range(n):
            strategy.backward(model(input_ids=ids, labels=ids).loss)
            strategy.optimizer_step(skip=False)

    steps(2)
    best = _logits(model, ids)
    export_model(strategy, tok, None, tmp_path / "model")
    steps(2)
    assert (_logits(model, ids) - best).abs().max() > 1e-4
    strategy.load_full_state_dict(lambda: read_exported_state(tmp_path / "model", strategy.unwrapped()), partial=True)
    torch.testing.assert_close(_logits(model, ids), best, rtol=0, atol=ATOL)
