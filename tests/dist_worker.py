"""Run under `accelerate launch --num_processes 2`: which examples does each rank see per micro-batch?

Writes {"steps": [[rank0 texts], [rank1 texts]] per micro-batch} to the path in argv[2].
"""

import json
import sys

from shardtune.config import load_config
from shardtune.distributed import build_strategy
from shardtune.distributed.comm import leave
from shardtune.models import load_tokenizer
from shardtune.tasks import build_task

cfg = load_config(sys.argv[1], sys.argv[3:])
strategy = build_strategy(cfg)
tokenizer = load_tokenizer(cfg.model)
task = build_task(cfg, strategy, tokenizer)
steps, batches = [], task.batches()
for _ in range(task.total_steps() * cfg.train.grad_accum):
    batch = next(batches)
    real = batch["labels"] != -100  # padding rows of the epoch's last step carry no label
    texts = tokenizer.batch_decode(batch["input_ids"][real], skip_special_tokens=True)
    steps.append(strategy.gather_objects(texts))
if strategy.is_main:
    with open(sys.argv[2], "w") as f:
        json.dump({"steps": steps, "world": strategy.world}, f)
strategy.end()
leave(0)
