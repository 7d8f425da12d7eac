"""Optimizer and LR schedule."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from shardtune.config import OptimConfig


def decays(module: torch.nn.Module, name: str) -> bool:
    """The HF Trainer's rule, by names and module types, never by tensor shapes (ZeRO-3 and FSDP2 partition
    parameters into 1-D or empty tensors): no decay on biases and on the weights of normalization layers."""
    if name == "bias" or name.endswith("_bias"):
        return False
    return "norm" not in type(module).__name__.lower()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weights, none on biases and normalization weights (see `decays`)."""
    decay, no_decay, seen = [], [], set()
    for _, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:  # tied weights once
                continue
            seen.add(id(p))
            (decay if decays(module, name) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    # The fused kernel: without it torch falls back to a per-parameter Python loop on CPU,
    # as slow as the forward pass for small models (bench/step_overhead.py).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps), num_training_steps=total_steps)
