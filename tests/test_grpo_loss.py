"""GRPO advantages, loss, logged statistics and gradients: against TRL's GRPOTrainer (TRL 1.16, test-only).

Nothing of TRL is re-implemented here; its own methods run, called unbound on a stand-in `self` (`trl_self`)
that carries TRL's GRPOConfig defaults (a real `trl.GRPOConfig`; notably `use_bias_correction_kl=True`) and
the trainer attributes the methods read, for one process:

- advantages: `GRPOTrainer._generate_and_score_completions`, with `_generate` returning fixed completions
  and `_calculate_rewards` fixed per-function rewards (multi_objective_aggregation "sum_then_normalize",
  `reward_weights`, scale_rewards group / batch / none); its output["advantages"] vs our `group_advantages`
  over the totals of a `RewardSet` of the same per-function values.
- loss, d loss / d logp and the metrics: `GRPOTrainer._compute_loss`, whose `_get_per_token_logps_and_entropies`
  hands TRL a leaf tensor of log-probs (our `policy_loss` gets an equal leaf), for each loss type, beta 0 and
  0.04 with and without the KL bias correction, epsilon_low 0.2 != epsilon_high 0.28, completions of varying
  length (one fully masked, as `mask_truncated_completions` makes them). Metrics: kl, clip_ratio/{low,high,
  region}_mean.
- micro-batches: the same step split in two as TRL's gradient accumulation runs it (2 accumulation steps,
  `num_items_in_batch` of the whole step): TRL's summed micro-batch losses and gradients vs our summed
  loss_sum / summed weight.
- from a model: TRL's real `GRPOTrainer._get_per_token_logps_and_entropies` on a tiny Llama patched by
  `trl.trainer.utils.add_fused_lm_head` (temperature 0.7, left-padded prompts), feeding `_compute_loss`, vs
  `completion_logps(model(...).logits)` -> `policy_loss`: log-probs, loss and the gradients of every weight
  (so of the logits), and `completion_entropy` vs TRL's entropies (its `entropy` metric).
- scale_rewards batch split in parts (micro-batches, ranks): `batch_std_of` the parts' summed moments gives TRL's
  whole-batch advantages.
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from types import SimpleNamespace as NS

import pytest
import torch

from shardtune.grpo_loss import LOSS_TYPES, SCALES, batch_std_of, completion_entropy, completion_logps, group_advantages, policy_loss
from shardtune.rewards import Reward, RewardSet

TOL = 1e-5
EPS_LOW, EPS_HIGH = 0.2, 0.28
TEMPERATURE = 0.7  # the sampling temperature: TRL scores completions at it
MAX_LEN = 9  # the configured cap on new tokens (dr_grpo), wider than any batch here
METRICS = {"kl": "kl", "clip_ratio/low": "clip_ratio/low_mean", "clip_ratio/high": "clip_ratio/high_mean",
           "clip_ratio/region": "clip_ratio/region_mean"}


class SingleProcess:
    """What the two methods use of accelerate's Accelerator, as it behaves in one process."""

    device = torch.device("cpu")
    process_index, num_processes, is_main_process, sync_gradients = 0, 1, True, True

    def gather(self, t):
        return t

    def reduce(self, t, reduction="sum"):
        return t

    def autocast(self):
        return contextlib.nullcontext()


@pytest.fixture(scope="module")
def trl_defaults(tmp_path_factory):
    from trl import GRPOConfig

    return GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to="none", use_cpu=True)


def trl_self(defaults, loss_type="dapo", beta=0.0, kl_correction=True, accumulation=1, **more) -> NS:
    """A stand-in GRPOTrainer: TRL's defaults, with the attributes GRPOTrainer.__init__ derives from them."""
    args = copy.copy(defaults)
    args.use_bias_correction_kl = kl_correction
    args.gradient_accumulation_steps = args.steps_per_generation = accumulation
    return NS(args=args, accelerator=SingleProcess(), model=NS(training=True, is_gradient_checkpointing=False),
              state=NS(global_step=0), loss_type=loss_type, beta=beta, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
              max_completion_length=MAX_LEN, current_gradient_accumulation_steps=accumulation, use_vllm=args.use_vllm,
              importance_sampling_level=args.importance_sampling_level, top_entropy_quantile=args.top_entropy_quantile,
              off_policy_mask_threshold=args.off_policy_mask_threshold, aux_loss_enabled=False,
              _entropy_bonus_enabled=args.entropy_coef != 0.0 or args.use_adaptive_entropy,
              _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, **more)


def rollout(seed: int, rows: int = 12, width: int = 7) -> dict:
    """Log-probs of completions of varying length: policy (a leaf), sampling policy, reference; advantages."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    lengths[0], lengths[3] = width, 0  # a full-width completion and a fully masked one
    mask = (torch.arange(width) < lengths[:, None]).long()
    logp = -3 * torch.rand(rows, width, generator=g) - 0.05
    old = logp + 0.35 * torch.randn(rows, width, generator=g)  # ratios on both sides of [0.8, 1.28]
    ref = logp + 0.5 * torch.randn(rows, width, generator=g)
    adv = group_advantages(torch.randint(0, 4, (rows,), generator=g).float(), group_size=4)
    return {"logp": logp, "old": old, "ref": ref, "adv": adv, "mask": mask}


def trl_inputs(r: dict, rows=slice(None), items=None) -> dict:
    """_compute_loss's inputs for the rows (the prompt/completion ids are not read once the log-probs are given)."""
    mask = r["mask"][rows]
    return {"prompt_ids": torch.zeros(mask.shape[0], 1, dtype=torch.long), "prompt_mask": torch.ones(mask.shape[0], 1, dtype=torch.long),
            "completion_ids": torch.zeros_like(mask), "completion_mask": mask, "advantages": r["adv"][rows],
            "old_per_token_logps": r["old"][rows], "ref_per_token_logps": r["ref"][rows],
            "num_items_in_batch": r["mask"].sum() if items is None else items}


def trl_loss_on_leaf(stub: NS, r: dict, leaf: torch.Tensor, rows=slice(None)) -> torch.Tensor:
    from trl import GRPOTrainer

    stub._get_per_token_logps_and_entropies = lambda *a, **k: (leaf[rows], torch.zeros_like(leaf[rows]), None)
    return GRPOTrainer._compute_loss(stub, None, trl_inputs(r, rows))


def ours(r: dict, leaf: torch.Tensor, loss_type: str, beta: float, kl_correction: bool, rows=slice(None)):
    return policy_loss(leaf[rows], r["old"][rows], r["ref"][rows], r["adv"][rows], r["mask"][rows], EPS_LOW, EPS_HIGH,
                       beta, loss_type, MAX_LEN, kl_correction)


CASES = [(lt, beta, corr) for lt in LOSS_TYPES for beta, corr in ((0.0, True), (0.04, True), (0.04, False))]


@pytest.mark.parametrize("loss_type,beta,kl_correction", CASES)
def test_loss_grads_and_metrics_equal_trl_compute_loss(trl_defaults, loss_type, beta, kl_correction):
    r = rollout(seed=1)
    stub = trl_self(trl_defaults, loss_type, beta, kl_correction)
    theirs_leaf, our_leaf = r["logp"].clone().requires_grad_(), r["logp"].clone().requires_grad_()
    trl_loss = trl_loss_on_leaf(stub, r, theirs_leaf)
    trl_loss.backward()
    out = ours(r, our_leaf, loss_type, beta, kl_correction)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=TOL)
    assert (out.loss_sum / out.weight).item() == pytest.approx(trl_loss.item(), abs=TOL)
    assert torch.allclose(our_leaf.grad, theirs_leaf.grad, atol=TOL, rtol=0)
    assert our_leaf.grad.abs().max() > 1e-3 and (our_leaf.grad[r["mask"] == 0] == 0).all()
    logged = {k: v[-1] for k, v in stub._metrics["train"].items()}
    means = out.means()
    for ours_key, trl_key in METRICS.items():
        if beta == 0.0 and ours_key == "kl":
            assert "kl" not in logged  # TRL reads no reference at beta 0; we report the KL whenever one is given
            continue
        assert means[ours_key] == pytest.approx(logged[trl_key], abs=TOL), ours_key
    assert means["clip_ratio/low"] > 0 and means["clip_ratio/high"] > 0  # both sides of the clip range are exercised


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_sums_over_weights_equal_trl_gradient_accumulation(trl_defaults, loss_type):
    r = rollout(seed=2, rows=16)
    stub = trl_self(trl_defaults, loss_type, beta=0.04, accumulation=2)
    theirs_leaf, our_leaf = r["logp"].clone().requires_grad_(), r["logp"].clone().requires_grad_()
    halves = (slice(0, 8), slice(8, 16))
    trl_total = sum(trl_loss_on_leaf(stub, r, theirs_leaf, rows) for rows in halves)
    trl_total.backward()
    parts = [ours(r, our_leaf, loss_type, 0.04, True, rows) for rows in halves]
    total = sum(p.loss_sum for p in parts) / sum(p.weight for p in parts)
    total.backward()
    assert parts[0].tokens != parts[1].tokens  # the micro-batches hold different numbers of tokens
    assert total.item() == pytest.approx(trl_total.item(), abs=TOL)
    assert torch.allclose(our_leaf.grad, theirs_leaf.grad, atol=TOL, rtol=0)


@pytest.mark.parametrize("scale", SCALES)
def test_advantages_equal_trl_generate_and_score_completions(trl_defaults, scale):
    from trl import GRPOTrainer

    group, prompts, weights = 4, 4, (1.0, 0.5)
    g = torch.Generator().manual_seed(3)
    columns = torch.stack([torch.randint(0, 2, (group * prompts,), generator=g).float(),
                           torch.randn(group * prompts, generator=g)], dim=1)
    columns[8:12] = torch.tensor([1.0, 0.25])  # a group whose rewards are all equal (std 0): advantages 0
    n = columns.shape[0]
    stub = trl_self(trl_defaults, accumulation=1, environment_factories=None, tools=None, environments=None,
                    _tokenizer=NS(pad_token_id=0), pad_to_multiple_of=None, mask_truncated_completions=False,
                    num_iterations=1, num_generations=group, scale_rewards=scale, reward_weights=torch.tensor(weights),
                    multi_objective_aggregation="sum_then_normalize", reward_func_names=["a", "b"], log_multimodal=False,
                    _calculate_rewards=lambda *a: columns.clone(), _pending_extra_logs={}, _pending_metrics={},
                    _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [], "extra": defaultdict(list)},
                    _generate=lambda p: ([[5, 6]] * n, [[7] * (1 + i % 3) for i in range(n)], None, ["c"] * n, None, {}, None, None))
    stub.args.per_device_train_batch_size = n
    trl_adv = GRPOTrainer._generate_and_score_completions(stub, [{"prompt": "p"}] * n)["advantages"]
    rewards = [Reward(name, lambda c, r, k=k: columns[:, k].tolist(), w) for k, (name, w) in enumerate(zip("ab", weights))]
    scores = RewardSet(rewards).scores(["c"] * n, [{}] * n)
    adv = group_advantages(torch.tensor(scores.total), group, scale)
    assert adv.dtype == torch.float32 and torch.allclose(adv, trl_adv, atol=TOL, rtol=0)
    assert (adv[8:12] == 0).all() and adv.abs().max() > 0.5
    # the step split in micro-batches (and ranks), as the task scales "batch": (count, sum, sum of squares) of each
    # part summed, then each part scaled by that std, gives the whole batch's advantages
    total = torch.tensor(scores.total, dtype=torch.float64)
    parts = [total[:8], total[8:]]
    sums = torch.stack([torch.stack([torch.tensor(float(t.numel()), dtype=torch.float64), t.sum(), (t * t).sum()]) for t in parts]).sum(0)
    split = torch.cat([group_advantages(t.float(), group, scale, batch_std_of(*sums.tolist())) for t in parts])
    assert torch.allclose(split, trl_adv, atol=TOL, rtol=0)
    logged = {k: v[-1] for k, v in stub._metrics["train"].items()}
    assert scores.means()["a"] == pytest.approx(logged["rewards/a/mean"], abs=TOL)
    assert scores.means()["b"] == pytest.approx(logged["rewards/b/mean"], abs=TOL)


def test_group_advantages_by_hand_and_unscorable_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, float("nan"), 1.0, 2.0])
    adv = group_advantages(rewards, 4)
    std0 = torch.tensor([1.0, 0.0, 0.0, 1.0]).std(unbiased=True).item()  # unbiased, as TRL's nanstd
    assert adv[:4].tolist() == pytest.approx([x / (std0 + 1e-4) for x in (0.5, -0.5, -0.5, 0.5)], abs=TOL)
    assert adv[4:8].tolist() == [0.0] * 4  # equal rewards: no signal
    assert adv[9].item() == 0.0  # an unscorable completion moves nothing; the rest of its group ignores it
    assert adv[8].item() == pytest.approx(1.0 / (1.0 + 1e-4), abs=TOL)
    assert group_advantages(rewards[:4], 4, "none").tolist() == [0.5, -0.5, -0.5, 0.5]
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(rewards, 5)


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))


@pytest.fixture(scope="module")
def llama_batch():
    g = torch.Generator().manual_seed(4)
    rows, prompt, width = 6, 5, 6
    prompt_mask = (torch.arange(prompt) >= torch.tensor([0, 2, 1, 3, 0, 2])[:, None]).long()  # left padding
    completion_mask = (torch.arange(width) < torch.tensor([6, 3, 1, 5, 2, 4])[:, None]).long()
    prompt_ids = torch.randint(1, 48, (rows, prompt), generator=g) * prompt_mask
    completion_ids = torch.randint(1, 48, (rows, width), generator=g) * completion_mask
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0])
    b = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
         "completion_mask": completion_mask, "advantages": group_advantages(rewards, 3),
         "num_items_in_batch": completion_mask.sum()}
    with torch.no_grad():  # the sampling policy's and the reference's log-probs: inputs to both sides
        b["old_per_token_logps"], b["ref_per_token_logps"] = (our_logps(tiny_llama(s), b, TEMPERATURE) for s in (2, 1))
    return b


def our_logps(model, b, temperature):
    ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
    attn = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
    return completion_logps(model(input_ids=ids, attention_mask=attn).logits, b["completion_ids"], b["completion_mask"], temperature)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_logps_loss_and_weight_grads_from_a_model_equal_trl(trl_defaults, llama_batch, loss_type):
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    temperature, beta, b = TEMPERATURE, 0.04, llama_batch
    old, ref = b["old_per_token_logps"], b["ref_per_token_logps"]
    model = tiny_llama(0)
    add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))  # as GRPOTrainer.__init__
    stub = trl_self(trl_defaults, loss_type, beta)
    stub._get_per_token_logps_and_entropies = lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies(stub, *a, **k)
    trl_loss = GRPOTrainer._compute_loss(stub, model, b)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logp = our_logps(model, b, temperature)
    with torch.no_grad():
        ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
        attn = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
        trl_logp, trl_entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(stub, model, ids, attn, ids.shape[1] - b["prompt_ids"].shape[1],
                                                                                  compute_entropy=True)
        entropy = completion_entropy(model(input_ids=ids, attention_mask=attn).logits, b["completion_mask"], temperature)
    assert torch.allclose(logp.detach(), trl_logp, atol=TOL, rtol=0)
    on = b["completion_mask"].bool()  # TRL's `entropy` metric is the mean over these
    assert torch.allclose(entropy[on], trl_entropy[on], atol=TOL, rtol=0) and (entropy[~on] == 0).all() and entropy[on].min() > 0.1
    out = policy_loss(logp, old, ref, b["advantages"], b["completion_mask"], EPS_LOW, EPS_HIGH, beta, loss_type, MAX_LEN)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=TOL)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, trl_grads[name], atol=TOL, rtol=0), name
    assert max(g.abs().max().item() for g in trl_grads.values()) > 1e-4


def test_padding_never_reaches_the_loss_or_the_gradients():
    r = rollout(seed=5)
    junk = r["mask"] == 0
    for key, value in (("old", float("inf")), ("ref", float("-inf")), ("logp", float("nan"))):
        r[key] = r[key].masked_fill(junk, value)
    leaf = r["logp"].clone().requires_grad_()
    for loss_type in LOSS_TYPES:
        out = ours(r, leaf, loss_type, 0.1, True)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(leaf.grad).all() and (leaf.grad[junk] == 0).all()
        assert all(torch.isfinite(v) for v in out.stats.values())
        leaf.grad = None


def test_completion_logps_by_hand_and_beta_needs_a_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 3))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    got = completion_logps(logits, ids, mask, temperature=2.0)
    for b in range(2):
        for j in range(3):
            want = torch.log_softmax(logits[b, 2 + j].double() / 2.0, -1)[ids[b, j]].item() if mask[b, j] else 0.0
            assert got[b, j].item() == pytest.approx(want, abs=TOL)
    with pytest.raises(ValueError, match="reference"):
        policy_loss(got, None, None, torch.zeros(2), mask, beta=0.1)
