"""The only module that builds the Accelerator and knows about ranks.

`shardtune launch` (or `accelerate launch --config_file launch/<strategy>.yaml`)
sets the ACCELERATE_* environment; here it becomes an Accelerator whose
DeepSpeed plugin takes accumulation and clipping from the run config, so the
run config stays the single source of truth.
"""

from __future__ import annotations

import os
import re
import resource
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs, broadcast_object_list

from shardtune import ShardtuneError
from shardtune.config import Config


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def build_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not cuda:
        raise ShardtuneError("train.mixed_precision=fp16 needs a CUDA GPU (loss scaling is GPU-only); use bf16 or no on CPU.")
    if _env_flag("ACCELERATE_USE_FSDP") and not cuda:
        raise ShardtuneError("strategy fsdp needs CUDA GPUs (Accelerate runs FSDP only on GPUs); on CPU use zero3 to shard parameters.")
    deepspeed = _env_flag("ACCELERATE_USE_DEEPSPEED")
    pg = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.dist.timeout_minutes))
    if not cuda and deepspeed:
        pg.backend = "gloo"  # Accelerate only picks gloo itself for its plain CPU mode
    plugin = None
    if deepspeed:
        plugin = _deepspeed_plugin(cfg)
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        cpu=not cuda and not deepspeed,
        deepspeed_plugin=plugin,
        dynamo_backend="inductor" if cfg.model.compile else None,
        kwargs_handlers=[pg],
    )


def _deepspeed_plugin(cfg: Config) -> DeepSpeedPlugin:
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path:
        raise ShardtuneError("DeepSpeed is on but no DeepSpeed config file is set; launch with `shardtune launch CONFIG --strategy zero2`.")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ShardtuneError("this strategy needs DeepSpeed; `pip install deepspeed` (or choose ddp, fsdp or cpu).") from None
    plugin = DeepSpeedPlugin(
        hf_ds_config=path,
        gradient_accumulation_steps=cfg.train.grad_accum,
        gradient_clipping=cfg.optim.max_grad_norm or 0.0,  # 0 = no clipping for DeepSpeed
        zero3_init_flag=_env_flag("ACCELERATE_DEEPSPEED_ZERO3_INIT"),
    )
    # the loop prepares data loaders on their own, so Accelerate cannot read the micro-batch off them
    if plugin.deepspeed_config.get("train_micro_batch_size_per_gpu") == "auto":
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    return plugin


def strategy_name(acc: Accelerator) -> str:
    if acc.distributed_type == DistributedType.DEEPSPEED:
        zero = acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        offload = zero.get("offload_optimizer", {}).get("device", "none") != "none"
        return f"zero{zero.get('stage', 0)}" + ("_offload" if offload else "")
    return str(acc.distributed_type).split(".")[-1].lower()


def _zero3(acc: Accelerator) -> bool:
    if acc.distributed_type != DistributedType.DEEPSPEED:
        return False
    return acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3


def _load_into(model, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if unexpected or set(missing) - tied:
        raise ShardtuneError(
            f"the saved weights do not fit this model (missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}); "
            "they come from another model: point at a checkpoint of this run's model."
        )


def load_weights(acc: Accelerator, model, folder: Path) -> None:
    """Load an exported HF folder (plain, merged LoRA or adapter) into the live, possibly partitioned model. Collective."""
    from shardtune.models import read_exported_state

    unwrapped = acc.unwrap_model(model)
    load_state(acc, model, lambda: read_exported_state(folder, unwrapped))


def load_state(acc: Accelerator, model, read) -> None:
    """Load `read()` (a full state dict, model key names) into the live model; under ZeRO-3 only the main rank reads. Collective."""
    unwrapped = acc.unwrap_model(model)
    if _zero3(acc):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(unwrapped.parameters()), modifier_rank=0):
            if acc.is_main_process:
                _load_into(unwrapped, read())
    else:
        _load_into(unwrapped, read())


def leave(code: int) -> int:
    """End a launched (multi-process) run without interpreter finalization.

    Gloo's worker threads can still hold tensors when Python tears down, and
    the process then aborts ("terminate called without an active exception",
    pytorch/pytorch#179291) after all work is done and saved, turning a
    finished run into a failed one. So: destroy the process group while the
    interpreter is whole, flush, and exit at once. Single-process runs return.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return code
    import sys

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


PEER_FAILURES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
                 "Watchdog caught collective operation timeout")


def lost_a_rank(exc: BaseException) -> str | None:
    """One sentence when a collective failed because another rank died or stalled (the job's failure, not a bug here)."""
    if not any(text in str(exc) for text in PEER_FAILURES):
        return None
    what = re.sub(r"^\[[^\]]*\] ", "", str(exc).splitlines()[0]).split(". ")[0][:160]  # gloo prefixes a source path
    return (f"rank {os.environ.get('RANK', '0')} lost another rank ({what}): it died or stalled past dist.timeout_minutes; "
            "the job stops here, rerun it to resume from the last checkpoint.")


def all_flags(acc: Accelerator):
    """sync(has) -> every rank's flag: how ranks agree to stop on an uneven stream."""

    def sync(has: bool) -> list[bool]:
        if acc.num_processes == 1:
            return [has]
        flags = acc.gather(torch.tensor([int(has)], device=acc.device))
        return [bool(f) for f in flags.tolist()]

    return sync


def gather_objects(acc: Accelerator, obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank."""
    if acc.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def from_main(acc: Accelerator, value: Any) -> Any:
    """The main process's `value`, on every process."""
    if acc.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the ZeRO-3 partition or the FSDP2 DTensor shard."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor
    return t.to_local() if hasattr(t, "to_local") else t


def state_bytes(acc: Accelerator, model: torch.nn.Module, optimizer) -> dict[str, list[int]]:
    """Live parameter and optimizer-state bytes, and peak RSS, of each rank (lists over ranks). Collective."""
    params = _bytes(_local(p) for p in model.parameters())
    base = optimizer
    while hasattr(base, "optimizer"):  # Accelerate wrapper -> (ZeRO optimizer ->) the torch optimizer
        base = base.optimizer
    opt = _bytes(v for state in base.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    mine = torch.tensor([params, opt, rss], dtype=torch.float64, device=acc.device)
    every = acc.gather(mine[None]).tolist()
    keys = ["param_bytes", "optim_state_bytes", "peak_rss_bytes"]
    return {k: [int(r[i]) for r in every] for i, k in enumerate(keys)}
