"""Fault injection for the fault-tolerance tests: crash, stall or poison a chosen rank at a chosen step.

Off unless `SHARDTUNE_FAILPOINTS` is set. It holds `;`-separated entries
`ACTION@WHERE=STEP[,rank=R]` (rank defaults to 0):

    kill@step=7,rank=1    SIGKILL rank 1 right after optimizer step 7 (before log, eval, checkpoint)
    kill@save=9           SIGKILL rank 0 inside the write of checkpoint 9 (shards written, not yet sealed)
    kill@upload=9         SIGKILL rank 0 after it uploaded its first file of checkpoint 9 to the run's store
    stall@step=4,rank=1   rank 1 sleeps forever after step 4 (the others block in the next collective)
    nan@step=5,rank=1     rank 1's loss of step 5 becomes NaN (every micro-batch of that step)
    inf@step=5,rank=1     rank 1's gradient of step 5 gets an Inf after backward (its loss stays finite: only the grad
                          norm can tell)
    usr1@step=3           SIGUSR1 to rank 0 and its child processes (DataLoader workers) right after step 3, as
                          Slurm signals a whole job step (term@...: SIGTERM); also @eval=N (in the eval at step N),
                          @save=N (inside the write of checkpoint N), @load=0 (once the model is loaded), @export=0
                          (after training, before the final eval, test and export)

The environment is read at each call, so a process forked before it was set still sees it.
"""

from __future__ import annotations

import os
import signal
import time

import torch

ENV = "SHARDTUNE_FAILPOINTS"


def _entries() -> list[tuple[str, str, int, int]]:
    spec = os.environ.get(ENV, "").strip()
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        action, _, rest = entry.partition("@")
        fields = dict(f.split("=", 1) for f in rest.split(","))
        where = next(k for k in fields if k != "rank")
        out.append((action, where, int(fields[where]), int(fields.get("rank", 0))))
    return out


def _armed(action: str, where: str, rank: int, step: int) -> bool:
    return (action, where, step, rank) in _entries()


def hit(where: str, rank: int, step: int) -> None:
    """Crash or stall here when a failpoint says so."""
    if not os.environ.get(ENV):
        return
    if _armed("kill", where, rank, step):
        print(f"failpoint: SIGKILL rank {rank} at {where} {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    for action, sig in (("usr1", signal.SIGUSR1), ("term", signal.SIGTERM)):
        if _armed(action, where, rank, step):
            _signal_all(sig, f"rank {rank} at {where} {step}")
    if _armed("stall", where, rank, step):
        print(f"failpoint: rank {rank} stalls at {where} {step}", flush=True)
        while True:
            time.sleep(3600)


def _signal_all(sig: int, where: str) -> None:
    """What Slurm does to a job step: the signal to this process and every process under it (DataLoader workers)."""
    import psutil

    me = psutil.Process()
    print(f"failpoint: {sig.name} to {where} and its {len(me.children(recursive=True))} child process(es)", flush=True)
    for child in me.children(recursive=True):
        child.send_signal(sig)
    os.kill(os.getpid(), sig)


def loss(value: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    """`value`, or NaN when a failpoint poisons this rank's loss at this step (keeps the graph, so backward runs)."""
    if os.environ.get(ENV) and _armed("nan", "step", rank, step):
        return value * float("nan")
    return value


def grads(model: torch.nn.Module, rank: int, step: int) -> None:
    """Put an Inf into the first gradient when a failpoint poisons this rank's gradient at this step."""
    if os.environ.get(ENV) and _armed("inf", "step", rank, step):
        grad = next(p.grad for p in model.parameters() if p.grad is not None)
        grad.add_(float("inf"))
