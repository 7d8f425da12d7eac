"""DataLoader workers leave stop signals to their rank.

Under Slurm (and `kill -TERM` of a process group) a signal reaches every
process of the job step, DataLoader workers included. A worker killed by
SIGTERM/SIGINT/SIGUSR1 makes its rank's next `next()` fail ("DataLoader
worker is killed by signal") before the rank's own handler (preempt.py) has
finished the step and saved. `ignore_stop_signals` is every worker's
`worker_init_fn` (StreamLoader, classification.make_loader): a worker keeps
producing batches whatever such a signal comes from anyone but its parent.

Why not simply SIG_IGN: the parent (the rank) ends its workers with SIGTERM
too, in torch's shutdown fallback and in multiprocessing's exit handler
(`terminate()` then `join()` without a timeout for every live daemonic
child). A worker that ignores SIGTERM then hangs its rank at exit whenever a
loader iterator is still alive (an endless stream at the end of training).
So the signals are blocked in the worker and a thread takes them with
sigwaitinfo, which tells who sent each: SIGTERM from the parent exits at
once, as torch's own worker handler does; everything else is dropped.

A worker is started (forked) before its worker_init_fn runs, and a signal in
between would still kill it: `StopSafeLoader` blocks the stop signals in the
rank while it starts its workers, so they begin life with them blocked (a
signal to the rank in that moment waits and is taken right after).

Workers are forked from their rank (multiprocessing_context "fork" where the
platform has it), whatever start method the rank process was itself given.
The DataLoader would otherwise take the process's default: "forkserver"
inside a process started by a forkserver (tests/forklaunch.py's ranks, and
every process on Python >= 3.14), and then each worker is the child of a
fresh forkserver, not of its rank. Measured under the test launcher: the
first batch waited about 5 s for each worker to import and unpickle its
dataset; a SIGKILLed rank left its forkserver and workers running forever
(they watch their parent, the forkserver, which outlives the rank): 201
leaked processes after some 40 kill-and-resume launches; the rank's SIGTERM
at shutdown was not from their parent, so they ignored it; and about one
launch in 40 lost a batch to a worker whose multiprocessing temp dir was
gone (FileNotFoundError in the queue's feeder thread) and hung.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

from torch.utils.data import DataLoader

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}


def _take_signals() -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == os.getppid():
            os._exit(0)


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: block the stop signals here (threads started later inherit the mask) and take them in a thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_take_signals, name="shardtune-stop-signals", daemon=True).start()


class StopSafeLoader(DataLoader):
    """A DataLoader whose workers never see a stop signal: blocked from their fork, then taken by `ignore_stop_signals`."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("num_workers") and "fork" in multiprocessing.get_all_start_methods():
            kwargs.setdefault("multiprocessing_context", multiprocessing.get_context("fork"))  # children of the rank (above)
        super().__init__(*args, **kwargs, worker_init_fn=ignore_stop_signals if kwargs.get("num_workers") else None)

    def _get_iterator(self):  # DataLoader's one place that starts the workers
        if self.num_workers == 0:
            return super()._get_iterator()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
