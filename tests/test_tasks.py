"""The Task protocol holds for every registered task, and the Trainer knows no task by name."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import ROOT, lm_overrides, tiny_overrides
from shardtune.config import TASK_SPECS, load_config
from shardtune.tasks import Task, build_task, task_classes


def _config(name, tiny_bert, tiny_lm_tokenizer, lm_corpus, tmp_path):
    if name == "classification":
        over = tiny_overrides(tiny_bert, tmp_path, **{"train.batch_size": 4})
    elif name == "dpo":
        over = lm_overrides(tiny_lm_tokenizer, lm_corpus, tmp_path, **{"task": "dpo", "data.sources": None, "data.seq_len": None,
                                                                       "data.holdout": None, "train.metric_for_best": None})
        over = [o for o in over if not o.endswith("=None")] + [
            f"data.train_file={ROOT / 'data/pydocs-faq-dpo.jsonl'}", "data.max_examples=12", "data.dpo.max_length=512",
            "data.dpo.too_long=truncate", "model.lora={r: 4}", "train.batch_size=2", "train.eval_batch_size=2",
        ]
    elif name == "grpo":
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"{a} plus {a} is", "answer": str(2 * a)}) + "\n" for a in range(10)))
        over = tiny_overrides(tiny_lm_tokenizer, tmp_path, **{"task": "grpo", "model.max_length": None, "data.max_examples": None})
        over = [o for o in over if not o.endswith("=None") and not o.startswith("train.eval_every")] + [
            f"data.train_file={prompts}", "model.init=scratch", "model.preset=tiny", "data.grpo.max_new_tokens=4", "train.batch_size=2",
        ]
    else:
        over = lm_overrides(tiny_lm_tokenizer, lm_corpus, tmp_path, **{"task": name})
        if name == "sft":
            over = [o for o in over if not o.startswith("data.sources=")] + [f"data.sources=[{{path: {ROOT / 'data/pydocs-faq-sft.jsonl'}}}]",
                                                                             "data.seq_len=256", "data.holdout=8"]
    return load_config(None, over)


@pytest.mark.parametrize("name", sorted(task_classes()))
def test_every_task_satisfies_the_protocol(name, tiny_bert, tiny_lm_tokenizer, lm_corpus, tmp_path):
    from shardtune.distributed import build_strategy
    from shardtune.models import load_tokenizer

    cfg = _config(name, tiny_bert, tiny_lm_tokenizer, lm_corpus, tmp_path)
    assert cfg.task == name and isinstance(cfg.data, TASK_SPECS[name].data)
    strategy = build_strategy(cfg)
    task = build_task(cfg, strategy, load_tokenizer(cfg.model))
    assert isinstance(task, Task) and task.spec is TASK_SPECS[name]
    assert task.total_steps() > 0 and task.seq_len() > 0 and task.describe()
    strategy.prepare(task.model)
    batch = next(iter(task.batches()))
    sizes = task.sizes(batch)
    total, count = task.loss(strategy.model, batch)
    assert total.requires_grad and torch.isfinite(total) and int(count) == int(sizes.weight) > 0  # weighted by what sizes says
    assert int(sizes.samples) > 0 and int(sizes.tokens) > 0
    state = task.state_dict(task.position())
    assert json.loads(json.dumps(state)) == state  # JSON, for trainer_state.json
    metrics = task.evaluate(strategy.model, "eval")
    assert set(TASK_SPECS[name].metrics) <= set(metrics), (name, sorted(metrics))  # what metric_for_best may name is logged
    assert all(k.startswith("eval/") for k in metrics) and all(isinstance(v, float) for v in metrics.values())
    assert isinstance(task.stats(), dict) and isinstance(task.generations(strategy.model), list)
    strategy.end()


def test_the_trainer_names_no_task():
    """Adding a task is its module and its config model: the Trainer, resume and state code have no task branch."""
    names = "|".join(TASK_SPECS)
    for module in ("trainer.py", "resume.py", "state.py", "checkpoint.py", "guard.py", "perf.py"):
        text = (ROOT / "src" / "shardtune" / module).read_text()
        assert not re.search(rf"['\"]({names})['\"]", text), module
