"""FSDP2: torch's `fully_shard` per transformer block and at the root, as torchtitan applies it.

Why not Accelerate's FSDP path: it refuses CPU process groups, and this one code path runs on GPUs (NCCL)
and on CPUs (gloo) alike, so the suite tests the FSDP2 that users run. Accelerate is not involved here;
the process group is torch's own.

- Blocks: the modules whose class the model lists in `_no_split_modules` (BertLayer, LlamaDecoderLayer,
  ...); the root group holds the rest (embeddings, final norm, head: tied weights stay in one group).
- Mixed precision: `MixedPrecisionPolicy` -- parameters all-gathered in bf16 for compute, gradients
  reduced in fp32; the sharded fp32 parameters are what the optimizer steps. fp16 is refused (no grad
  scaler here).
- Gradients are reduce-scattered (averaged over ranks) in every micro-batch's backward; clipping gives
  a DTensor norm, turned into a plain tensor.
- Checkpoints: DCP (distributed/dcp.py), resharded on load, interchangeable with DDP's.
- The mesh (`dist.mesh`, mesh.py; distributed/parallel.py): FSDP2 shards over the data-parallel axes (with
  dp_replicate > 1 a 2-D mesh: HSDP, sharded within a replica and all-reduced across), after tensor
  parallelism (`parallelize_module`) split each block's matmuls over the tp axis and, with sp, DeepSpeed's
  Ulysses attention splits sequences. Gradients are averaged over the ranks whose tokens differ (dp x sp),
  so `backward` scales by their number, and sums of tokens and metrics run over them only (`data_sum`).
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from shardtune import ShardtuneError
from shardtune.config import Config
from shardtune.mesh import check_run, resolve
from shardtune.distributed import comm, dcp, parallel
from shardtune.distributed.base import Strategy, load_into_dcp_strategy, read_on_main
from shardtune.optim import build_optimizer


def _init_process_group(cfg: Config) -> torch.device:
    comm.ensure_process_env()
    cuda = torch.cuda.is_available()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=cfg.dist.timeout_minutes))
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def block_classes(model: torch.nn.Module) -> set[str]:
    """The transformer-block classes to shard one by one (HF models name them in `_no_split_modules`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    names = set(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise ShardtuneError(f"{type(base).__name__} names no transformer blocks (_no_split_modules), so FSDP2 cannot shard it per block; use zero3.")
    return names


class FSDPStrategy(Strategy):
    family = "dcp"
    shards_parameters = True

    def __init__(self, cfg: Config, name: str = "fsdp"):
        super().__init__(cfg, name)  # distributed.check_launch refused fp16 (no grad scaler here) before building this
        self.mixed_precision = cfg.train.mixed_precision
        self.device = _init_process_group(cfg)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.mesh = resolve(cfg.dist.mesh, self.world, name, per_node if torch.cuda.is_available() else None)
        self.meshes = parallel.build_device_mesh(self.mesh, self.device.type)

    def _policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.mixed_precision == "bf16":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def prepare(self, model: torch.nn.Module) -> None:
        check_run(self.mesh, model.config, self.cfg)  # the mesh against this model and task (`shardtune launch` checked it too)
        model.to(self.device)
        if self.meshes.tp is not None:
            parallel.apply_tensor_parallel(model, self.meshes.tp)
        if self.mesh.sp > 1:
            parallel.apply_sequence_parallel(model, self.mesh, self.meshes.sp_group)
        blocks = block_classes(model)
        for module in list(model.modules()):
            if type(module).__name__ in blocks:
                if self.cfg.model.compile:
                    module.compile()
                self._shard(module)
        self._shard(model)
        if hasattr(model, "generate"):  # a rollout calls the root's generate, not its forward (PeftModel.generate skips its
            from torch.distributed.fsdp import register_fsdp_forward_method  # forward): the root's hooks must run first

            register_fsdp_forward_method(model, "generate")
        self.model = model
        self.optimizer = build_optimizer(model, self.cfg.optim)  # over the sharded DTensor parameters

    def _shard(self, module: torch.nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(module, mesh=self.meshes.fsdp, mp_policy=self._policy(), reshard_after_forward=True)

    def unwrapped(self) -> torch.nn.Module:
        return self.model

    def data_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.meshes.batch_group is None:
            return comm.all_reduce_sum(t)
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.meshes.batch_group)
        return out

    def split_batch(self, batch: dict) -> dict:
        if self.mesh.seq == 1:
            return batch
        return parallel.split_sequence(batch, self.mesh.seq_rank(self.rank), self.mesh.seq)

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.mesh.batch).backward()  # FSDP2 averages the reduce-scattered gradients over the dp x sp ranks

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        return parallel.grad_norm_and_clip(list(self.model.parameters()), max_norm or math.inf)

    def optimizer_step(self, skip: bool) -> bool:
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return not skip

    def _torch_optimizer(self):
        return self.optimizer

    def _whole_parameters(self):
        from shardtune.distributed.rollout import fsdp_unsharded

        return fsdp_unsharded(self.model)

    def _resharded(self) -> None:
        """State-dict code wants every parameter as its DTensor shard: a module that did not reshard after its last
        forward (an eval forward has no backward to do it) is resharded first."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def save(self, ckpt: Path) -> list[Path]:
        self._resharded()
        return dcp.save(self.model, self.optimizer, ckpt)

    def save_async(self, ckpt: Path):
        from shardtune.distributed.base import _files_when_done

        self._resharded()
        return _files_when_done(dcp.save_async(self.model, self.optimizer, ckpt), ckpt)

    def load(self, ckpt: Path, saved_strategy: str, saved_world: int, scratch: Path) -> str | None:
        self._resharded()
        return load_into_dcp_strategy(self, ckpt, saved_strategy)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        self._resharded()
        return dcp.full_model_state(self.model)

    def load_full_state_dict(self, read: Callable[[], dict[str, torch.Tensor]], partial: bool = False) -> None:
        self._resharded()
        dcp.load_full_model_state(self.model, read_on_main(self, read, partial), partial)
