"""The memory planner: model-state formulas by hand, activation formula, Ψ from the meta model, the CLI table, verdicts."""

from __future__ import annotations

import json

import pytest

from shardtune import ShardtuneError
from shardtune.config import load_config
from shardtune.plan import (
    DS_MAX_LIVE_PARAMETERS, DS_REDUCE_BUCKET, GiB, SPEED_ORDER, Shape, activation_bytes, choose_strategy, model_shape,
    model_state_bytes, parse_memory, plan,
)

from conftest import ROOT

LLAMA_1B = ROOT / "configs/llama-1b-pretrain.yaml"
QUICKSTART = ROOT / "configs/quickstart.yaml"


def _ms(num_params, strategy, world, mp):
    return model_state_bytes(num_params, strategy, world, mp)


def test_mixed_precision_model_states_by_hand():
    psi, n = 1000, 4  # ZeRO paper: 2Ψ params, 2Ψ grads, 12Ψ = 4Ψ fp32 master + 8Ψ Adam moments
    assert _ms(psi, "zero1", n, "bf16") == {"params": 2000, "grads": 2000, "master": 1000, "optim": 2000}
    assert _ms(psi, "zero2", n, "bf16") == {"params": 2000, "grads": 500, "master": 1000, "optim": 2000}
    assert _ms(psi, "zero3", n, "fp16") == {"params": 500, "grads": 500, "master": 1000, "optim": 2000}
    assert _ms(psi, "zero3_offload", n, "bf16") == _ms(psi, "zero3", n, "bf16")
    # the paper's totals: 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, 16Ψ/N
    assert [sum(_ms(psi, s, n, "bf16").values()) for s in ("zero1", "zero2", "zero3")] == [7000, 5500, 4000]
    # DDP / FSDP2 under Accelerate keep fp32 weights (autocast): no master copy, same 16Ψ and 16Ψ/N totals
    assert _ms(psi, "ddp", n, "bf16") == {"params": 4000, "grads": 4000, "master": 0, "optim": 8000}
    assert _ms(psi, "fsdp", n, "bf16") == {"params": 1000, "grads": 1000, "master": 0, "optim": 2000}


def test_fp32_model_states_by_hand():
    psi, n = 1000, 2  # what dist.state_bytes measures: params 4Ψ (/N under ZeRO-3), Adam moments 8Ψ (/N under ZeRO)
    assert _ms(psi, "cpu", n, "no") == {"params": 4000, "grads": 4000, "master": 0, "optim": 8000}
    assert _ms(psi, "zero1", n, "no") == {"params": 4000, "grads": 4000, "master": 2000, "optim": 4000}
    assert _ms(psi, "zero2", n, "no") == {"params": 4000, "grads": 2000, "master": 2000, "optim": 4000}
    assert _ms(psi, "zero3", n, "no") == {"params": 2000, "grads": 2000, "master": 2000, "optim": 4000}
    # docs/benchmarks.md: DeepSpeed's fp32 states per rank are 8Ψ + 12Ψ/N, 4Ψ + 16Ψ/N, 20Ψ/N
    assert [sum(_ms(psi, s, n, "no").values()) for s in ("zero1", "zero2", "zero3")] == [14000, 12000, 10000]
    with pytest.raises(ShardtuneError, match="unknown strategy 'zero4'"):
        _ms(psi, "zero4", n, "no")


def test_predicts_the_documented_measurements():
    # docs/benchmarks.md "Sharding": Ψ = 11,072,770, 2 ranks, fp32; a kept ZeRO-2 run held 44,291,088 optimizer bytes
    psi = 11_072_770
    assert _ms(psi, "zero2", 2, "no")["optim"] == pytest.approx(44_291_088, rel=1e-5)
    assert _ms(psi, "cpu", 2, "no")["optim"] == pytest.approx(88.58e6, rel=1e-3)
    assert _ms(psi, "zero3", 2, "no")["params"] == pytest.approx(22.15e6, rel=1e-3)


def test_tiny_bert_fp32_predictions_per_rank(tiny_bert):
    from transformers import AutoConfig, BertForSequenceClassification

    cfg = load_config(QUICKSTART, [f"model.name_or_path={tiny_bert}", "data.labels=[fresh, rotten]"])
    psi = model_shape(cfg).num_params
    # vocab 30522, hidden 32, 2 layers, intermediate 64, 128 positions, 2 token types; pooler; 2-label head
    embeddings = 30_522 * 32 + 128 * 32 + 2 * 32 + 2 * 32
    layer = 4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 2 * 32
    assert psi == embeddings + 2 * layer + (32 * 32 + 32) + (32 * 2 + 2) == 999_138
    real = BertForSequenceClassification(AutoConfig.from_pretrained(tiny_bert, num_labels=2))
    assert psi == sum(p.numel() for p in real.parameters() if p.requires_grad)
    predicted = {s: _ms(psi, s, 2, "no") for s in ("cpu", "zero2", "zero3")}
    assert {s: (v["params"], v["optim"]) for s, v in predicted.items()} == {
        "cpu": (3_996_552, 7_993_104), "zero2": (3_996_552, 3_996_552), "zero3": (1_998_276, 3_996_552),
    }


def test_activations_reduce_to_korthikanti_for_a_gpt_layer():
    s, b, h, a = 512, 4, 1024, 16  # one GPT layer, 16-bit, dropout, eager attention: sbh(34 + 5as/h)
    gpt = Shape("gpt", 0, 1, h, a, h, 4 * h, False, True, True, 0, 0, s)
    top = 2 * 2 * s * b * h
    assert activation_bytes(gpt, b, 2, False) - top == s * b * h * (34 + 5 * a * s / h)
    # full checkpointing: each layer's input (2sbh) plus one layer recomputed in backward
    two = Shape("gpt", 0, 2, h, a, h, 4 * h, False, True, True, 0, 0, s)
    assert activation_bytes(two, b, 2, True) - top == 2 * 2 * s * b * h + s * b * h * (34 + 5 * a * s / h)
    # SDPA / flash: no attention-score term; a causal LM adds s·b·V·(p + 12) for the loss
    lm = Shape("lm", 0, 1, h, a, h, 4 * h, False, True, False, 50_000, 0, s)
    assert activation_bytes(lm, b, 2, False) - top == s * b * h * 34 + s * b * 50_000 * 14


def test_constants_match_the_deepspeed_configs():
    for stage in ("zero1", "zero2", "zero3", "zero3_offload"):
        zero = json.loads((ROOT / f"launch/deepspeed/{stage}.json").read_text())["zero_optimization"]
        assert zero["stage"] == {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}[stage]  # the file is the stage it is named
        assert ("offload_optimizer" in zero) == (stage == "zero3_offload")
        assert zero["reduce_bucket_size"] == DS_REDUCE_BUCKET
        if stage.startswith("zero3"):
            assert zero["stage3_max_live_parameters"] == DS_MAX_LIVE_PARAMETERS
    offload = json.loads((ROOT / "launch/deepspeed/zero3_offload.json").read_text())["zero_optimization"]
    assert offload["offload_param"]["device"] == offload["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize(
    "text, n", [("80GiB", 80 * GiB), ("80GB", 80 * 10**9), ("24G", 24 * GiB), ("81920MiB", 80 * GiB), ("1.5 TiB", 3 << 39)]
)
def test_parse_memory(text, n):
    assert parse_memory(text) == n


@pytest.mark.parametrize("text", ["80", "eighty", "80XB", "-1GiB", "0GiB", ""])
def test_parse_memory_rejects(text):
    with pytest.raises(ShardtuneError, match="80GiB, 80GB, 24G or 81920MiB"):
        parse_memory(text)


def test_cli_prints_every_strategy(run_cli, tiny_bert):
    code, out, err = run_cli("plan", QUICKSTART, f"model.name_or_path={tiny_bert}", "--gpus", "2", "--gpu-memory", "16GiB")
    assert code == 0, err
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(SPEED_ORDER) <= rows
    assert "fastest strategy that fits: ddp" in out


def test_cli_bad_memory_and_missing_gpus(run_cli):
    code, _, err = run_cli("plan", QUICKSTART, "--gpus", "8", "--gpu-memory", "80 gigs")
    assert code == 2 and err.startswith("shardtune: error: --gpu-memory '80 gigs' is not a memory size") and "80GiB" in err
    code, _, err = run_cli("plan", QUICKSTART, "--gpu-memory", "80GiB")  # no --gpus and no CUDA here
    assert code == 2 and "--gpus 8 --gpu-memory 80GiB" in err


@pytest.fixture(scope="module")
def shape_1b():
    return model_shape(load_config(LLAMA_1B))


def test_1b_shape(shape_1b):
    assert shape_1b.num_params == 1_170_302_976 and shape_1b.vocab == 49_152 and shape_1b.seq_len == 2048


def test_1b_on_one_8gib_gpu_names_the_remedies(shape_1b):
    p = plan(load_config(LLAMA_1B), 1, 8 * GiB, shape=shape_1b)
    assert p.best is None and not any(r.fits for r in p.rows)
    v = p.verdict
    assert v.startswith("nothing fits in") and "train.batch_size=" in v and "zero3_offload" in v
    assert "more GPUs alone would not help" in v and "gradient checkpointing is already on" in v
    with pytest.raises(ShardtuneError, match="Nothing fits"):
        choose_strategy(load_config(LLAMA_1B), 1, 8 * GiB, shape=shape_1b)
    off = plan(load_config(LLAMA_1B, ["model.gradient_checkpointing=false"]), 8, 24 * GiB, shape=shape_1b)
    assert not any(r.fits for r in off.rows)  # no one-axis strategy holds the activations without checkpointing ...
    assert off.best == "fsdp" and off.mesh.seq * off.mesh.tp > 1 and "dist.mesh." in off.verdict  # ... a mesh that splits them does
    none = plan(load_config(LLAMA_1B, ["model.gradient_checkpointing=false", "train.batch_size=64"]), 8, 24 * GiB, shape=shape_1b)
    assert none.best is None and not any(r.fits for r in none.meshes) and none.verdict.startswith("nothing fits")
    assert "train.batch_size=" in none.verdict


def test_1b_on_eight_80gib_gpus_table(shape_1b):
    p = plan(load_config(LLAMA_1B), 8, 80 * GiB, shape=shape_1b)
    assert [r.strategy for r in p.rows] == list(SPEED_ORDER) and p.best == "ddp"
    ddp = p.rows[0]
    assert ddp.params == ddp.grads == 4 * shape_1b.num_params and ddp.max_micro_batch > p.micro_batch
    offload = p.rows[-1]
    assert offload.params == offload.optim == 0 and offload.host == 16 * shape_1b.num_params / 8


def test_choose_strategy(tiny_bert, shape_1b):
    tiny = load_config(QUICKSTART, [f"model.name_or_path={tiny_bert}"])
    assert choose_strategy(tiny, 8, 80 * GiB)[0] == "ddp"
    assert choose_strategy(tiny, 1, 80 * GiB)[0] == "single_gpu"
    strategy, reason, mesh = choose_strategy(load_config(LLAMA_1B, ["train.batch_size=2"]), 8, 16 * GiB, shape=shape_1b)
    assert strategy in ("zero1", "zero2", "fsdp", "zero3", "zero3_offload") and strategy in reason and mesh.world == 8


def test_plan_knows_every_task_from_its_spec(run_cli):
    """The plan reads what it needs of a task (causal model or not, tokens per row) from config.TASK_SPECS."""
    code, out, err = run_cli("plan", ROOT / "configs" / "smollm2-dpo-lora.yaml", "--gpus", "1", "--gpu-memory", "24GiB")
    assert code == 0, err
    assert "LlamaForCausalLM" in out and "192" in out, out  # SmolLM2 with the DPO config's max_length
