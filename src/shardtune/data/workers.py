"""DataLoader workers leave stop signals to their rank.

Under Slurm (and `kill -TERM` of a process group) a signal reaches every
process of the job step, DataLoader workers included. A worker killed by
SIGTERM/SIGINT/SIGUSR1 makes its rank's next `next()` fail ("DataLoader
worker exited unexpectedly") before the rank's own handler (preempt.py) has
finished the step and saved. `ignore_stop_signals` is every worker's
`worker_init_fn` (StreamLoader, classification.make_loader): workers ignore
those signals and keep producing batches; they end as usual when their
rank's iterator shuts them down, or when their rank dies (torch's worker
watchdog), or by SIGKILL. The price: torch's fallback `terminate()` of a
worker that does not leave in 5 s after shutdown no longer works.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
