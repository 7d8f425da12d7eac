"""Preference tuning (DPO, Rafailov et al. 2023): preference pairs in memory, loss per pair.

Pairs are read whole and tokenized once (data/dpo.py), held out by seed, and batched like classification's
examples (data/batching.py: the same global batches on any layout; the epoch's last short step is padded with
unlabelled pairs, which count for nothing). A batch runs its chosen and rejected rows as ONE forward of 2B
rows, so DDP / ZeRO / FSDP2 see one forward per backward as for every other task.

The reference model:
- LoRA (a PEFT model): the same model with its adapters disabled (`disable_adapter()`), under no_grad: no
  second copy; the frozen base weights are the reference, and stay so across a resume.
- otherwise: a frozen copy of the starting weights (model.name_or_path), built unsharded on each rank, in
  eval mode: one more copy of the weights (no gradients, no optimizer state): for SmolLM2-135M in fp32
  about 0.54 GB, for a 1B model about 4 GB.
The reference forward runs in the model's current train/eval mode (as TRL's does): DPO configs keep model
dropout at 0.

Metrics: the loss is the mean over the step's pairs (the Trainer weights by `sizes().weight`, the pair count);
the rewards (beta x policy/reference log-ratio per side), their margin and accuracy (a tie counts 0.5) are
logged as train/rewards/* at every log step (summed over micro-batches and ranks, then divided) and as
eval/rewards/* on the held-out pairs.
"""

from __future__ import annotations

import math
from typing import ClassVar, Iterator

import torch
from torch.utils.data import DataLoader

from shardtune import ShardtuneError
from shardtune.config import TASK_SPECS, Config
from shardtune.data.batching import PAD, StepBatches, seeded_holdout, seeded_order, shard_eval
from shardtune.data.dpo import Pair, collate_pairs, encode_records
from shardtune.dpo_loss import METRICS, dpo_loss, reward_sums, sequence_logps
from shardtune.metrics import IGNORE
from shardtune.models import is_peft
from shardtune.tasks import EpochPosition, Sizes


def concat_pairs(batch: dict) -> dict:
    """The 2B-row model inputs: chosen rows then rejected rows -> input_ids, attention_mask, labels."""
    return {key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]]) for key in ("input_ids", "attention_mask", "labels")}


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] chosen and [B] rejected summed response log-probs under `model` (one forward; grads flow)."""
    rows = concat_pairs(batch)
    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], use_cache=False).logits
    return sequence_logps(logits, rows["labels"]).chunk(2)


def reference_logps(model, batch: dict, reference=None, peft_model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] chosen and [B] rejected reference log-probs, without grad: from `reference` (a frozen copy), else from
    `model` with the adapters of `peft_model` (the unwrapped PEFT model; default `model` itself) disabled."""
    with torch.no_grad():
        if reference is not None:
            return pair_logps(reference, batch)
        peft_model = peft_model if peft_model is not None else (model if is_peft(model) else None)
        if peft_model is None:
            raise ValueError("reference log-probs of a model without LoRA adapters need a frozen reference copy")
        with peft_model.disable_adapter():
            return pair_logps(model, batch)


def _read(spec: str, cfg: Config, tokenizer) -> tuple[list[Pair], dict]:
    from shardtune.data.records import open_records

    _, records = open_records(spec)
    d = cfg.data
    pairs, counts = encode_records(records, tokenizer, d.dpo, d.clean, special_ids_of(tokenizer))
    if not pairs:
        raise ShardtuneError(f"{spec} holds no usable preference pair ({counts}); give records with prompt, chosen and rejected.")
    return pairs, counts


def special_ids_of(tokenizer) -> int:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ShardtuneError("the tokenizer has no EOS or SEP token to end responses with; use a causal LM's tokenizer.")
    return eos


class _Pairs(torch.utils.data.Dataset):
    """Pairs by index; PAD gives pair 0 with no label (no loss, no count)."""

    def __init__(self, pairs: list[Pair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Pair:
        if i != PAD:
            return self.pairs[i]
        p = self.pairs[0]
        return Pair(p.chosen_ids, [IGNORE] * len(p.chosen_ids), p.rejected_ids, [IGNORE] * len(p.rejected_ids))


class DPOTask(EpochPosition):
    spec: ClassVar = TASK_SPECS["dpo"]
    data_name: ClassVar = "DPO"

    def __init__(self, cfg: Config, strategy, tokenizer):
        from shardtune.models import check_positions, load_causal_lm

        self.cfg, self.strategy, self.tokenizer, self.labels = cfg, strategy, tokenizer, None
        d = cfg.data
        pairs, self.counts = _read(d.train_file, cfg, tokenizer)
        pairs = pairs[: d.max_examples] if d.max_examples else pairs
        self.train, self.heldout = self._split(pairs)
        self.model = load_causal_lm(cfg.model, tokenizer)
        check_positions(self.model, cfg)
        self.reference = None if is_peft(self.model) else self._frozen_copy()
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else special_ids_of(tokenizer)
        t = cfg.train
        self.steps = StepBatches(len(self.train), seeded_order(len(self.train), t.seed), t.batch_size, strategy.dp_world, strategy.dp_rank, t.grad_accum)
        self._position = {"epoch": 0, "samples": 0}
        self._sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=strategy.device)

    def _split(self, pairs: list[Pair]) -> tuple[list[Pair], list[Pair]]:
        d = self.cfg.data
        if d.validation_file:
            return pairs, _read(d.validation_file, self.cfg, self.tokenizer)[0]
        return seeded_holdout(pairs, d.validation_fraction, d.split_seed)

    def _frozen_copy(self):
        from shardtune.distributed.init import unsharded_init
        from shardtune.models import load_causal_lm

        with unsharded_init():
            ref = load_causal_lm(self.cfg.model, self.tokenizer)
        return ref.requires_grad_(False).eval().to(self.strategy.device)

    def describe(self) -> str:
        dropped = sum(v for k, v in self.counts.items() if k.startswith("data/dropped/"))
        how = "adapters disabled" if self.reference is None else "a frozen copy"
        return f"{len(self.train)} train / {len(self.heldout)} held-out preference pairs ({dropped} dropped), reference: {how}"

    def seq_len(self) -> int:
        return self.cfg.data.dpo.max_length

    def total_steps(self) -> int:
        t = self.cfg.train
        return t.max_steps or math.ceil(t.epochs * self.steps.steps_per_epoch())

    def _loader(self, pairs: list[Pair], index_lists) -> DataLoader:
        from shardtune.data.workers import StopSafeLoader

        return StopSafeLoader(_Pairs(pairs), batch_sampler=index_lists, collate_fn=lambda b: collate_pairs(b, self.pad),
                              num_workers=self.cfg.data.num_workers, generator=torch.Generator().manual_seed(0))

    def batches(self) -> Iterator[dict]:
        epoch, start = self._position["epoch"], self._position["samples"]
        plan, positions = self.steps.micro_batches(epoch, start), self.steps.micro_batches(epoch, start)
        for batch, (_, ep, done) in zip(self._loader(self.train, (idx for idx, _, _ in plan)), positions):
            self._position = {"epoch": ep + 1, "samples": 0} if done >= len(self.train) else {"epoch": ep, "samples": done}
            yield {k: v.to(self.strategy.device) for k, v in batch.items()}

    def sizes(self, batch: dict) -> Sizes:
        real = (batch["chosen_labels"] != IGNORE).any(-1)
        tokens = (batch["chosen_attention_mask"].sum(-1) + batch["rejected_attention_mask"].sum(-1))[real].sum()
        return Sizes(weight=real.sum(), samples=real.sum(), tokens=tokens)

    def _pair_terms(self, model, batch: dict):
        real = (batch["chosen_labels"] != IGNORE).any(-1)
        policy = pair_logps(model, batch)
        ref = reference_logps(model, batch, self.reference, self.strategy.unwrapped() if self.reference is None else None)
        out = dpo_loss(policy[0][real], policy[1][real], ref[0][real], ref[1][real], self.cfg.data.dpo.beta)
        sums, pairs = reward_sums(out)
        return out.losses.sum(), torch.stack([*(sums[m] for m in METRICS), torch.tensor(float(pairs), device=out.losses.device)])

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        total, sums = self._pair_terms(model, batch)
        self._sums += sums.double()
        return total, sums[-1]

    def has_split(self, split: str) -> bool:
        return split == "eval" and bool(self.heldout)

    @staticmethod
    def _means(reduced: list[float], prefix: str) -> dict[str, float]:
        """[metric sums..., pairs] (summed over ranks) -> the metrics' means over the pairs."""
        *metric_sums, pairs = reduced
        return {f"{prefix}/{m}": v / max(pairs, 1) for m, v in zip(METRICS, metric_sums)}

    def stats(self) -> dict[str, float]:
        """train/rewards/* over the pairs since the last call, every rank's. Collective."""
        out, self._sums = self._means(self.strategy.data_sum(self._sums).tolist(), "train"), torch.zeros_like(self._sums)
        return out

    def generations(self, model) -> list[list[str]]:
        return []

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict[str, float]:
        """Loss and rewards over every held-out pair (every rank's share)."""
        s = self.strategy
        was = model.training
        model.eval()
        sums = torch.zeros(len(METRICS) + 2, dtype=torch.float64, device=s.device)
        for batch in self._loader(self.heldout, shard_eval(len(self.heldout), s.dp_world, s.dp_rank, self.cfg.train.eval_batch_size)):
            total, terms = self._pair_terms(model, {k: v.to(s.device) for k, v in batch.items()})
            sums += torch.cat([total.reshape(1), terms]).double()
        model.train(was)
        loss, *rest = s.data_sum(sums).tolist()
        return {f"{split}/loss": loss / max(rest[-1], 1), **self._means(rest, split)}
