"""GRPO as pure tensor functions: group advantages, completion log-probs, the clipped loss and its aggregations.

This is TRL's GRPOTrainer (trl/trainer/grpo_trainer.py, TRL 1.16) with
`importance_sampling_level="token"`, no two-sided `delta`, no entropy mask or
bonus and no vLLM importance-sampling correction; tests/test_grpo_loss.py
calls TRL's own code on the same inputs and compares.

Per completion token t of sequence i (ratio r = exp(logp - old_logp), A_i the
sequence's advantage, ref the frozen reference's log-prob):

    loss_it = -min(r * A_i, clamp(r, 1 - epsilon_low, 1 + epsilon_high) * A_i) + beta * kl_it
    kl_it   = exp(ref - logp) - (ref - logp) - 1          (Schulman's k3 estimator, as TRL)
    kl_it  *= r    with kl_correction (TRL's `use_bias_correction_kl`, True by default in TRL 1.16: the
                   DeepSeek-V3.2 unbiased reverse-KL gradient; r has a gradient even where it is 1,
                   so this changes the KL gradient on-policy too). kl_correction=False: the plain k3
                   term of the GRPO paper.

When the completions were sampled from the current weights (one optimizer
step per rollout batch), old_logp is logp detached (TRL does the same), so r
is 1 in value and only its gradient acts.

Aggregation (`loss_type`) and the (sum, weight) pair each returns. The caller
adds `loss_sum` and `weight` over the step's micro-batches and ranks and
divides once (as every shardtune task does); that global quotient is TRL's
loss for the step (TRL's micro-batches all hold the same number of
sequences):

    grpo     mean over tokens per sequence, then over sequences.  sum = sum_i seq_mean_i,  weight = sequences
    bnpo     token mean over THIS micro-batch, micro-batches then averaged (TRL:
             "normalised over the local batch").                sum = token mean,        weight = 1
    dr_grpo  token sum / (sequences * max_completion_length)    sum = token sum / L_max, weight = sequences
    dapo     token sum / active tokens of the whole step        sum = token sum,         weight = active tokens

(bnpo with sum = token sum, weight = tokens would be dapo: the two differ only
in whether micro-batches are weighted by their tokens.) `max_completion_length`
is the configured cap on new tokens, not the padded width of the batch.

Statistics come back as sums over the active tokens with their count
(`tokens`), as TRL logs them (its `global_masked_mean`): kl (the term added
to the loss, so ratio-weighted with kl_correction, as TRL logs it; present
whenever ref_logp is given), and the clip fractions clip_ratio/low
(r < 1 - epsilon_low with A < 0), clip_ratio/high (r > 1 + epsilon_high
with A > 0) and clip_ratio/region (either).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)
IGNORE = -100
STATS = ("kl", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region")


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N, 1] unbiased (Bessel-corrected) std over each row ignoring NaNs, NaN where a row has < 2 values.

    = trl.trainer.utils.nanstd.
    """
    mean = torch.nanmean(x, dim=1, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=1, keepdim=True)
    n = (~torch.isnan(x)).sum(dim=1, keepdim=True)
    correction = torch.where(n > 1, n / (n - 1).clamp(min=1), torch.full_like(var, float("nan")))
    return torch.sqrt(var * correction)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     batch_std: Optional[float] = None) -> torch.Tensor:
    """[B * G] rewards, G completions per prompt in consecutive rows -> [B * G] float32 advantages.

    Each reward minus its group's mean; divided by (std + 1e-4) where std is the unbiased std of the group
    (scale="group") or of the WHOLE batch (scale="batch": the mean stays per group), not divided for "none".
    For "batch", `batch_std` gives that std when the batch is larger than `rewards` (every micro-batch and rank of
    a step: `batch_std_of`); else it is the std of `rewards`.
    NaN rewards (unscorable) are left out of the means and stds and get advantage 0; so does a group of one.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, not {scale!r}")
    r = rewards.float().reshape(-1)
    if r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    groups = r.view(-1, group_size)
    centred = groups - torch.nanmean(groups, dim=1, keepdim=True)
    if scale == "group":
        std = _nanstd(groups) if group_size > 1 else torch.zeros_like(groups)
    elif batch_std is not None:
        std = torch.full_like(groups, batch_std)
    else:
        std = _nanstd(r.view(1, -1)) if r.numel() > 1 else torch.zeros_like(groups)
    adv = centred if scale == "none" else centred / (std + STD_EPS)
    return torch.nan_to_num(adv.reshape(-1), nan=0.0)


def batch_std_of(count: float, total: float, squares: float) -> float:
    """The unbiased std of a batch from its (count, sum, sum of squares) of non-NaN rewards, summed over micro-batches and
    ranks in float64 (0 for fewer than 2 rewards, where TRL's is NaN or 0: every advantage is then 0 or the centred reward)."""
    if count < 2:
        return 0.0
    return math.sqrt(max(squares - total * total / count, 0.0) / (count - 1))


def completion_logps(logits: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """log p(completion token) per position, [B, C] float32, 0 where completion_mask is 0.

    `logits` [B, T, V] come from a forward over prompt + completion (T >= C + 1; e.g. the whole sequence, or
    `logits_to_keep=C + 1`): the logits at position -C-1+j score completion token j. They are divided by the
    sampling `temperature` first, as TRL does (its log-probs are those of the distribution it sampled from).
    """
    c = completion_ids.shape[1]
    scores = logits[:, -c - 1:-1].float()
    if temperature != 1.0:
        scores = scores / temperature
    target = completion_ids.masked_fill(completion_mask == 0, IGNORE)
    return -F.cross_entropy(scores.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")


@torch.no_grad()
def completion_entropy(logits: torch.Tensor, completion_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The policy's entropy (nats) at each completion position, [B, C] float32, 0 where completion_mask is 0: the
    distribution each completion token was drawn from (logits as for `completion_logps`), TRL's `entropy` metric."""
    c = completion_mask.shape[1]
    rows = []
    for scores in logits[:, -c - 1:-1].split(4):  # a few rows at a time: [4, C, V] float32 at most
        logp = torch.log_softmax(scores.float() / temperature, dim=-1)
        rows.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(rows) * completion_mask


@dataclass
class GrpoOutput:
    loss: torch.Tensor  # 0-dim: loss_sum / weight, TRL's loss when this micro-batch is the whole step
    loss_sum: torch.Tensor  # 0-dim, with grad: add over micro-batches and ranks (see the module docstring)
    weight: torch.Tensor  # 0-dim float, no grad: add likewise and divide the summed sums by it
    per_token_loss: torch.Tensor  # [B, C], 0 at inactive positions
    stats: dict[str, torch.Tensor]  # STATS -> 0-dim sums over the active tokens (no kl without a reference)
    tokens: torch.Tensor  # 0-dim float: the active tokens the stats are summed over

    def means(self) -> dict[str, float]:
        """The stats as means over this micro-batch's active tokens (TRL's logged values for one micro-batch)."""
        n = max(self.tokens.item(), 1.0)
        return {k: v.item() / n for k, v in self.stats.items()}


def per_token_terms(logp: torch.Tensor, old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
                    advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float, epsilon_high: float,
                    beta: float, kl_correction: bool = True) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """([B, C] per-token loss, [B, C] ratio (detached), [B, C] k3 kl or None); inactive positions hold 0 and get no grad."""
    off = mask == 0
    logp = logp.masked_fill(off, 0.0)  # padding may hold anything (even inf): it must not reach exp() or the grads
    old = logp.detach() if old_logp is None else old_logp.detach().masked_fill(off, 0.0)
    adv = advantages.detach().to(logp.dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if ref_logp is not None:
        delta = ref_logp.detach().masked_fill(off, 0.0) - logp
        kl = torch.exp(delta) - delta - 1
        kl = kl * ratio if kl_correction else kl
        if beta != 0.0:
            loss = loss + beta * kl
    elif beta != 0.0:
        raise ValueError("beta != 0 needs the reference log-probs (ref_logp)")
    return loss.masked_fill(off, 0.0), ratio.detach(), kl


def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str,
              max_completion_length: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, weight) of one micro-batch for `loss_type` (the table in the module docstring)."""
    m = mask.to(per_token_loss.dtype)
    token_sum = (per_token_loss * m).sum()
    sequences = torch.tensor(float(per_token_loss.shape[0]), device=per_token_loss.device)
    one = torch.ones((), device=per_token_loss.device)
    if loss_type == "grpo":
        return ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).sum(), sequences
    if loss_type == "bnpo":
        return token_sum / m.sum().clamp(min=1.0), one
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length (the configured cap on new tokens)")
        return token_sum / max_completion_length, sequences
    if loss_type == "dapo":
        return token_sum, m.sum().detach()
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")


def clip_stats(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float,
               epsilon_high: float, kl: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """STATS as sums over the active tokens (TRL's is_low_clipped / is_high_clipped / is_region_clipped)."""
    m = mask.to(ratio.dtype)
    adv = advantages.detach().to(ratio.dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(ratio.dtype)
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(ratio.dtype)
    out = {}
    if kl is not None:
        out["kl"] = (kl.detach() * m).sum()
    out.update({"clip_ratio/low": (low * m).sum(), "clip_ratio/high": (high * m).sum(),
                "clip_ratio/region": (torch.maximum(low, high) * m).sum()})
    return out


def policy_loss(logp: torch.Tensor, old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
                advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float = 0.2,
                epsilon_high: Optional[float] = None, beta: float = 0.0, loss_type: str = "dapo",
                max_completion_length: Optional[int] = None, kl_correction: bool = True) -> GrpoOutput:
    """The GRPO loss of one micro-batch from [B, C] completion log-probs (see the module docstring).

    logp: the policy's, with grad; old_logp: the sampling policy's (None: logp detached); ref_logp: the frozen
    reference's (None: no KL; required when beta != 0); advantages: [B] (or [B, C]); mask: [B, C], 1 on the
    completion tokens that count. epsilon_high defaults to epsilon_low (TRL's default for both: 0.2).
    kl_correction multiplies the KL term by the ratio (TRL's default `use_bias_correction_kl=True`).
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    per_token, ratio, kl = per_token_terms(logp, old_logp, ref_logp, advantages, mask, epsilon_low, epsilon_high, beta,
                                           kl_correction)
    loss_sum, weight = aggregate(per_token, mask, loss_type, max_completion_length)
    stats = clip_stats(ratio, advantages, mask, epsilon_low, epsilon_high, kl)
    tokens = mask.to(ratio.dtype).sum()
    return GrpoOutput(loss_sum / weight.clamp(min=1.0), loss_sum, weight, per_token, stats, tokens)
