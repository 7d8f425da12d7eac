"""Run under `accelerate launch --num_processes 2`: which examples does each rank see per step?

Writes {"steps": [[rank0 texts], [rank1 texts]] per micro-batch} to the path in argv[2].
"""

import json
import sys

from shardtune.config import load_config
from shardtune.dist import build_accelerator, gather_objects, leave
from shardtune.models import load_tokenizer
from shardtune.tasks import build_task

cfg = load_config(sys.argv[1], sys.argv[3:])
acc = build_accelerator(cfg)
tokenizer = load_tokenizer(cfg.model)
task = build_task(cfg, acc, tokenizer)
steps, batches = [], task.batches()
for _ in range(task.total_steps() * cfg.train.grad_accum):
    batch = next(batches)
    texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    steps.append(gather_objects(acc, texts))
if acc.is_main_process:
    with open(sys.argv[2], "w") as f:
        json.dump({"steps": steps, "world": acc.num_processes}, f)
acc.end_training()
leave(0)
