"""DPO loss, rewards and gradients: against TRL's DPOTrainer and against a hand computation.

TRL (a test-only dependency, `pip install -e .[test]`) is compared through
`trl.DPOTrainer.compute_loss` -> `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py,
TRL 1.16): a minimal trainer on a tiny Llama, built offline, fed a batch in
its own layout (`input_ids`, `attention_mask`, `completion_mask`, chosen rows
then rejected rows, as `DataCollatorForPreference` makes it). Its loss is the
mean over pairs, its metrics (`rewards/chosen`, `rewards/rejected`,
`rewards/margins`, `rewards/accuracies`) means over pairs; ours are sums
with a count, so the test divides.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from shardtune.config import DpoConfig
from shardtune.data.dpo import collate_pairs, pair_ids
from shardtune.dpo_loss import dpo_loss, reward_sums, sequence_logps
from shardtune.tasks.dpo import pair_logps, reference_logps

TOL = 1e-5
RECORDS = [
    {"prompt": "How do I copy an object in Python?", "chosen": "Use copy.copy() or copy.deepcopy().", "rejected": "Python is a snake."},
    {"prompt": "Is there a tool to help find bugs?", "chosen": "Yes: Pylint and Pyflakes check source code.", "rejected": "No."},
    {"prompt": "Why is it called Python?", "chosen": "After Monty Python's Flying Circus.", "rejected": "Because of the large snakes in the standard library, which are very long."},
]


@pytest.fixture(scope="module")
def tok(tiny_lm_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm_tokenizer)


def tiny_llama(tok, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def batch(tok):
    return collate_pairs([pair_ids(r, tok) for r in RECORDS], tok.pad_token_id)


def trl_layout(batch: dict) -> dict:
    """Our pair batch in DataCollatorForPreference's layout."""
    cat = lambda key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])  # noqa: E731
    return {"input_ids": cat("input_ids"), "attention_mask": cat("attention_mask"), "completion_mask": (cat("labels") != -100).long()}


def trl_trainer(tmp_path, tok, model, ref_model=None, peft_config=None, beta=0.1):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, beta=beta, bf16=False, fp16=False)
    data = Dataset.from_list(RECORDS)
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config)


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def ours(model, batch, beta, reference=None):
    """Mean loss over pairs and the metric means, from our functions (loss backpropagated)."""
    out = dpo_loss(*pair_logps(model, batch), *reference_logps(model, batch, reference), beta)
    (out.losses.sum() / out.pairs).backward()
    sums, n = reward_sums(out)
    return out.losses.mean().item(), {k: v.item() / n for k, v in sums.items()}


def compare_with_trl(trainer, model, batch, beta, reference=None):
    model.train()
    trl_loss = trainer.compute_loss(model, trl_layout(batch))
    trl_loss.backward()
    trl_grads = grads(model)
    m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    loss, metrics = ours(model, batch, beta, reference)
    our_grads = grads(model)
    assert loss == pytest.approx(trl_loss.item(), abs=TOL)
    assert metrics["rewards/chosen"] == pytest.approx(m["rewards/chosen"], abs=TOL)
    assert metrics["rewards/rejected"] == pytest.approx(m["rewards/rejected"], abs=TOL)
    assert metrics["rewards/margin"] == pytest.approx(m["rewards/margins"], abs=TOL)
    assert metrics["rewards/accuracy"] == pytest.approx(m["rewards/accuracies"], abs=TOL)
    assert abs(metrics["rewards/margin"]) > 1e-3  # the reference really differs from the policy
    assert set(our_grads) == set(trl_grads) and len(our_grads) > 0
    for name, g in trl_grads.items():
        assert torch.allclose(our_grads[name], g, atol=TOL, rtol=0), name
    assert max(g.abs().max().item() for g in trl_grads.values()) > 1e-4  # the gradients are not all ~0


def test_loss_rewards_and_grads_equal_trl_with_a_separate_reference(tmp_path, tok, batch):
    policy, ref = tiny_llama(tok, 0), tiny_llama(tok, 1)
    trainer = trl_trainer(tmp_path, tok, policy, ref_model=ref, beta=0.3)
    assert trainer.model is policy and trainer.ref_model is ref and trainer.loss_types == ["sigmoid"]
    compare_with_trl(trainer, policy, batch, 0.3, reference=ref)


def test_loss_rewards_and_grads_equal_trl_under_lora_with_adapters_disabled(tmp_path, tok, batch):
    import peft

    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = trl_trainer(tmp_path, tok, tiny_llama(tok, 0), peft_config=lora)
    model = trainer.model
    assert trainer.ref_model is None and isinstance(model, peft.PeftModel)
    torch.manual_seed(2)
    with torch.no_grad():  # LoRA starts as the identity (B = 0): move it so that policy != reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    compare_with_trl(trainer, model, batch, 0.1)


def test_sequence_logps_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :2] = -100
    labels[1, 5:] = -100
    want = []
    for b in range(3):
        logp = torch.log_softmax(logits[b].double(), dim=-1)
        want.append(sum(logp[t, labels[b, t + 1]].item() for t in range(6) if labels[b, t + 1] != -100))
    got = sequence_logps(logits, labels)
    assert got.dtype == torch.float32 and got.tolist() == pytest.approx(want, abs=TOL)


def test_dpo_loss_and_its_gradients_by_hand():
    beta = 0.25
    pc = torch.tensor([-10.0, -4.0, -7.5], requires_grad=True)
    pr = torch.tensor([-12.0, -3.0, -7.5], requires_grad=True)
    rc, rr = torch.tensor([-11.0, -4.5, -8.0]), torch.tensor([-11.5, -3.5, -7.0])
    out = dpo_loss(pc, pr, rc, rr, beta)
    out.losses.sum().backward()
    for i in range(3):
        delta = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert out.losses[i].item() == pytest.approx(math.log1p(math.exp(-beta * delta)), abs=TOL)
        d = -beta / (1 + math.exp(beta * delta))  # d/d delta of -log sigmoid(beta delta)
        assert pc.grad[i].item() == pytest.approx(d, abs=TOL) and pr.grad[i].item() == pytest.approx(-d, abs=TOL)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), abs=TOL)
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()), abs=TOL)
    assert not out.chosen_rewards.requires_grad


def test_reward_sums_add_over_micro_batches_and_count_ties_half():
    pc, pr = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0]), torch.tensor([-2.0, -1.0, -3.0, -5.0, -4.0])
    ref = torch.zeros(5)
    whole, n = reward_sums(dpo_loss(pc, pr, ref, ref, 0.5))
    assert n == 5 and whole["rewards/accuracy"].item() == 2.5  # wins 0, 3; tie 2
    assert whole["rewards/margin"].item() == pytest.approx(0.5 * (1 - 1 + 0 + 1 - 1))
    parts = [reward_sums(dpo_loss(pc[s], pr[s], ref[s], ref[s], 0.5)) for s in (slice(0, 2), slice(2, 5))]
    for key, value in whole.items():
        assert sum(p[0][key].item() for p in parts) == pytest.approx(value.item())
    assert sum(p[1] for p in parts) == n
    start, _ = reward_sums(dpo_loss(pc, pr, pc, pr, 0.1))  # policy == reference: every pair a tie
    assert start["rewards/accuracy"].item() / 5 == 0.5 and start["rewards/margin"].item() == 0


def test_lora_reference_is_the_base_model_without_a_copy(tok, batch):
    import peft

    base = tiny_llama(tok, 0)
    with torch.no_grad():
        want = pair_logps(base, batch)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(copy.deepcopy(base), lora)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    got = reference_logps(model, batch)
    policy = pair_logps(model, batch)
    for g, w, p in zip(got, want, policy):
        assert not g.requires_grad and torch.allclose(g, w, atol=TOL, rtol=0)
        assert (p - w).abs().max() > 1e-2  # with adapters on, the model is not the reference
    assert policy[0].requires_grad  # the adapters are on again after the reference forward


def test_frozen_reference_of_a_plain_model_stays_put_while_the_policy_trains(tok, batch):
    model = tiny_llama(tok, 0)
    with pytest.raises(ValueError, match="frozen reference"):
        reference_logps(model, batch)
    ref = copy.deepcopy(model).requires_grad_(False).eval()  # what DPOTask builds (from model.name_or_path) for a full fine-tune
    with torch.no_grad():
        start = pair_logps(model, batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = dpo_loss(*pair_logps(model, batch), *reference_logps(model, batch, ref), DpoConfig().beta)
    out.losses.mean().backward()
    opt.step()
    after = reference_logps(model, batch, ref)
    moved = pair_logps(model, batch)
    for a, s, m in zip(after, start, moved):
        assert torch.equal(a, s) and (m - s).abs().max() > 1e-3
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
