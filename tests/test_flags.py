"""Flags that must have an observable effect: each test here fails when its flag is ignored.

Everything runs in-process on tiny models built from configs (the packaged tokenizers), through the code a run
uses: `load_config` -> `build_strategy` -> `build_task` -> `strategy.prepare` -> `task.loss`. The one exception
is the token-weighting test at the end, which needs two ranks (forklaunch) to see the sum over ranks.
tests/mutations.py names these tests as the ones that kill its mutations.
"""

from __future__ import annotations

import json

import pytest
import torch

import forklaunch
from conftest import ROOT, lm_overrides, tiny_overrides
from shardtune.config import load_config


def _cfg(tok, corpus, tmp_path, **extra):
    return load_config(None, lm_overrides(tok, corpus, tmp_path, **{"data.num_workers": 0, "train.mixed_precision": "no", **extra}))


def _prepared(cfg):
    """(strategy, task) as the Trainer builds them: the model wrapped by the strategy, in train mode."""
    from shardtune.distributed import build_strategy
    from shardtune.models import load_tokenizer
    from shardtune.tasks import build_task

    strategy = build_strategy(cfg)
    task = build_task(cfg, strategy, load_tokenizer(cfg.model))
    strategy.prepare(task.model)
    strategy.model.train()
    return strategy, task


def _calls(module, record):
    return module.register_forward_hook(lambda _m, _args, out: record(out))


# ---------------------------------------------------------------- model.compile


@pytest.mark.parametrize("flag", [False, True])
def test_compile_makes_the_prepared_model_a_compiled_module(flag, tiny_lm_tokenizer, lm_corpus, tmp_path):
    """torch.compile is lazy: wrapping costs nothing until a forward, so no compile runs here."""
    from torch._dynamo.eval_frame import OptimizedModule

    strategy, task = _prepared(_cfg(tiny_lm_tokenizer, lm_corpus, tmp_path, **{"model.compile": str(flag).lower()}))
    assert isinstance(strategy.model, OptimizedModule) is flag, type(strategy.model)
    if flag:
        assert strategy.model._orig_mod is task.model  # the task's model is what was compiled
    strategy.end()


# ---------------------------------------------------------------- model.gradient_checkpointing


@pytest.mark.parametrize("flag, forwards", [(False, 1), (True, 2)])
def test_gradient_checkpointing_recomputes_each_layer_in_backward(flag, forwards, tiny_lm_tokenizer, lm_corpus, tmp_path):
    strategy, task = _prepared(_cfg(tiny_lm_tokenizer, lm_corpus, tmp_path, **{"model.gradient_checkpointing": str(flag).lower()}))
    # A pre-hook on a module inside the layer: transformers checkpoints the layer's forward (the layer's own hooks stay
    # outside), and the recompute stops early once it has what backward needs (so forward hooks may never fire there).
    seen = []
    hook = task.model.model.layers[0].mlp.register_forward_pre_hook(lambda _m, _args: seen.append(1))
    batch = next(iter(task.batches()))
    total, count = task.loss(strategy.model, batch)
    assert len(seen) == 1  # the forward itself
    strategy.backward(total / count)
    hook.remove()
    assert len(seen) == forwards  # checkpointing runs the layer's forward again inside backward
    strategy.end()


# ---------------------------------------------------------------- train.mixed_precision


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_mixed_precision_sets_the_dtype_linears_compute_in(precision, dtype, tiny_lm_tokenizer, lm_corpus, tmp_path):
    strategy, task = _prepared(_cfg(tiny_lm_tokenizer, lm_corpus, tmp_path, **{"train.mixed_precision": precision}))
    dtypes, cached = [], []

    def record(out):
        dtypes.append(out.dtype)
        cached.append(torch.is_autocast_cache_enabled())

    hook = _calls(task.model.model.layers[0].mlp.down_proj, record)
    with torch.no_grad():
        total, _ = task.loss(strategy.model, next(iter(task.batches())))
    hook.remove()
    assert dtypes == [dtype] and torch.isfinite(total)
    # no cast cache: it would hold every weight's bf16 copy to the end of the forward (distributed.base.autocast_kwargs)
    assert cached == [precision == "no"]  # (the flag reads True outside autocast: torch's default)
    assert task.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32  # autocast: the weights stay fp32
    strategy.end()


# ---------------------------------------------------------------- model.attention


@pytest.mark.parametrize("kind", ["eager", "sdpa"])
def test_attention_is_the_implementation_asked_for(kind, tiny_lm_tokenizer, lm_corpus, tmp_path):
    from shardtune.models import load_causal_lm, load_tokenizer

    cfg = _cfg(tiny_lm_tokenizer, lm_corpus, tmp_path, **{"model.attention": kind})
    model = load_causal_lm(cfg.model, load_tokenizer(cfg.model))
    assert model.config._attn_implementation == kind
    assert all(layer.self_attn.config._attn_implementation == kind for layer in model.model.layers)


# ---------------------------------------------------------------- model.dropout


def _train_mode_outputs(model, inputs: dict, seeds=(0, 1)) -> list[torch.Tensor]:
    model.train()
    outs = []
    for seed in seeds:
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model(**inputs).logits)
    return outs


def _changes_with_the_seed(model, inputs) -> bool:
    a, b = _train_mode_outputs(model, inputs)
    return not torch.equal(a, b)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dropout_of_a_classifier(p, tiny_bert):
    from shardtune.config import ModelConfig
    from shardtune.models import load_classifier

    model = load_classifier(ModelConfig(name_or_path=str(tiny_bert), dropout=p), ["neg", "pos"])
    inputs = {"input_ids": torch.randint(5, 1000, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    assert _changes_with_the_seed(model, inputs) is (p > 0)  # the packaged config's own dropout is 0.1: 0 must turn it off


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("init", ["scratch", "pretrained"])
def test_dropout_of_a_causal_lm(p, init, tiny_lm_tokenizer, lm_corpus, tmp_path):
    """Llama's only dropout is attention_dropout (0 by default): model.dropout must reach it, from scratch or loaded."""
    from shardtune.models import load_causal_lm, load_tokenizer

    cfg = _cfg(tiny_lm_tokenizer, lm_corpus, tmp_path, **{"model.dropout": p})
    if init == "pretrained":
        folder = tmp_path / "saved"
        tokenizer = load_tokenizer(cfg.model)
        load_causal_lm(cfg.model.model_copy(update={"dropout": None}), tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        cfg = _cfg(folder, lm_corpus, tmp_path, **{"model.dropout": p, "model.init": "pretrained", "model.preset": "null"})
    model = load_causal_lm(cfg.model, load_tokenizer(cfg.model))
    inputs = {"input_ids": torch.randint(2, 500, (2, 12))}
    assert _changes_with_the_seed(model, inputs) is (p > 0)


# ---------------------------------------------------------------- data.doc_positions, and no KV cache


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


FIRST = "An overlong first document about a film that drags on and on before the credits finally roll."
SECOND = "A short second review: sharp, funny and warm."


def _last_hidden(tok, tmp_path, texts, attention):
    """The final norm's output over the first row of the train stream of `texts`, through the task's loss forward."""
    src = _jsonl(tmp_path / f"docs-{len(texts)}.jsonl", texts)
    cfg = _cfg(tok, src, tmp_path, **{"data.doc_positions": "true", "data.seq_len": 96, "data.holdout": 0, "data.shuffle_block": 0,
                                      "train.batch_size": 1, "model.attention": attention})
    torch.manual_seed(0)  # the same weights in every call
    strategy, task = _prepared(cfg)
    strategy.model.eval()
    got = []
    hook = _calls(task.model.model.norm, lambda out: got.append(out[0]))
    batch = next(iter(task.batches()))
    with torch.no_grad():
        task.loss(strategy.model, batch)
    hook.remove()
    strategy.end()
    real = batch["input_ids"][0] != task.tokenizer.pad_token_id
    return batch["input_ids"][0][real], got[0][real]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_doc_positions_isolate_a_packed_document(attention, tiny_lm_tokenizer, tmp_path):
    """The second document packed after the first gets the hidden states (hence logits) it gets alone."""
    ids_alone, alone = _last_hidden(tiny_lm_tokenizer, tmp_path, [SECOND], attention)
    ids_packed, packed = _last_hidden(tiny_lm_tokenizer, tmp_path, [FIRST, SECOND], attention)
    start = len(ids_packed) - len(ids_alone)
    assert start > 10 and torch.equal(ids_packed[start:], ids_alone)  # the row is FIRST then SECOND
    assert torch.allclose(packed[start:], alone, atol=1e-5, rtol=0), (packed[start:] - alone).abs().max()
    assert not torch.allclose(packed[:len(ids_alone)], alone, atol=1e-2)  # the check can tell documents apart


def _sft_overrides():
    return {"task": "sft", "data.sources": f"[{{path: {ROOT / 'data/pydocs-faq-sft.jsonl'}}}]", "data.seq_len": 256, "data.holdout": 8}


@pytest.mark.parametrize("task_name", ["causal_lm", "sft"])
@pytest.mark.parametrize("chunked", [True, False])
def test_no_training_or_eval_forward_builds_a_kv_cache(task_name, chunked, tiny_lm_tokenizer, lm_corpus, tmp_path):
    extra = {**(_sft_overrides() if task_name == "sft" else {}), "model.chunked_loss": str(chunked).lower(), "train.eval_batches": 1}
    strategy, task = _prepared(_cfg(tiny_lm_tokenizer, lm_corpus, tmp_path, **extra))
    caches = []
    hook = _calls(task.model, lambda out: caches.append(out.past_key_values))
    total, count = task.loss(strategy.model, next(iter(task.batches())))
    strategy.backward(total / count)
    assert len(caches) == 1  # the training forward
    metrics = task.evaluate(strategy.model, "eval")
    hook.remove()
    strategy.end()
    assert metrics["eval/tokens"] > 0 and len(caches) == 2 and caches == [None, None], caches  # and one eval batch


# ---------------------------------------------------------------- the step's token weighting (two ranks)


def _first_step(run) -> dict:
    return next(r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r.get("step") == 1 and "train/grad_norm" in r)


def test_a_step_weights_tokens_alike_over_micro_batches_and_ranks(tiny_bert, tmp_path):
    """1 x 8 and 2 ranks x (2 x 2): the same first-step gradient (its norm) and loss. Fails when a micro-batch's loss is
    its own mean (the 1/grad_accum dropped) and when the step's count is averaged over ranks instead of summed."""
    rows = {}
    for world, micro, accum in [(1, 8, 1), (2, 2, 2)]:
        out = tmp_path / f"{world}x{micro}x{accum}"
        argv = ["train", str(ROOT / "configs/quickstart.yaml"), *tiny_overrides(tiny_bert, out, **{
            "data.max_examples": 40, "model.dropout": 0, "train.batch_size": micro, "train.grad_accum": accum, "train.max_steps": 1,
            "train.log_every": 1, "train.eval_every": None, "train.mixed_precision": "no", "tracking.report_to": "[]",
        })]
        (tmp_path / f"logs-{world}").mkdir()
        codes = forklaunch.launch(argv, tmp_path / f"logs-{world}", world=world)
        assert codes == [0] * world, (tmp_path / f"logs-{world}" / "rank0.log").read_text()[-3000:]
        rows[world] = _first_step(out)
    one, two = rows[1], rows[2]
    assert two["train/grad_norm"] == pytest.approx(one["train/grad_norm"], rel=1e-4) and one["train/grad_norm"] > 0
    assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-5)
