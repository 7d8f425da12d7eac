"""Preemption: SIGUSR1 or SIGTERM -> finish the current optimizer step, save, requeue under Slurm, exit 0.

The handler only records the signal; the loop asks `stop_now(acc)` at each
step boundary, and all ranks agree (a max over ranks), so a signal that
reached only some ranks still stops every rank at the same step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import torch

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    def __init__(self):
        self.received: int | None = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in SIGNALS:
                signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        self.received = signum

    def stop_now(self, acc) -> bool:
        """True on every rank once any rank got a signal (collective: call it on all ranks at the same step)."""
        if acc.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([1 if self.received else 0], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item())

    def restore(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)


def requeue() -> str | None:
    """Under Slurm, put this job (or array task) back in the queue; returns what was requeued, or None outside Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    target = f"{array}_{task}" if array and task else job
    subprocess.run(["scontrol", "requeue", target], check=False, timeout=60)
    return target
