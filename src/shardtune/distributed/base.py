"""The strategy interface, and the plain strategy: one process, or DDP through Accelerate (`cpu`, `single_gpu`, `ddp`).

A strategy answers everything that differs between backends: how the model is wrapped and its optimizer
built, how a micro-batch's backward is scaled and synchronized, the grad norm as a plain tensor, whether
the engine holds back a non-finite update itself, per-rank bytes, checkpoints and resharding, the whole
model's weights for export and loading them back. The Trainer, the tasks and the models ask it; nothing
else in shardtune knows which backend runs.

Loss scaling: the Trainer hands `backward` each micro-batch's loss *sum* divided by the step's label count
summed over all micro-batches and ranks, so the step's gradient is the gradient of the global mean. Each
backend averages gradients over its data-parallel ranks, so `backward` multiplies by the world size first.
"""

from __future__ import annotations

import abc
import contextlib
import math
import resource
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Callable, ClassVar

import torch

from shardtune.config import Config
from shardtune.distributed import comm, dcp
from shardtune.distributed.zero_files import consolidated_weights
from shardtune.optim import build_optimizer


def completed(value) -> Future:
    """A Future that is already done with `value` (a save that happened at once)."""
    future: Future = Future()
    future.set_result(value)
    return future


class Strategy(abc.ABC):
    """What every backend provides; see the module docstring."""

    name: str
    precision_note: str = ""  # what train.mixed_precision resolved to, and why (distributed.build_strategy)
    family: ClassVar[str]  # checkpoint format: "dcp" (DDP, FSDP2) or "zero" (DeepSpeed)
    shards_parameters: ClassVar[bool] = False  # forward passes are collectives (ZeRO-3, FSDP2)

    def __init__(self, cfg: Config, name: str):
        self.cfg, self.name = cfg, name
        self.model: torch.nn.Module | None = None  # what to call forward on (wrapped)
        self.optimizer = None  # has .param_groups; the LR schedule steps it

    # -------------------------------------------------------------- where we are
    @property
    def world(self) -> int:
        return comm.world_size()

    @property
    def rank(self) -> int:
        return comm.rank()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # The mesh (mesh.Mesh): one data-parallel axis unless the strategy builds more (fsdp.FSDPStrategy).
    mesh = None

    @property
    def dp_world(self) -> int:
        """Data-parallel ranks: the data slots (every rank of one tp/sp group reads the same batch)."""
        return self.mesh.dp if self.mesh else self.world

    @property
    def dp_rank(self) -> int:
        return self.mesh.dp_rank(self.rank) if self.mesh else self.rank

    @property
    def seq_world(self) -> int:
        """Ranks that split each sequence (sp); the task gives each its share (`split_batch`)."""
        return self.mesh.seq if self.mesh else 1

    def split_batch(self, batch: dict) -> dict:
        """This rank's share of a micro-batch along the mesh's sequence axis (the whole batch without one)."""
        return batch

    def per_slot(self, every_rank: list) -> list:
        """Per-rank values (in rank order) -> one per data slot, in slot order: the first rank of each slot's group."""
        if not self.mesh:
            return every_rank
        first = {}
        for r, value in enumerate(every_rank):
            first.setdefault(self.mesh.dp_rank(r), value)
        return [first[slot] for slot in range(self.mesh.dp)]

    device: torch.device
    mixed_precision: str

    # -------------------------------------------------------------- collectives (the same for every backend)
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over every rank (agreement flags); sums of tokens, losses and metrics go through `data_sum`."""
        return comm.all_reduce_sum(t)

    def data_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks whose tokens differ (data-parallel x sequence-parallel): a tp group's ranks hold the same
        batch and count it once."""
        return comm.all_reduce_sum(t)

    def gather_objects(self, obj) -> list:
        return comm.gather_objects(obj)

    def from_main(self, obj):
        return comm.from_main(obj)

    def barrier(self) -> None:
        comm.barrier()

    # -------------------------------------------------------------- what subclasses implement
    @abc.abstractmethod
    def prepare(self, model: torch.nn.Module) -> None:
        ...

    @abc.abstractmethod
    def unwrapped(self) -> torch.nn.Module:
        ...

    def micro_batch(self, last: bool):
        """Context for one micro-batch's forward and backward; `last` = the step's final one."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def generating(self):
        """The model to call `generate` on, in eval mode, with its parameters whole for the whole call: gathered once,
        not once per token, where they are sharded (distributed/rollout.py), and released after. Collective there."""
        model = self.unwrapped()
        was = model.training
        model.eval()
        try:
            with self._whole_parameters():
                yield model
        finally:
            model.train(was)

    def _whole_parameters(self):
        return contextlib.nullcontext()

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        ...

    @abc.abstractmethod
    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor | None:
        """Clip to max_norm (None = no clipping) and return the global norm as a plain 0-dim tensor; None when the
        engine only knows it after its step (then `grad_norm_after_step`)."""

    holds_back_nonfinite: bool = False  # True: the engine skips a non-finite update itself

    @abc.abstractmethod
    def optimizer_step(self, skip: bool) -> bool:
        """Apply the update unless `skip`; zero the gradients. Returns whether the parameters changed."""

    scales_loss: bool = False  # fp16 loss scaling: a skipped step is the scaler's business, not a non-finite event

    def loss_scale(self) -> float | None:
        return None

    def grad_norm_after_step(self, before: torch.Tensor | None) -> float:
        return float(before) if before is not None else float("nan")

    @abc.abstractmethod
    def save(self, ckpt: Path) -> list[Path]:
        """Write model and optimizer state under ckpt (every rank its part); returns the files this rank wrote."""

    def save_async(self, ckpt: Path):
        """Start writing model and optimizer state under ckpt; training may change them meanwhile. Returns a Future
        whose result() is the files this rank wrote. This default saves at once (backends without async saves)."""
        return completed(self.save(ckpt))

    @abc.abstractmethod
    def load(self, ckpt: Path, saved_strategy: str, saved_world: int, scratch: Path) -> str | None:
        """Load model and optimizer state from ckpt; None when everything was kept, else one sentence on what was not.
        `scratch`: a folder this run may write conversions into."""

    @abc.abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's fp32 weights on the main rank, {} elsewhere. Collective."""

    @abc.abstractmethod
    def load_full_state_dict(self, read: Callable[[], dict[str, torch.Tensor]], partial: bool = False) -> None:
        """`read()` (called where needed: plain tensors in model key names, the whole state dict unless `partial`) into
        the live model, refreshing any master copy the optimizer keeps. Collective."""

    def end(self) -> None:
        pass

    # -------------------------------------------------------------- shared
    def state_bytes(self) -> dict[str, list[int]]:
        """Per-rank live bytes of parameters, gradients and optimizer state, and peak RSS (lists over ranks). Collective."""
        params, grads, opt = self._local_bytes()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        mine = torch.tensor([[params, grads, opt, rss]], dtype=torch.float64)
        every = [r[0] for r in comm.gather_objects(mine.tolist())]
        keys = ["param_bytes", "grad_bytes", "optim_state_bytes", "peak_rss_bytes"]
        return {k: [int(r[i]) for r in every] for i, k in enumerate(keys)}

    grad_bytes: int = 0  # the most gradient bytes this rank held after a backward of the first step (note_grad_bytes)

    def note_grad_bytes(self) -> None:
        """Measure this rank's gradient bytes now (after a micro-batch's backward, before the update)."""
        self.grad_bytes = max(self.grad_bytes, self._grad_bytes_now())

    def _grad_bytes_now(self) -> int:
        return _bytes(_local(p.grad) for p in self.model.parameters() if p.grad is not None)

    def optimizer_state_norm(self) -> float:
        """The 2-norm of every rank's optimizer state (Adam moments), summed over ranks: 0 before any step or after a
        load that kept no optimizer state. Collective."""
        squares = sum(float(t.double().pow(2).sum()) for t in self._optimizer_state())
        return float(self.all_reduce_sum(torch.tensor([squares], dtype=torch.float64, device=self.device))[0]) ** 0.5

    def _optimizer_state(self) -> list[torch.Tensor]:
        return _optimizer_tensors(self.optimizer)

    def _local_bytes(self) -> tuple[int, int, int]:
        local = [_local(p) for p in self.model.parameters()]
        return _bytes(local), self.grad_bytes, _bytes(_optimizer_tensors(self.optimizer))

    def peak_flops_dtype(self) -> str:
        return self.mixed_precision


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the FSDP2 DTensor shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _optimizer_tensors(optimizer):
    base = optimizer
    while hasattr(base, "optimizer"):  # Accelerate wrapper -> (ZeRO optimizer ->) the torch optimizer
        base = base.optimizer
    return [_local(v) for state in base.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]


def process_group_kwargs(cfg: Config):
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.dist.timeout_minutes))


def autocast_kwargs():
    """Autocast without its cast cache. The cache keeps every weight's bf16/fp16 copy until the forward ends; a
    forward uses each weight once, so it saves no cast, and under gradient checkpointing (which recomputes the
    casts in backward anyway) it held 167 MiB of SmolLM2-135M copies at the step's peak (bench/chunked_loss.py, bf16)."""
    from accelerate.utils import AutocastKwargs

    return AutocastKwargs(cache_enabled=False)


class PlainStrategy(Strategy):
    """One process, or DDP (gloo on CPU, NCCL on GPUs) through Accelerate, which also casts (bf16/fp16 autocast)
    and scales fp16 losses. Checkpoints: DCP, resharded on load (any world size; FSDP2 checkpoints too)."""

    family = "dcp"

    def __init__(self, cfg: Config, name: str):
        from accelerate import Accelerator

        super().__init__(cfg, name)
        cuda = torch.cuda.is_available()
        self.mixed_precision = cfg.train.mixed_precision
        # gradient_accumulation_steps=1: Accelerate would divide every loss by it; the Trainer scales losses itself.
        self.acc = Accelerator(
            mixed_precision=self.mixed_precision, cpu=not cuda, kwargs_handlers=[process_group_kwargs(cfg), autocast_kwargs()],
            dynamo_backend="inductor" if cfg.model.compile else None,
        )
        self.device = self.acc.device

    def prepare(self, model: torch.nn.Module) -> None:
        optimizer = build_optimizer(model, self.cfg.optim)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)

    def unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    def micro_batch(self, last: bool):
        return contextlib.nullcontext() if last or self.world == 1 else self.acc.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss * self.world)  # DDP averages over ranks; the loss is already a share of the global mean

    @property
    def _scaled(self) -> bool:
        return self.acc.scaler is not None and self.acc.scaler.is_enabled()

    @property
    def holds_back_nonfinite(self) -> bool:
        return self._scaled  # fp16: the grad scaler skips an overflowed step and lowers its scale

    @property
    def scales_loss(self) -> bool:
        return self._scaled

    def loss_scale(self) -> float | None:
        return float(self.acc.scaler.get_scale()) if self._scaled else None

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        norm = self.acc.clip_grad_norm_(self.model.parameters(), max_norm or math.inf)  # unscales fp16 grads first
        return torch.as_tensor(norm, device=self.device, dtype=torch.float32)

    def optimizer_step(self, skip: bool) -> bool:
        applied = not skip or self._scaled
        if applied:
            self.optimizer.step()
            if self._scaled:
                applied = not self.optimizer.step_was_skipped
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def _torch_optimizer(self):
        return self.optimizer.optimizer  # inside Accelerate's wrapper

    def save(self, ckpt: Path) -> list[Path]:
        return dcp.save(self.model, self._torch_optimizer(), ckpt)

    def save_async(self, ckpt: Path):
        return _files_when_done(dcp.save_async(self.model, self._torch_optimizer(), ckpt), ckpt)

    def load(self, ckpt: Path, saved_strategy: str, saved_world: int, scratch: Path) -> str | None:
        return load_into_dcp_strategy(self, ckpt, saved_strategy)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return dcp.full_model_state(self.model)

    def load_full_state_dict(self, read: Callable[[], dict[str, torch.Tensor]], partial: bool = False) -> None:
        dcp.load_full_model_state(self.model, read_on_main(self, read, partial), partial)

    def end(self) -> None:
        self.acc.end_training()


def _files_when_done(future, ckpt: Path):
    """DCP's Future (of the checkpoint's metadata) as a Future of the files this rank wrote."""
    from concurrent.futures import Future

    files: Future = Future()

    def done(f) -> None:
        try:
            f.result()
            files.set_result(dcp.written(ckpt))
        except BaseException as exc:  # noqa: BLE001  handed to whoever waits for the files
            files.set_exception(exc)

    future.add_done_callback(done)
    return files


def load_into_dcp_strategy(strategy: Strategy, ckpt: Path, saved_strategy: str) -> str | None:
    """A DCP checkpoint loads whole (model and optimizer, resharded); a ZeRO checkpoint gives its weights only."""
    if dcp.has(ckpt):
        dcp.load(strategy.model, strategy._torch_optimizer(), ckpt)
        return None
    strategy.load_full_state_dict(lambda: consolidated_weights(ckpt))
    return (f"{strategy.name} cannot load the optimizer state of a DeepSpeed ({saved_strategy}) checkpoint: "
            "the model weights are kept, the optimizer state starts fresh")


def read_on_main(strategy: Strategy, read: Callable[[], dict], partial: bool = False) -> dict:
    """`read()` on the main rank ({} elsewhere), checked to fit the model; a misfit is one sentence on every rank."""
    from shardtune import ShardtuneError

    state, error = {}, None
    if strategy.is_main:
        state = read()
        error = misfit(strategy.unwrapped(), state, partial)
    error = strategy.from_main(error)
    if error:
        raise ShardtuneError(error)
    return state


def misfit(model: torch.nn.Module, state: dict, partial: bool = False) -> str | None:
    """Why `state` (a whole state dict, or with `partial` some of it) is not this model's weights, or None."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    missing = set() if partial else {n for n, _ in model.named_parameters()} - set(state)
    unexpected = set(state) - names
    if not (missing or unexpected):
        return None
    return (f"the saved weights do not fit this model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
            "they come from another model: point at a checkpoint of this run's model.")
