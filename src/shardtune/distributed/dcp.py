"""Model and optimizer checkpoints through torch.distributed.checkpoint (DCP): the format of DDP and FSDP2 runs.

`get_state_dict` / `set_state_dict` key the model and the optimizer state by parameter name (FQN), whatever
wraps the model (DDP, FSDP2's DTensor shards, nothing); DCP writes each rank's shards and a metadata file and
reshards on load. So a DDP or FSDP2 checkpoint resumes on any number of processes, and DDP <-> FSDP2, with the
optimizer state kept. DCP's `.metadata` is a pickle: resume only from checkpoints your own runs wrote.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from shardtune.distributed import comm

FOLDER = "dcp"


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path) -> list[Path]:
    """Every rank writes its shards to ckpt/dcp; returns the files this rank wrote."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    folder = Path(ckpt) / FOLDER
    with _one_process():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder), no_dist=not comm.initialized())
    return written(ckpt)


def written(ckpt: Path) -> list[Path]:
    """The files of ckpt/dcp this rank wrote (its shards; rank 0 the metadata too)."""
    folder = Path(ckpt) / FOLDER
    mine = sorted(folder.glob(f"__{comm.rank()}_*.distcp"))
    return mine + ([folder / ".metadata"] if comm.rank() == 0 else [])


_GROUP = None


def _checkpoint_group():
    """A gloo group of all ranks for the writer thread of async saves: its collectives must not interleave with the
    training's on the default group (and async_save wants a CPU backend, which NCCL is not). Created once, by all."""
    global _GROUP
    if _GROUP is None and comm.initialized():
        import torch.distributed as dist

        _GROUP = dist.new_group(backend="gloo")
    return _GROUP


def save_async(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path):
    """Stage every rank's shards in host memory now (a copy: training may go on changing them) and write them to
    ckpt/dcp in a background thread; returns the Future (done when this rank's files are written)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _one_process():
        return dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(ckpt) / FOLDER),
                              process_group=_checkpoint_group(), no_dist=not comm.initialized())


ONE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized"
# DCP warns that it assumes one process when there is no process group: that is what we asked for. A filter for the
# whole process, not a catch_warnings block: an async save's writer thread warns after such a block has ended.
warnings.filterwarnings("ignore", message=ONE_PROCESS)


@contextlib.contextmanager
def _one_process():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ONE_PROCESS)
        yield


def has(ckpt: Path) -> bool:
    return (Path(ckpt) / FOLDER / ".metadata").is_file()


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    """Model and optimizer from ckpt/dcp, resharded onto this run's layout (any world size, DDP or FSDP2)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _one_process():
        dcp.load(state, checkpoint_id=str(Path(ckpt) / FOLDER), no_dist=not comm.initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def read_model(ckpt: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights from ckpt/dcp in one process (export, or a resume under another backend).

    As torch's own dcp_to_torch_save reads a checkpoint without a model to load into: the private loader with
    the planner that builds the state dict from the checkpoint's metadata (the public `load` needs a template)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    with _one_process():
        _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(Path(ckpt) / FOLDER)),
                         planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    return state["model"]


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the main rank (CPU), {} elsewhere. Collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], partial: bool = False) -> None:
    """`state` (a whole state dict, or part of one with `partial`, on the main rank; {} elsewhere) into the live model,
    sharded or not. Collective."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=comm.world_size() > 1, strict=not partial)
    set_model_state_dict(model, state, options=options)
