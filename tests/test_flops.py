"""Model FLOPs per token (PaLM appendix B), peak FLOP/s lookup, MFU: against numbers computed by hand."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, LlamaConfig, LlamaForCausalLM

from shardtune.flops import (
    config_flops_per_token, flops_per_token, mfu, model_flops_per_token, non_embedding_params, peak_flops,
)
from shardtune.models import PRESETS


def test_formula_by_hand():
    # Llama-ish L=2, H=4, Q=16, T=128 and N = 100,000: 6N + 12·L·H·Q·T
    assert flops_per_token(100_000, 2, 4, 16, 128) == 600_000 + 12 * 2 * 4 * 16 * 128 == 796_608


def _tiny_llama(tied: bool) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_live_model_counts_the_head_but_not_the_lookup(tied):
    # per layer: q,o 64x64, k,v 64x32 (2 KV heads of 16), gate/up/down 64x128, 2 RMSNorms
    layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    n = 2 * layer + 64 + 512 * 64  # + final norm + lm_head (its matmul is compute, tied or not)
    model = _tiny_llama(tied)
    assert non_embedding_params(model) == n == 106_816
    assert model_flops_per_token(model, 128) == 6 * n + 12 * 2 * 4 * 16 * 128


def test_1b_preset_within_one_percent_of_hand_count():
    p = PRESETS["1b"]
    h, L, f, H = p["hidden_size"], p["num_hidden_layers"], p["intermediate_size"], p["num_attention_heads"]
    q, kv, vocab, T = h // H, p["num_key_value_heads"] * (h // H), 49_152, 2048
    n = L * (2 * h * h + 2 * h * kv + 3 * h * f) + vocab * h  # matmul weights only; norms left out
    by_hand = 6 * n + 12 * L * H * q * T
    got = config_flops_per_token(LlamaConfig(vocab_size=vocab, max_position_embeddings=T, **p), T)
    assert abs(got - by_hand) / by_hand < 0.01
    assert 7.4e9 < got < 7.6e9  # ~1.07B non-embedding parameters


def test_bert_config_excludes_all_three_embedding_tables():
    cfg = BertConfig(vocab_size=30_522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=128)
    layer = 4 * (32 * 32 + 32) + 2 * 64 + (32 * 64 + 64) + (64 * 32 + 32)  # attention, 2 LayerNorms, MLP
    n = 2 * layer + 32 * 32 + 32 + 2 * 32  # + pooler + embedding LayerNorm
    assert config_flops_per_token(cfg, 64) == 6 * n + 12 * 2 * 2 * 16 * 64


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 PCIe", "fp16", 756e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100 80GB PCIe", "torch.bfloat16", 312e12),
        ("NVIDIA H200", "bf16", 989e12),
        ("NVIDIA L40S", "bf16", 362e12),
        ("NVIDIA GeForce RTX 4090", "fp16", 165.2e12),
        ("NVIDIA H100 NVL", "bf16", None),  # not in the table: must not borrow another H100's number
        ("NVIDIA A10G", "bf16", None),
        ("NVIDIA L40", "bf16", None),
        ("NVIDIA H100 80GB HBM3", "no", None),  # fp32: no tensor-core peak
        ("cpu", "bf16", None),
        (None, "bf16", None),
    ],
)
def test_peak_flops(name, dtype, peak):
    assert peak_flops(name, dtype) == peak


def test_mfu():
    assert mfu(3000, 1e9, 1e13) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        mfu(1, 1, 0)
