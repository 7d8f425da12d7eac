"""What every DataLoader worker process does first."""

from __future__ import annotations

import signal


def ignore_stop_signals(worker_id: int) -> None:
    """Stop signals are the rank's: under Slurm SIGTERM/SIGUSR1 reach every process of the job, and a worker that died
    of one would fail the rank's next batch before the rank reaches the step boundary where it saves."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
