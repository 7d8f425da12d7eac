"""DPO as pure tensor functions: sequence log-probs, the sigmoid loss, rewards and their sums.

The loss is Rafailov et al. (2023), eq. 7, per pair:
    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
where pi_* / ref_* are the summed log-probabilities of the chosen / rejected
response tokens under the policy / the reference model. The implicit rewards
are beta * (pi - ref) per side (detached). This is TRL's DPOTrainer with
loss_type="sigmoid", f_divergence_type="reverse_kl", label_smoothing=0 and
no length weighting (tests/test_dpo_loss.py compares against it).

Metrics come back as SUMS over the pairs with the pair count, so a trainer
can add them over micro-batches and ranks and divide once (a mean of means
would weight a short last micro-batch like a full one). rewards/accuracy
counts a pair 1 when the chosen reward is higher, 0 when lower and 0.5 on
a tie: at the start of LoRA training the policy equals the reference, every
reward is exactly 0 and accuracy reads the chance level 0.5 (TRL counts ties
as 0, which reads 0.0 there; pairs without ties agree with TRL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100  # = data.pack.IGNORE; this module stays free of the data stage
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, L, V] logits, [B, L] labels -> [B] sums of log p(label) over the labelled tokens, in float32.

    Shifted as in HF causal LMs: the logits at position t score the label at t + 1; IGNORE labels add 0.
    """
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    token_nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
    return -token_nll.sum(dim=1)


@dataclass
class DpoOutput:
    losses: torch.Tensor  # [B] per-pair losses (with grad through the policy log-probs)
    chosen_rewards: torch.Tensor  # [B] beta * (policy - reference) log-prob of the chosen response, detached
    rejected_rewards: torch.Tensor  # [B] the same for the rejected response

    @property
    def pairs(self) -> int:
        return self.losses.shape[0]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> DpoOutput:
    """The DPO sigmoid loss per pair from [B] sequence log-probs (see the module docstring)."""
    chosen_logratios = policy_chosen - ref_chosen.detach()
    rejected_logratios = policy_rejected - ref_rejected.detach()
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return DpoOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def reward_sums(out: DpoOutput) -> tuple[dict[str, torch.Tensor], int]:
    """({metric: sum over the pairs as a 0-dim float tensor}, pair count); divide the summed sums by the summed counts."""
    chosen, rejected = out.chosen_rewards.float(), out.rejected_rewards.float()
    margin = chosen - rejected
    wins = (margin > 0).float() + 0.5 * (margin == 0).float()
    sums = dict(zip(METRICS, (chosen.sum(), rejected.sum(), margin.sum(), wins.sum())))
    return sums, out.pairs
