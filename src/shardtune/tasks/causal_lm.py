"""Causal-LM pretraining / continued pretraining, and SFT: a streamed, packed data stage; loss per label token.

The train stream is read per rank with no collective (data/stream.py): this rank's batches until it runs
out, after which the Trainer's per-step agreement stops every rank. The training and eval forwards pass
`use_cache=False`: a causal LM builds a KV cache otherwise, and with one, transformers ignores the
per-document mask that `position_ids` imply (data.doc_positions).
"""

from __future__ import annotations

import math
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F

from shardtune import ShardtuneError
from shardtune.config import TASK_SPECS, Config
from shardtune.metrics import IGNORE
from shardtune.tasks import Sizes


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}


def next_token_loss(model, batch: dict, z_loss: float = 0.0, head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross entropy over the label tokens (+ z-loss, PaLM: z_loss x logsumexp^2 per token), count).
    With `head` (losses.ChunkedLMHead) the loss is computed inside the head's forward, in chunks: the batch's logits
    never exist whole; without, from the model's full logits. A sequence-parallel chunk carries `shift_labels`
    (each position's own target, shifted on the whole sequence) instead of `labels`."""
    shifted = "shift_labels" in batch
    labels = batch["shift_labels"] if shifted else batch["labels"]
    if head is not None:
        with head.loss_for(labels, z_loss=z_loss, shifted=shifted) as lm:
            out = model(**_inputs(batch), use_cache=False)
        return lm.result(out)
    logits = model(**_inputs(batch), use_cache=False).logits.float()
    logits, labels = (logits, labels) if shifted else (logits[:, :-1], labels[:, 1:])
    total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    if z_loss:
        total = total + z_loss * (torch.logsumexp(logits, dim=-1).pow(2) * (labels != IGNORE)).sum()
    return total, (labels != IGNORE).sum()


class CausalLMTask:
    spec: ClassVar = TASK_SPECS["causal_lm"]

    def __init__(self, cfg: Config, strategy, tokenizer):
        from shardtune.models import check_positions, load_causal_lm

        if not cfg.train.max_steps:
            raise ShardtuneError(f"{cfg.task} reads a stream of unknown length; set train.max_steps.")
        self.cfg, self.strategy, self.tokenizer = cfg, strategy, tokenizer
        self.model = load_causal_lm(cfg.model, tokenizer)
        check_positions(self.model, cfg)
        self.head = None
        if cfg.model.chunked_loss:  # before the strategy wraps the model: its hooks must see the new head
            from shardtune.losses import install_chunked_head

            self.head = install_chunked_head(self.model)
        self.saved: list[dict] | None = None
        self.loader = None
        self.labels = None

    def describe(self) -> str:
        d = self.cfg.data
        return f"{len(d.sources)} source(s), {d.seq_len}-token packed sequences"

    def seq_len(self) -> int:
        return self.cfg.data.seq_len

    def total_steps(self) -> int:
        return self.cfg.train.max_steps

    def _loader(self, split: str, state: list[dict] | None = None, sync=None):
        from shardtune.data.stream import StreamLoader

        s, t = self.strategy, self.cfg.train
        return StreamLoader(
            self.cfg.data, self.tokenizer, split=split, rank=s.dp_rank, world_size=s.dp_world, num_workers=self.cfg.data.num_workers,
            batch_size=t.batch_size if split == "train" else t.eval_batch_size, state=state, sync=sync,
        )

    def batches(self) -> Iterator[dict]:
        self.loader = self._loader("train", self.saved)
        for batch in self.loader:
            batch.pop("doc_ids", None)
            yield {k: v.to(self.strategy.device) for k, v in batch.items()}

    def sizes(self, batch: dict) -> Sizes:
        chunk = "shift_labels" in batch  # a sequence-parallel chunk (distributed/parallel.split_sequence): labels shifted
        labelled = batch["shift_labels"] != IGNORE if chunk else batch["labels"][:, 1:] != IGNORE
        tokens = batch["attention_mask"].sum() if "attention_mask" in batch else (batch["shift_labels" if chunk else "labels"] != IGNORE).sum()
        samples = batch["samples"] if chunk else labelled.any(-1).sum()  # a chunk's rows are counted by its group's first rank
        return Sizes(weight=labelled.sum(), samples=samples, tokens=tokens)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return next_token_loss(model, batch, self.cfg.train.z_loss, self.head)

    def position(self):
        return self.loader.snapshot() if self.loader is not None else None

    def state_dict(self, position) -> dict:
        return self.loader.state_dict(position) if self.loader is not None else {}

    def load_state_dict(self, states: list[dict]) -> None:
        self.saved = [s for s in states if s] or None

    @torch.no_grad()
    def generations(self, model) -> list[list[str]]:
        """Greedy completions of train.eval_prompts (every rank takes part: sharded forwards are collectives)."""
        unwrapped = self.strategy.unwrapped()
        was = unwrapped.training
        unwrapped.eval()
        rows = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        synced = self.strategy.shards_parameters and self.strategy.world > 1
        for prompt in self.cfg.train.eval_prompts:
            ids = self.tokenizer(prompt, return_tensors="pt").to(self.strategy.device)
            out = unwrapped.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=pad, synced_gpus=synced)
            rows.append([prompt, self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)])
        unwrapped.train(was)
        return rows

    def stats(self) -> dict[str, float]:
        return self.loader.stats() if self.loader is not None else {}

    def has_split(self, split: str) -> bool:
        d = self.cfg.data
        return split == "eval" and bool(d.validation_sources or d.holdout)

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict[str, float]:
        """Token-weighted loss over the whole validation stream (every rank's part) and its perplexity."""
        s = self.strategy
        was = model.training
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=s.device)
        sync = (lambda has: [bool(f) for f in s.gather_objects(has)]) if s.world > 1 else None
        cap = self.cfg.train.eval_batches  # over all data-parallel ranks: every rank runs ceil(cap / dp) forwards, cap count
        for i, batch in enumerate(self._loader("validation", sync=sync)):
            if cap and i >= math.ceil(cap / s.dp_world):
                break
            batch = s.split_batch({k: v.to(s.device) for k, v in batch.items() if k != "doc_ids"})
            total, count = next_token_loss(model, batch, head=self.head)  # an all-padding batch (a rank that ran out) counts nothing
            counted = not cap or i * s.dp_world + s.dp_rank < cap  # a forward past the cap still runs: it is collective
            sums += torch.stack([total.double(), count.double()]) * counted
        model.train(was)
        loss_sum, count = s.data_sum(sums).tolist()
        loss = loss_sum / max(count, 1)
        return {f"{split}/loss": loss, f"{split}/perplexity": math.exp(min(loss, 50)), f"{split}/tokens": count}


class SFTTask(CausalLMTask):
    """Supervised fine-tuning: the causal-LM task over a stream of chat / prompt-response examples
    (data/sft.py), whole examples packed per row, loss on response tokens only."""

    spec: ClassVar = TASK_SPECS["sft"]

    def describe(self) -> str:
        d = self.cfg.data
        how = "chat template" if getattr(self.tokenizer, "chat_template", None) else "plain instruction template"
        return f"{len(d.sources)} SFT source(s), {how}, whole examples packed into {d.seq_len}-token sequences, loss on responses"
