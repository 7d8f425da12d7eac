"""`shardtune generate`: a trained run's model (plain, merged or base + adapter) continues a prompt."""

from __future__ import annotations

import json

import pytest

from conftest import lm_overrides


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_lm_tokenizer, lm_corpus):
    """A tiny Llama trained a few steps on real text (no eval: the final weights are the model)."""
    from accelerate.state import AcceleratorState, GradientState

    from shardtune.cli import main

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    out = tmp_path_factory.mktemp("gen") / "run"
    yaml = out.parent / "lm.yaml"
    yaml.write_text("task: causal_lm\n")
    assert main(["train", str(yaml), *lm_overrides(tiny_lm_tokenizer, lm_corpus, out, **{"data.holdout": 0, "train.max_steps": 15})]) == 0
    return out


def test_greedy_continuation_is_printed_and_deterministic(run_cli, lm_run):
    code, first, err = run_cli("generate", lm_run, "This movie is", "--max-new-tokens", 12)
    assert code == 0, err
    assert first.strip()
    code, again, err = run_cli("generate", lm_run / "model", "This movie is", "--max-new-tokens", 12)
    assert code == 0 and again == first, err


def test_max_new_tokens_bounds_the_continuation(lm_run):
    from shardtune.generate import generate, load_for_generate

    loaded = load_for_generate(lm_run)
    short = generate(lm_run, "The plot", max_new_tokens=2, loaded=loaded)
    longer = generate(lm_run, "The plot", max_new_tokens=10, loaded=loaded)
    assert longer.startswith(short) and len(longer) > len(short)


def _argmax_decode(model, tokenizer, prompt: str, n: int) -> str:
    """Greedy decoding by hand: append the most likely next token, n times (no cache, no generate())."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_greedy_is_argmax_decoding(run_cli, lm_run):
    from shardtune.generate import load_for_generate

    model, tokenizer = load_for_generate(lm_run)
    model.eval()
    want = _argmax_decode(model, tokenizer, "A film", 12)
    for flags in ([], ["--temperature", 0], ["--temperature", 0, "--seed", 3]):  # the default is greedy; a seed changes nothing
        code, out, err = run_cli("generate", lm_run, "A film", "--max-new-tokens", 12, *flags)
        assert code == 0 and out.rstrip("\n") == want, (flags, out, want, err)


def test_sampling_follows_the_temperature_and_the_seed(run_cli, lm_run):
    """At temperature > 0 the text depends on the seed (and the same seed gives it again); a tiny temperature is
    greedy again, so the temperature itself reaches the sampler (not just do_sample)."""
    def gen(temperature, seed):
        code, out, err = run_cli("generate", lm_run, "A film", "--temperature", temperature, "--seed", seed, "--max-new-tokens", 16)
        assert code == 0, err
        return out

    sampled = {seed: gen(1.5, seed) for seed in (1, 2, 3)}
    assert len(set(sampled.values())) == 3, sampled
    assert gen(1.5, 2) == sampled[2]
    greedy = run_cli("generate", lm_run, "A film", "--max-new-tokens", 16)[1]
    assert greedy not in sampled.values()
    assert all(gen(1e-4, seed) == greedy for seed in (1, 2))


def test_adapter_folder_loads_on_the_base_it_names(lm_run, tmp_path, monkeypatch):
    """Base + adapter generates what the merged model does; a packaged base name is resolved."""
    import peft
    from transformers import AutoModelForCausalLM

    from shardtune import assets
    from shardtune.generate import generate

    base_dir = lm_run / "model"
    monkeypatch.setitem(assets.PACKAGED_MODELS, "tiny-packaged", lambda: base_dir)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False),  # random B: it matters
    )
    model.peft_config["default"].base_model_name_or_path = "tiny-packaged"
    model.save_pretrained(tmp_path / "adapter")  # no tokenizer here: the base's is used
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    (tmp_path / "merged" / "tokenizer.json").write_bytes((base_dir / "tokenizer.json").read_bytes())
    (tmp_path / "merged" / "tokenizer_config.json").write_bytes((base_dir / "tokenizer_config.json").read_bytes())
    via_adapter = generate(tmp_path / "adapter", "The acting", max_new_tokens=10)
    assert via_adapter == generate(tmp_path / "merged", "The acting", max_new_tokens=10)


def test_folders_without_a_causal_lm_fail_in_one_line(run_cli, tmp_path, tiny_bert):
    (tmp_path / "empty").mkdir()
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": None}))
    cases = {
        tmp_path / "missing": "does not exist",
        tmp_path / "empty": "holds no model",
        tiny_bert: "not a causal language model",
        tmp_path / "orphan": "names no base model",
    }
    for folder, message in cases.items():
        code, out, err = run_cli("generate", folder, "hello")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out, (folder, err)


def test_bad_arguments(run_cli, lm_run):
    code, _, err = run_cli("generate", lm_run, "hi", "--max-new-tokens", 0)
    assert code == 2 and "positive number" in err
    code, _, err = run_cli("generate", lm_run, "", "--max-new-tokens", 3)
    assert code == 2 and "prompt is empty" in err
