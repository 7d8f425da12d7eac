"""Preemption: SIGUSR1 or SIGTERM -> finish the current optimizer step, save, requeue under Slurm, exit 0.

The handler only records the signal; the loop's per-step agreement
(`guard.StepChecks.agree`, one collective) makes every rank stop at the same
step even when the signal reached only some of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    """Records SIGUSR1/SIGTERM. After SIGTERM the rank has `term_grace` seconds to reach its next step boundary
    (`acknowledge`); a rank stuck elsewhere (a stalled collective, a hung loader) exits then instead of living on
    until the launcher's SIGKILL: torchrun sends SIGTERM to the survivors when one rank fails."""

    def __init__(self, term_grace: float = 20.0):
        self.received: int | None = None
        self.term_grace = term_grace
        self._timer: threading.Timer | None = None
        self._acknowledged = False
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in SIGNALS:
                signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        self.received = signum
        if signum == signal.SIGTERM and self._timer is None and not self._acknowledged:
            self._timer = threading.Timer(self.term_grace, self._give_up, args=(signum,))
            self._timer.daemon = True
            self._timer.start()

    def _give_up(self, signum: int) -> None:
        print(f"shardtune: got SIGTERM but did not reach a step boundary within {self.term_grace:g} s "
              "(dist.term_grace_seconds); exiting without a checkpoint", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def acknowledge(self) -> None:
        """The loop saw the signal at a step boundary: saving may take as long as it takes."""
        self._acknowledged = True
        if self._timer is not None:
            self._timer.cancel()

    def restore(self) -> None:
        self.acknowledge()
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
