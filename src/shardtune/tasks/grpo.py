"""Online RL with verifiable rewards (GRPO, Shao et al. 2024): prompts in memory, G completions per prompt sampled
from the current weights, rewards, group-normalised advantages, and TRL's clipped policy loss (grpo_loss.py).

Rollouts. A step's micro-batches are prompt indices (data/batching.py: the same global batches on any layout, as
DPO's pairs). A micro-batch is rolled out lazily, in `sizes()`, which the Trainer calls at the start of the step,
after the previous update: the completions always come from the current weights (on-policy; old log-probs are
the log-probs detached, as TRL's with one update per rollout). The whole micro-batch is generated inside one
`strategy.generating()`: parameters gathered once (ZeRO-3, FSDP2), not once per token. Each prompt's group is
generated alone (G rows of one prompt: no padding, the same shapes on any layout; `synced_gpus` off, which
transformers turns on under ZeRO-3 and FSDP: with the parameters whole, a rank's generation talks to no other rank
and stops at its own EOS) with the RNG seeded from
(train.seed, epoch, prompt index): the same completions on any number of ranks and after a resume, with no
generator state to keep. Padding prompts of an epoch's last step (PAD) are rolled out as prompt 0 with every
completion token masked: they cost a rollout and count for nothing.

The reference (grpo.beta > 0) is DPO's: adapters disabled for LoRA, else a frozen copy of the starting weights.
Loss aggregation (grpo.loss_type) maps to the (sum, weight) pair every task gives the Trainer (grpo_loss.py).
scale_rewards=batch divides by the std of the whole step's rewards (every micro-batch and rank, TRL's generation batch):
the step's micro-batches wait for it, and its first loss() computes it with one all-reduce.

Metrics, summed over micro-batches and ranks then divided: train/reward (the weighted total), train/reward/<name>,
train/reward_std, train/advantage_abs (mean |A|), train/kl, train/clip_ratio/*, train/entropy (the policy's, per completion
token, TRL's), train/completion_length, train/completions_ended (hit EOS);
eval: greedy completions of the held-out prompts, eval/reward and eval/reward/<name>; a table of held-out prompts,
their completions and rewards at each eval.
"""

from __future__ import annotations

import math
from typing import ClassVar, Iterator

import torch

from shardtune import ShardtuneError
from shardtune.config import TASK_SPECS, Config
from shardtune.data.batching import PAD, StepBatches, seeded_holdout, seeded_order, shard_eval
from shardtune.data.prompts import Prompt, completion_mask, encode_prompts, rollout_rows
from shardtune.grpo_loss import STATS as LOSS_STATS
from shardtune.grpo_loss import batch_std_of, completion_entropy, completion_logps, group_advantages, policy_loss
from shardtune.models import is_peft
from shardtune.rewards import RewardSet, make_reward
from shardtune.tasks import EpochPosition, Sizes

TOKEN_STATS = (*LOSS_STATS, "entropy")  # means over completion tokens: policy_loss's statistics and the entropy
STATS = ("reward", "reward_std", "advantage_abs", *TOKEN_STATS, "completion_length", "completions_ended")


def rollout_seed(seed: int, epoch: int, index: int) -> int:
    """The sampling seed of one prompt's group: a function of the run's seed, the epoch and the prompt only."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**31 - 1)


class GRPOTask(EpochPosition):
    spec: ClassVar = TASK_SPECS["grpo"]
    data_name: ClassVar = "GRPO prompt"

    def __init__(self, cfg: Config, strategy, tokenizer):
        from shardtune.models import load_causal_lm

        self.cfg, self.strategy, self.tokenizer, self.labels = cfg, strategy, tokenizer, None
        d, self.g = cfg.data, cfg.data.grpo
        prompts = self._read(d.train_file)[: d.max_examples or None]
        self.train, self.heldout = self._split(prompts)
        self.model = load_causal_lm(cfg.model, tokenizer)
        self.reference = None if self.g.beta == 0 or is_peft(self.model) else self._frozen_copy()
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ShardtuneError("the tokenizer has no EOS token to end completions with; use a causal LM's tokenizer.")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.rewards = RewardSet([make_reward(r.name, r.weight, tokenizer, **r.options) for r in self.g.rewards])
        t = cfg.train
        self.steps = StepBatches(len(self.train), seeded_order(len(self.train), t.seed), t.batch_size, strategy.dp_world, strategy.dp_rank, t.grad_accum)
        self._position = {"epoch": 0, "samples": 0}
        self._unscaled: list[dict] = []  # rolled-out micro-batches of this step awaiting the batch std (scale_rewards=batch)
        self.names = [f"reward/{n}" for n in self.rewards.names] + list(STATS)
        self._sums = torch.zeros(len(self.names) + 2, dtype=torch.float64)  # ..., completions, completion tokens

    def _read(self, spec: str) -> list[Prompt]:
        from shardtune.data.records import open_records

        _, records = open_records(spec)
        prompts = encode_prompts(records, self.tokenizer, self.cfg.data.grpo)
        if not prompts:
            raise ShardtuneError(f"{spec} holds no prompt records; give records with a {self.cfg.data.grpo.prompt_field!r} field.")
        return prompts

    def _split(self, prompts: list[Prompt]) -> tuple[list[Prompt], list[Prompt]]:
        d = self.cfg.data
        if d.validation_file:
            return prompts, self._read(d.validation_file)[: d.max_eval_examples or None]
        train, held = seeded_holdout(prompts, d.validation_fraction, d.split_seed)
        return train, held[: d.max_eval_examples or None]

    def _frozen_copy(self):
        """The starting weights, frozen: a pretrained model loaded again (unsharded, as DPO's reference); a from-scratch
        model copied before the strategy wraps it (loading again would draw another initialisation)."""
        import copy

        from shardtune.distributed.init import full_numel, unsharded_init
        from shardtune.models import load_causal_lm

        if self.cfg.model.init == "pretrained":
            with unsharded_init():
                ref = load_causal_lm(self.cfg.model, self.tokenizer)
        elif any(full_numel(p) != p.numel() for p in self.model.parameters()):
            raise ShardtuneError("grpo.beta > 0 needs the starting weights as the reference, and a from-scratch model built "
                                 "sharded (zero3) has none whole; use model.init=pretrained, LoRA, or grpo.beta=0.")
        else:
            ref = copy.deepcopy(self.model)
        return ref.requires_grad_(False).eval().to(self.strategy.device)

    def describe(self) -> str:
        return (f"{len(self.train)} train / {len(self.heldout)} held-out prompts, {self.g.num_generations} completions each "
                f"(<= {self.g.max_new_tokens} tokens), rewards {', '.join(self.rewards.names)}, loss {self.g.loss_type}")

    def seq_len(self) -> int:
        return self.g.max_prompt_length + self.g.max_new_tokens

    def total_steps(self) -> int:
        t = self.cfg.train
        return t.max_steps or math.ceil(t.epochs * self.steps.steps_per_epoch())

    # -------------------------------------------------------------- rollouts
    def batches(self) -> Iterator[dict]:
        epoch, start = self._position["epoch"], self._position["samples"]
        for idx, ep, done in self.steps.micro_batches(epoch, start):
            self._position = {"epoch": ep + 1, "samples": 0} if done >= len(self.train) else {"epoch": ep, "samples": done}
            yield {"index": idx, "epoch": ep}

    def _generate(self, model, prompt: Prompt, seed: int) -> torch.Tensor:
        """[G, new tokens]: the group of one prompt, sampled with the RNG seeded by `seed`."""
        g, device = self.g, self.strategy.device
        ids = torch.tensor([prompt.ids], device=device).expand(g.num_generations, -1)
        stop = {"stop_strings": list(g.stop), "tokenizer": self.tokenizer} if g.stop else {}  # ends a row at a stop string
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=g.max_new_tokens, do_sample=True,
                                 temperature=g.temperature, top_p=g.top_p, pad_token_id=self.pad, eos_token_id=self.eos, use_cache=True,
                                 synced_gpus=False, **stop)
        return out[:, ids.shape[1]:].cpu()

    def rollout(self, batch: dict) -> dict:
        """Sample, score and lay out a micro-batch's completions (in place); returns the batch."""
        g, seed = self.g, self.cfg.train.seed
        index = [0 if i == PAD else i for i in batch["index"]]
        with torch.no_grad(), self.strategy.generating() as model:
            groups = [self._generate(model, self.train[i], rollout_seed(seed, batch["epoch"], i)) for i in index]
        rows = rollout_rows([self.train[i].ids for i in index for _ in range(g.num_generations)], [c for grp in groups for c in grp], self.eos, self.pad)
        real = torch.tensor([i != PAD for i in batch["index"]]).repeat_interleave(g.num_generations)
        rows["completion_mask"] *= real[:, None].long()
        texts = self.tokenizer.batch_decode([c[m.bool()] for c, m in zip(rows["completion_ids"], rows["completion_mask"])], skip_special_tokens=True)
        records = [self.train[i].record for i in index for _ in range(g.num_generations)]
        scores = self.rewards.scores(texts, records)
        total = torch.tensor(scores.total, dtype=torch.float32)
        batch.update({k: v.to(self.strategy.device) for k, v in rows.items()})
        if g.scale_rewards == "batch":  # scaled by the whole step's std at its first loss(): _scale_step
            self._unscaled.append(batch)
        else:
            batch["advantages"] = group_advantages(total, g.num_generations, g.scale_rewards).to(self.strategy.device)
        batch["real"], batch["scores"], batch["total"] = real, scores, total
        if g.beta:
            batch["ref_logp"] = self._reference_logps(batch)
        return batch

    def _scale_step(self) -> None:
        """scale_rewards=batch: the advantages of the step's micro-batches, divided by the std of every reward of the
        step (every micro-batch, every rank: TRL's std of its whole generation batch), so any layout gets the same
        numbers. The Trainer rolls out all of a step's micro-batches (sizes) before its first loss. Collective."""
        totals = torch.cat([b["total"][b["real"]] for b in self._unscaled]).double()
        totals = totals[~totals.isnan()]
        sums = torch.stack([torch.tensor(float(totals.numel()), dtype=torch.float64), totals.sum(), (totals * totals).sum()])
        std = batch_std_of(*self.strategy.data_sum(sums.to(self.strategy.device)).tolist())
        for b in self._unscaled:
            b["advantages"] = group_advantages(b["total"], self.g.num_generations, "batch", std).to(self.strategy.device)
        self._unscaled = []

    def _logps(self, model, batch: dict, entropy: bool = False):
        """[B, C] completion log-probs; with entropy, also the [B, C] entropies of the same forward."""
        c, mask = batch["completion_ids"].shape[1], batch["completion_mask"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                       use_cache=False, logits_to_keep=c + 1).logits
        logp = completion_logps(logits, batch["completion_ids"], mask, self.g.temperature)
        return (logp, completion_entropy(logits, mask, self.g.temperature)) if entropy else logp

    def _reference_logps(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return self._logps(self.reference, batch)
            with self.strategy.unwrapped().disable_adapter():
                return self._logps(self.strategy.model, batch)

    def sizes(self, batch: dict) -> Sizes:
        if "completion_ids" not in batch:
            self.rollout(batch)
        mask, rows = batch["completion_mask"], batch["real"].to(self.strategy.device)
        weight = {"dapo": mask.sum(), "bnpo": rows.any().long(), "grpo": rows.sum(), "dr_grpo": rows.sum()}[self.g.loss_type]
        return Sizes(weight=weight, samples=rows.sum(), tokens=batch["attention_mask"].sum())

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.g
        if "advantages" not in batch:
            self._scale_step()
        logp, entropy = self._logps(model, batch, entropy=True)
        out = policy_loss(logp, None, batch.get("ref_logp"), batch["advantages"], batch["completion_mask"], g.epsilon, g.epsilon_high,
                          g.beta, g.loss_type, g.max_new_tokens)
        out.stats["entropy"] = entropy.sum()
        self._add_stats(batch, out)
        if g.loss_type == "bnpo" and not batch["real"].any():
            return out.loss_sum * 0, out.weight * 0
        return out.loss_sum, out.weight

    def _add_stats(self, batch: dict, out) -> None:
        real, mask = batch["real"], batch["completion_mask"].cpu()
        n, tokens = float(real.sum()), float(mask.sum())
        each = [float(torch.tensor(v, dtype=torch.float64)[real].sum()) for v in batch["scores"].each.values()]
        total = batch["total"][real].double()
        groups = total.view(-1, self.g.num_generations) if n else total.view(0, 1)
        std = float(groups.std(-1).nan_to_num().sum() * self.g.num_generations) if n else 0.0
        lengths = mask.sum(-1)[real].double()
        ended = float(((batch["completion_ids"].cpu() == self.eos) & mask.bool()).any(-1)[real].sum())
        token_stats = [float(out.stats.get(k, torch.tensor(0.0))) for k in TOKEN_STATS]
        adv = float(batch["advantages"].cpu()[real].abs().sum())
        values = [*each, float(total.sum()), std, adv, *token_stats, float(lengths.sum()), ended, n, tokens]
        self._sums += torch.tensor(values, dtype=torch.float64)

    def _means(self, sums: list[float], prefix: str) -> dict[str, float]:
        *values, n, tokens = sums
        return {f"{prefix}/{k}": v / max(tokens if k in TOKEN_STATS else n, 1) for k, v in zip(self.names, values)}

    def stats(self) -> dict[str, float]:
        """The train metrics since the last call, every rank's. Collective."""
        summed = self.strategy.data_sum(self._sums.to(self.strategy.device)).tolist()
        self._sums.zero_()
        return self._means(summed, "train")

    # -------------------------------------------------------------- eval
    def has_split(self, split: str) -> bool:
        return split == "eval" and bool(self.heldout)

    def _greedy(self, indices: list[int]) -> list[str]:
        """Greedy completions of held-out prompts, train.eval_batch_size at a time (left-padded)."""
        g, device, size, outs = self.g, self.strategy.device, self.cfg.train.eval_batch_size, []
        with torch.no_grad(), self.strategy.generating() as model:
            for k in range(0, len(indices), size):
                prompts = [self.heldout[i].ids for i in indices[k : k + size]]
                width = max(map(len, prompts))
                ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=g.max_new_tokens, do_sample=False, pad_token_id=self.pad,
                                     eos_token_id=self.eos, use_cache=True, synced_gpus=False,
                                     **({"stop_strings": list(g.stop), "tokenizer": self.tokenizer} if g.stop else {}))
                outs += list(out[:, width:].cpu())
        return [self.tokenizer.decode(o[completion_mask(o, self.eos, self.pad).bool()], skip_special_tokens=True) for o in outs]

    def evaluate(self, model, split: str) -> dict[str, float]:
        """Greedy completions of every held-out prompt (each rank its share) and their rewards. Collective."""
        s = self.strategy
        mine = [i for batch in shard_eval(len(self.heldout), s.dp_world, s.dp_rank, len(self.heldout)) for i in batch if i != PAD]
        texts = self._greedy(mine)
        scores = self.rewards.scores(texts, [self.heldout[i].record for i in mine]) if mine else None
        values = [sum(v) for v in scores.each.values()] if scores else [0.0] * len(self.rewards.names)
        sums = torch.tensor([*values, sum(scores.total) if scores else 0.0, float(len(mine))], dtype=torch.float64, device=s.device)
        *each, total, n = s.data_sum(sums).tolist()
        out = {f"{split}/reward": total / max(n, 1)}
        out.update({f"{split}/reward/{name}": v / max(n, 1) for name, v in zip(self.rewards.names, each)})
        return out

    def generations(self, model) -> list[list[str]]:
        """[prompt, completion, reward] of the first held-out prompts (every rank takes part; rank 0's rows)."""
        shown = list(range(min(4, len(self.heldout))))
        texts = self._greedy(shown)
        totals = self.rewards.scores(texts, [self.heldout[i].record for i in shown]).total if shown else []
        return [[self.heldout[i].text, t, f"{r:.3f}"] for i, t, r in zip(shown, texts, totals)]
