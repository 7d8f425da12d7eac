"""Process-level helpers every strategy shares: the process environment, collectives on Python objects, leaving.

Collectives go through torch.distributed directly (gloo on CPU, NCCL on GPU), so they are the same
whichever backend shards the model; with one process and no process group they are identities.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist


def launched() -> bool:
    """True when a launcher (torchrun, accelerate launch, Slurm's srun via shardtune launch) set the rank environment."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def ensure_process_env() -> None:
    """A one-process run of a backend that needs a process group (DeepSpeed, FSDP2) gets torchrun's environment
    for a world of one, on a free loopback port."""
    if launched():
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


MPI_WORLD_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def alone_of_many() -> str | None:
    """One sentence when `accelerate launch` meant several processes but started this one alone.

    It spawns processes (torchrun: RANK, WORLD_SIZE) only for MULTI_GPU, FSDP and DEEPSPEED configs or with
    --multi_gpu; for MULTI_CPU (or NO) with more processes and no mpirun hostfile it starts ONE, marked by
    ACCELERATE_USE_CPU (set by that launcher alone) and the MASTER_PORT it sets for the others. Under mpirun
    (the MPI world size is set) Accelerate forms the process group from MPI's ranks: not this case.
    """
    if launched() or any(os.environ.get(name, "1") not in ("", "0", "1") for name in MPI_WORLD_SIZES):
        return None
    if "ACCELERATE_USE_CPU" in os.environ and "MASTER_PORT" in os.environ:
        return ("accelerate launch meant several processes but started only this one (for distributed_type MULTI_CPU or NO "
                "it spawns none); run `shardtune launch CONFIG`, or `accelerate launch` with this checkout's launch/cpu.yaml "
                "(it spawns them) or with --multi_gpu.")
    return None


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `t` (a new tensor; `t` is left alone). No host read."""
    if world_size() == 1:
        return t.clone()
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (our own objects only: states, counts)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: Any) -> Any:
    """The main process's `obj`, on every process."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


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
    if initialized():
        dist.destroy_process_group()
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
