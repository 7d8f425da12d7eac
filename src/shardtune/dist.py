"""The only module that builds the Accelerator and knows about ranks."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from shardtune import ShardtuneError
from shardtune.config import TrainConfig


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ShardtuneError("train.mixed_precision=fp16 needs a CUDA GPU (loss scaling is GPU-only); use bf16 or no on CPU.")
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)


def from_main(acc: Accelerator, value: Any) -> Any:
    """The main process's `value`, on every process."""
    if acc.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]
