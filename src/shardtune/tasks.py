"""What differs between tasks, behind one small interface the loop uses:

    task.model                      the model to train (before accelerate.prepare)
    task.batches()                  micro-batches for this rank, from the saved position on
    task.data_state() / restore()   the position of the data, saved with every checkpoint
    task.evaluate(acc, model, split) -> {"eval/...": value}
    task.total_steps(acc)           optimizer steps of the run

Classification holds its (small) data in memory and reshuffles each epoch
with seed + epoch, so its position is (epoch, samples consumed). Causal LM
reads a stream whose position is the StreamLoader's state.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch

from shardtune import ShardtuneError
from shardtune.config import Config
from shardtune.data.classification import Encoded, load_splits, make_loader
from shardtune.metrics import evaluate as evaluate_classifier


class ClassificationTask:
    def __init__(self, cfg: Config, acc, tokenizer):
        from shardtune.models import load_classifier

        self.cfg, self.acc = cfg, acc
        self.splits = load_splits(cfg.data)
        self.labels = self.splits.labels
        label2id = {lab: i for i, lab in enumerate(self.labels)}
        self.model = load_classifier(cfg.model, self.labels)
        encode = lambda exs: Encoded(exs, tokenizer, label2id, cfg.model.max_length)  # noqa: E731
        self.tokenizer = tokenizer
        self.train_set = encode(self.splits.train)
        self.eval_loaders = {
            split: acc.prepare(make_loader(encode(exs), tokenizer, cfg.train.eval_batch_size, False, 0, cfg.data.num_workers))
            for split, exs in [("eval", self.splits.validation), ("test", self.splits.test)]
            if exs
        }
        self.position = {"epoch": 0, "samples": 0}
        if len(self.train_set) < acc.num_processes:
            raise ShardtuneError(
                f"{acc.num_processes} processes but only {len(self.train_set)} training examples: some ranks would have no data; "
                "use fewer processes or more data."
            )

    def describe(self) -> str:
        s = self.splits
        return f"{len(s.train)} train / {len(s.validation)} eval / {len(s.test)} test examples, {len(self.labels)} labels"

    def _global_batch(self) -> int:
        return self.cfg.train.batch_size * self.acc.num_processes

    def seq_len(self) -> int:
        return self.cfg.model.max_length

    def total_steps(self) -> int:
        batches = math.ceil(len(self.train_set) / self._global_batch())  # per rank, ranks padded to equal
        per_epoch = math.ceil(batches / self.cfg.train.grad_accum)
        return self.cfg.train.max_steps or math.ceil(self.cfg.train.epochs * per_epoch)

    def batches(self) -> Iterator[dict]:
        """Endless epochs, each a fresh seeded permutation, starting at the saved position."""
        n = len(self.train_set)
        epoch, start = self.position["epoch"], self.position["samples"]
        while True:
            gen = torch.Generator().manual_seed(self.cfg.train.seed + epoch)
            order = torch.randperm(n, generator=gen)[start:].tolist()
            subset = torch.utils.data.Subset(self.train_set, order)
            loader = make_loader(subset, self.tokenizer, self.cfg.train.batch_size, False, 0, self.cfg.data.num_workers)
            for i, batch in enumerate(self.acc.prepare(loader)):
                self.position = {"epoch": epoch, "samples": min(n, start + (i + 1) * self._global_batch())}
                yield batch
            epoch, start = epoch + 1, 0
            self.position = {"epoch": epoch, "samples": 0}

    def data_state(self) -> dict:
        return dict(self.position)

    def restore(self, state: dict) -> None:
        self.position = dict(state)

    def has_split(self, split: str) -> bool:
        return split in self.eval_loaders

    def stats(self) -> dict[str, float]:
        return {}

    def loss(self, out, batch) -> torch.Tensor:
        return out.loss

    def generations(self, model) -> list[list[str]]:
        return []

    def evaluate(self, model, split: str) -> dict[str, float]:
        return evaluate_classifier(self.acc, model, self.eval_loaders[split], len(self.labels), split)


class CausalLMTask:
    def __init__(self, cfg: Config, acc, tokenizer):
        from shardtune.dist import all_flags
        from shardtune.models import load_causal_lm

        if not cfg.train.max_steps:
            raise ShardtuneError("causal_lm reads a stream of unknown length; set train.max_steps.")
        self.cfg, self.acc, self.tokenizer = cfg, acc, tokenizer
        self.model = load_causal_lm(cfg.model, tokenizer)
        self.sync = all_flags(acc)
        self.state: dict | None = None
        self.loader = None
        self.labels = None

    def describe(self) -> str:
        d = self.cfg.data
        return f"{len(d.sources)} source(s), {d.seq_len}-token packed sequences"

    def seq_len(self) -> int:
        return self.cfg.data.seq_len

    def total_steps(self) -> int:
        return self.cfg.train.max_steps

    def _loader(self, split: str, state: dict | None = None, uneven: str | None = None):
        from shardtune.data.stream import StreamLoader

        return StreamLoader(
            self.cfg.data, self.tokenizer, split=split, rank=self.acc.process_index, world_size=self.acc.num_processes,
            num_workers=self.cfg.data.num_workers, batch_size=self.cfg.train.batch_size if split == "train" else self.cfg.train.eval_batch_size,
            state=state, sync=self.sync, uneven=uneven,
        )

    def batches(self) -> Iterator[dict]:
        self.loader = self._loader("train", self.state)
        for batch in self.loader:
            batch.pop("doc_ids", None)
            yield {k: v.to(self.acc.device) for k, v in batch.items()}

    def data_state(self) -> dict:
        from shardtune.data.stream import merge_states
        from shardtune.dist import gather_objects

        parts = gather_objects(self.acc, self.loader.state_dict() if self.loader else self.state)
        return merge_states(parts) if self.loader else self.state

    def restore(self, state: dict) -> None:
        self.state = state

    def loss(self, out, batch) -> torch.Tensor:
        """The model's next-token loss, plus z-loss (PaLM) when train.z_loss > 0: keeps the softmax normalizer near 1."""
        z_loss = self.cfg.train.z_loss
        if not z_loss:
            return out.loss
        mask = batch["labels"][:, 1:] != -100
        z = torch.logsumexp(out.logits[:, :-1].float(), dim=-1)
        return out.loss + z_loss * (z.pow(2) * mask).sum() / mask.sum().clamp(min=1)

    @torch.no_grad()
    def generations(self, model) -> list[list[str]]:
        """Greedy completions of train.eval_prompts (every rank takes part: ZeRO-3 gathers weights in forward)."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        unwrapped = self.acc.unwrap_model(model)
        was = unwrapped.training
        unwrapped.eval()
        rows = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for prompt in self.cfg.train.eval_prompts:
            ids = self.tokenizer(prompt, return_tensors="pt").to(self.acc.device)
            out = unwrapped.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=pad, synced_gpus=is_deepspeed_zero3_enabled())
            rows.append([prompt, self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)])
        unwrapped.train(was)
        return rows

    def stats(self) -> dict[str, float]:
        """The stream's counts so far (documents, tokens, drops by reason, packing efficiency), summed over ranks. Collective."""
        from shardtune.dist import gather_objects

        total: dict[str, float] = {}
        for part in gather_objects(self.acc, self.loader.stats() if self.loader else {}):
            for key, value in part.items():
                if key != "data/packing_efficiency":
                    total[key] = total.get(key, 0) + value
        tokens, padding = total.get("data/tokens", 0), total.get("data/padding", 0)
        total["data/packing_efficiency"] = tokens / (tokens + padding) if tokens + padding else 0.0
        return total

    def has_split(self, split: str) -> bool:
        d = self.cfg.data
        return split == "eval" and bool(d.validation_sources or d.holdout)

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict[str, float]:
        """Token-weighted loss over the whole validation stream (every rank's part) and its perplexity."""
        was = model.training
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.acc.device)
        for i, batch in enumerate(self._loader("validation", uneven="pad")):
            if self.cfg.train.eval_batches and i >= self.cfg.train.eval_batches:
                break
            batch.pop("doc_ids", None)
            batch = {k: v.to(self.acc.device) for k, v in batch.items()}
            n = (batch["labels"][:, 1:] != -100).sum()
            if n == 0:  # an all-padding batch from a rank that ran out: forward anyway (collectives), count nothing
                model(**batch)
                continue
            sums += torch.stack([model(**batch).loss.double() * n, n.double()])
        model.train(was)
        loss_sum, count = self.acc.reduce(sums, reduction="sum").tolist()
        loss = loss_sum / max(count, 1)
        return {f"{split}/loss": loss, f"{split}/perplexity": math.exp(min(loss, 50)), f"{split}/tokens": count}


class SFTTask(CausalLMTask):
    """Supervised fine-tuning: the causal-LM task over a stream of chat / prompt-response examples
    (data/sft.py), whole examples packed per row, loss on response tokens only."""

    def __init__(self, cfg: Config, acc, tokenizer):
        if not cfg.train.max_steps:
            raise ShardtuneError("sft reads a stream of unknown length; set train.max_steps.")
        super().__init__(cfg, acc, tokenizer)

    def describe(self) -> str:
        d = self.cfg.data
        how = "chat template" if getattr(self.tokenizer, "chat_template", None) else "plain instruction template"
        return f"{len(d.sources)} SFT source(s), {how}, whole examples packed into {d.seq_len}-token sequences, loss on responses"


TASKS: dict[str, Any] = {"classification": ClassificationTask, "causal_lm": CausalLMTask, "sft": SFTTask}


def build_task(cfg: Config, acc, tokenizer):
    return TASKS[cfg.task](cfg, acc, tokenizer)
