"""The strategy layer: the only code that knows DDP, DeepSpeed ZeRO and FSDP2 specifics.

`build_strategy(cfg)` returns one object per backend (base.PlainStrategy, zero.ZeroStrategy,
fsdp.FSDPStrategy) behind the interface of base.Strategy. Which one runs:

1. the launch's environment when it names a backend (`accelerate launch --config_file launch/zero2.yaml`
   sets ACCELERATE_USE_DEEPSPEED and the DeepSpeed JSON; launch/fsdp.yaml sets ACCELERATE_USE_FSDP);
2. else `dist.strategy` from the config (`shardtune launch --strategy S` passes dist.strategy=S, so
   `shardtune train` of a config with dist.strategy: zero2 runs ZeRO-2 in one process too);
3. else DDP over the launched processes (gloo on CPU, NCCL on GPUs), or one process.
"""

from __future__ import annotations

import json
import os

import torch

from shardtune import ShardtuneError
from shardtune.config import Config
from shardtune.distributed.base import Strategy

__all__ = ["Strategy", "build_strategy", "checkpoint_weights", "resolve_name", "ZERO", "family_of"]

ZERO = ("zero1", "zero2", "zero3", "zero3_offload")


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def _zero_name_from_json(path: str) -> str:
    try:
        zero = json.loads(open(path).read()).get("zero_optimization", {})
    except (OSError, ValueError) as exc:
        raise ShardtuneError(f"the DeepSpeed config {path} cannot be read ({type(exc).__name__}); pass a valid JSON file.") from None
    offload = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    return f"zero{zero.get('stage', 0)}" + ("_offload" if offload else "")


def resolve_name(cfg: Config) -> str:
    """The strategy this process runs (see the module docstring)."""
    from_env = None
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if not path:
            raise ShardtuneError("DeepSpeed is on but no DeepSpeed config file is set; launch with `shardtune launch CONFIG --strategy zero2`.")
        from_env = _zero_name_from_json(path)
    elif _flag("ACCELERATE_USE_FSDP"):
        from_env = "fsdp"
    wanted = cfg.dist.strategy if cfg.dist.strategy not in (None, "auto") else None
    if from_env and wanted and from_env != wanted:
        raise ShardtuneError(f"the launch runs {from_env} but the config says dist.strategy={wanted}; launch with --strategy {wanted} or drop dist.strategy.")
    name = from_env or wanted
    if name is None:
        cuda = torch.cuda.is_available()
        many = int(os.environ.get("WORLD_SIZE", "1")) > 1
        name = ("ddp" if many else "single_gpu") if cuda else "cpu"
    return name


def checkpoint_weights(ckpt) -> dict[str, torch.Tensor]:
    """The whole model's weights from a checkpoint folder of any strategy, in one process (export, resume elsewhere)."""
    from pathlib import Path

    from shardtune.distributed import dcp, zero_files

    if (Path(ckpt) / zero_files.FOLDER).is_dir():
        return zero_files.consolidated_weights(ckpt)
    if dcp.has(ckpt):
        return dcp.read_model(ckpt)
    raise ShardtuneError(f"{ckpt} holds no model weights (dcp/ or zero/); pass a checkpoint folder written by shardtune train.")


def family_of(name: str) -> str:
    """Checkpoint format of a strategy name: "zero" or "dcp"."""
    return "zero" if name in ZERO else "dcp"


def resolved_precision(cfg: Config) -> tuple[Config, str]:
    """train.mixed_precision: auto -> bf16 or no for this process's device (hardware.py), and why."""
    from shardtune.hardware import resolve_mixed_precision

    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    choice, why = resolve_mixed_precision(cfg.train.mixed_precision, device)
    if choice != cfg.train.mixed_precision:
        cfg = cfg.model_copy(deep=True)
        cfg.train.mixed_precision = choice
    return cfg, why


def build_strategy(cfg: Config) -> Strategy:
    """The strategy this process runs; its `cfg` is `cfg` with train.mixed_precision resolved (auto -> bf16 or no)."""
    cfg, why = resolved_precision(cfg)
    strategy = _build(cfg)
    strategy.precision_note = why
    return strategy


def check_launch(cfg: Config, name: str, world: int, cuda: bool, per_node: int | None = None) -> None:
    """What every rank would refuse before building anything, said once by the launching process (no model needed)."""
    from shardtune.mesh import resolve

    if name in ("single_gpu", "ddp") and not cuda:
        raise ShardtuneError(f"strategy {name} needs CUDA GPUs; on CPU use cpu (DDP over gloo), zero1/2/3, zero3_offload or fsdp.")
    if cfg.train.mixed_precision == "fp16" and not cuda:
        raise ShardtuneError("train.mixed_precision=fp16 needs a CUDA GPU (loss scaling is GPU-only); use bf16 or no on CPU.")
    if name == "fsdp" and cfg.train.mixed_precision == "fp16":
        raise ShardtuneError("strategy fsdp runs bf16 or fp32 (it has no fp16 grad scaler); set train.mixed_precision=bf16 or no.")
    resolve(cfg.dist.mesh, world, name, per_node if cuda else None)


def _build(cfg: Config) -> Strategy:
    name = resolve_name(cfg)
    check_launch(cfg, name, int(os.environ.get("WORLD_SIZE", "1")), torch.cuda.is_available(), int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None)
    if name in ZERO:
        from shardtune.distributed.zero import ZeroStrategy

        return ZeroStrategy(cfg, name)
    if name == "fsdp":
        from shardtune.distributed.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, name)
    from shardtune.distributed.base import PlainStrategy

    return PlainStrategy(cfg, name)
