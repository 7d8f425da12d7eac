"""DeepSpeed ZeRO-1/2/3 and ZeRO-3 with CPU offload, through Accelerate's DeepSpeed plugin.

The engine is driven directly: the Trainer's loss is already its share of the step's global mean, so
`engine.backward(..., scale_wrt_gas=False)` (no division by the accumulation steps), the accumulation
boundary is set per micro-batch, and `engine.step()` runs after the per-step agreement. DeepSpeed skips
a non-finite update itself: ZeRO-3 always checks the grad norm; ZeRO-1/2 check it in fp32/fp16 and, in
bf16, because `bf16.check_grad_overflow` is true in launch/deepspeed/*.json (stated there, tested in
tests/test_strategies.py). The grad norm is known only after that step.

Checkpoints are DeepSpeed's own (per-rank shards under ckpt/zero/state), with DeepSpeed's `latest` (naming the
tag) and its copied zero_to_fp32.py beside them, so `python zero_to_fp32.py . OUT` in ckpt/zero works as DeepSpeed
documents it (tests/test_zero_latest.py). Into the same strategy and world size
they load as they are; into another world size or ZeRO stage they go through DeepSpeed's universal
checkpoint (`ds_to_universal`, then `load_universal_checkpoint`), which keeps the optimizer state; from a
DDP/FSDP2 (DCP) checkpoint only the weights are taken, and the fp32 masters are refreshed from them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

import torch

from shardtune import ShardtuneError
from shardtune.config import Config
from shardtune.distributed import comm, dcp
from shardtune.distributed.base import Strategy, misfit, process_group_kwargs, read_on_main
from shardtune.distributed.zero_files import FOLDER, TAG, to_universal
from shardtune.optim import build_optimizer



def deepspeed_config_path(name: str) -> str:
    """The JSON a launch passed (accelerate launch --deepspeed_config_file), else the checkout's launch/deepspeed/NAME.json."""
    from shardtune.launcher import find_launch_dir

    given = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if given:
        return given
    return str(find_launch_dir(Path.cwd(), Path(__file__)) / "deepspeed" / f"{name}.json")


def _plugin(cfg: Config, name: str):
    from accelerate.utils import DeepSpeedPlugin

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ShardtuneError(f"strategy {name} needs DeepSpeed; `pip install deepspeed` (or choose ddp, fsdp or cpu).") from None
    plugin = DeepSpeedPlugin(
        hf_ds_config=deepspeed_config_path(name),
        gradient_accumulation_steps=cfg.train.grad_accum,
        gradient_clipping=cfg.optim.max_grad_norm or 0.0,  # 0 = no clipping for DeepSpeed
        zero3_init_flag=name.startswith("zero3"),
    )
    # the Trainer feeds batches itself, so Accelerate cannot read the micro-batch off a data loader
    if plugin.deepspeed_config.get("train_micro_batch_size_per_gpu") == "auto":
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    return plugin


class ZeroStrategy(Strategy):
    family = "zero"
    holds_back_nonfinite = True

    def __init__(self, cfg: Config, name: str):
        from accelerate import Accelerator

        super().__init__(cfg, name)
        comm.ensure_process_env()
        self.mixed_precision = cfg.train.mixed_precision
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self._env_before = set(os.environ)  # Accelerate's DeepSpeed plugin sets ACCELERATE_* for the process
        pg = process_group_kwargs(cfg)
        if not torch.cuda.is_available():
            pg.backend = "gloo"  # Accelerate picks gloo itself only for its plain CPU mode
        self.acc = Accelerator(
            mixed_precision=self.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum,
            deepspeed_plugin=_plugin(cfg, name), kwargs_handlers=[pg],
            dynamo_backend="inductor" if cfg.model.compile else None,
        )
        self.device = self.acc.device
        self.shards_parameters = name.startswith("zero3")
        self._last = True

    @property
    def engine(self):
        return self.model  # Accelerate's prepare returns the DeepSpeedEngine itself

    def prepare(self, model: torch.nn.Module) -> None:
        optimizer = build_optimizer(model, self.cfg.optim)  # decay by parameter name: ZeRO-3 params are empty here
        self.model, self.optimizer = self.acc.prepare(model, optimizer)

    def unwrapped(self) -> torch.nn.Module:
        return self.engine.module

    def _whole_parameters(self):
        from shardtune.distributed.rollout import zero3_gathered

        return zero3_gathered(self.engine) if self.shards_parameters else contextlib.nullcontext()

    def micro_batch(self, last: bool):
        self._last = last
        return super().micro_batch(last)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.set_gradient_accumulation_boundary(is_boundary=self._last)
        self.engine.backward(loss * self.world, scale_wrt_gas=False)  # ZeRO averages over data-parallel ranks

    def clip_grad_norm(self, max_norm: float | None) -> None:
        return None  # DeepSpeed clips inside engine.step() (gradient_clipping in its config)

    def optimizer_step(self, skip: bool) -> bool:
        self.engine.step()  # skips a non-finite update itself (see the module docstring)
        return bool(self.engine.was_step_applied())

    @property
    def scales_loss(self) -> bool:
        return self.mixed_precision == "fp16"

    def loss_scale(self) -> float | None:
        return float(self.engine.optimizer.loss_scale) if self.scales_loss else None

    def grad_norm_after_step(self, before) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _optimizer_state(self) -> list[torch.Tensor]:
        base = self.engine.optimizer.optimizer  # the torch AdamW over this rank's fp32 partitions
        return [v for s in base.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]

    def _local_bytes(self) -> tuple[int, int, int]:
        params = sum(_zero_local(p).numel() * _zero_local(p).element_size() for p in self.engine.module.parameters())
        return params, self.grad_bytes, sum(t.numel() * t.element_size() for t in self._optimizer_state())

    def _grad_bytes_now(self) -> int:
        """ZeRO-3 keeps its gradient partition in one flat buffer; ZeRO-1/2 hold the reduced partition (ZeRO-2) or
        the whole gradients (ZeRO-1) until the step."""
        opt = self.engine.optimizer
        flat = getattr(opt, "grad_partitions_flat_buffer", None)
        if torch.is_tensor(flat):
            return flat.numel() * flat.element_size()
        parts = [t for v in (getattr(opt, "averaged_gradients", None) or {}).values() for t in (v or []) if torch.is_tensor(t)]
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return sum(t.numel() * t.element_size() for t in parts + grads)

    # -------------------------------------------------------------- checkpoints
    def save(self, ckpt: Path) -> list[Path]:
        folder = Path(ckpt) / FOLDER
        self.engine.save_checkpoint(str(folder), tag=TAG, client_state={}, save_latest=True)  # `latest`: for zero_to_fp32.py
        mine = [p for p in (folder / TAG).glob("*") if f"_rank_{self.rank}_" in p.name or f"rank_{self.rank:02d}" in p.name]
        if self.is_main:
            mine += [p for p in (folder / TAG).glob("*model_states.pt")] + [folder / "latest"]
        return sorted(set(mine))

    def load(self, ckpt: Path, saved_strategy: str, saved_world: int, scratch: Path) -> str | None:
        folder = Path(ckpt) / FOLDER
        if not folder.is_dir():
            self.load_full_state_dict(lambda: dcp.read_model(ckpt))
            return (f"DeepSpeed cannot load the optimizer state of a {saved_strategy} (torch.distributed.checkpoint) checkpoint: "
                    "the model weights are kept, the optimizer state starts fresh")
        if saved_strategy == self.name and saved_world == self.world:
            self.engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
            return None
        universal = self._universal(folder, scratch)
        groups = self.engine.optimizer.optimizer.param_groups
        hyper = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in groups]
        self.engine._config.load_universal_checkpoint = True
        try:
            self.engine.load_checkpoint(str(universal), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
        finally:
            self.engine._config.load_universal_checkpoint = False
        _mend_universal_load(self.engine.optimizer.optimizer, hyper)
        return None

    def _universal(self, folder: Path, scratch: Path) -> Path:
        """DeepSpeed's universal checkpoint of `folder`, converted once by the main rank into `scratch`."""
        out = Path(scratch) / "universal"
        if self.is_main and not (out / TAG).is_dir():
            to_universal(folder, out)
        self.barrier()
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights (not the bf16/fp16 module copies), gathered from every rank's partition; frozen
        parameters (no master) as the module holds them."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        module, out = self.engine.module, {}
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None  # collective under ZeRO-3
            if full is None:
                with deepspeed.zero.GatheredParameters([p]) if self.shards_parameters else contextlib.nullcontext():
                    full = p.data.clone() if self.is_main else None
            if self.is_main:
                out[name] = full.detach().cpu().clone()
        if self.is_main:
            params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
            out.update({k: v.detach().cpu().clone() for k, v in module.state_dict().items() if k not in params})
        return out

    def load_full_state_dict(self, read: Callable[[], dict[str, torch.Tensor]], partial: bool = False) -> None:
        import deepspeed

        module = self.engine.module
        # ZeRO-3: the whole parameters exist only inside GatheredParameters; the main rank loads, the others receive
        gathered = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0) if self.shards_parameters else None
        with gathered or contextlib.nullcontext():
            state = read_on_main(self, read, partial) if self.shards_parameters else _checked(self, read(), partial)
            if self.is_main or not self.shards_parameters:
                module.load_state_dict(state, strict=False)
        self.engine.optimizer.refresh_fp32_params()  # else the next step writes the old fp32 masters back

    def end(self) -> None:
        self.acc.end_training()
        for key in set(os.environ) - self._env_before:  # a later run in this process must not inherit this one's backend
            if key.startswith("ACCELERATE_"):
                del os.environ[key]


def _mend_universal_load(base, hyper: list[dict]) -> None:
    """Two things DeepSpeed 0.19's ZeRO-3 universal load gets wrong, put right (tests/test_strategies.py fails without):
    it copies the first param group's hyperparameters onto every group, giving the no-decay group (biases, norms)
    weight decay; and it hands every group one and the same `step` tensor, which the fused AdamW then advances once
    per group, so Adam's bias correction runs ahead after the first step."""
    for group, own in zip(base.param_groups, hyper):
        group.update(own)
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _checked(strategy: Strategy, state: dict, partial: bool) -> dict:
    error = misfit(strategy.unwrapped(), state, partial)
    if error:
        raise ShardtuneError(error)
    return state


def _zero_local(p: torch.Tensor) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p
