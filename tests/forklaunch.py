"""Launch N ranks of `shardtune train` the way torchrun does, fast.

Each rank is a real process with torchrun's environment (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT) talking gloo to the others, and when one rank
fails the rest are killed, as torchrun's agent does. The difference: ranks
are forked from a server that imported torch, transformers and shardtune
once, so a launch costs about a second instead of ~8 s of imports. That is
what makes a matrix of 40+ launches (the kill tests) affordable; the tests of
the real launcher (`shardtune launch` -> accelerate -> torchrun) are elsewhere.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

_ctx = None


def free_port() -> int:
    """A TCP port the OS says is free now (bound to 0, then released): launches never share a fixed port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def context():
    """The forkserver context ranks start from; any test that needs a forkserver-started process takes this one:
    the forkserver is one per process, and one started without the preload made every later launch import
    everything again (kill trials 25 s instead of 6 s in the suite)."""
    global _ctx
    if _ctx is None:
        from multiprocessing import forkserver

        if forkserver._forkserver._forkserver_pid is not None:
            raise RuntimeError("a forkserver is already running without forklaunch's preload; start it through forklaunch.context()")
        _ctx = mp.get_context("forkserver")
        # DeepSpeed and torch._dynamo too: a ZeRO rank imports DeepSpeed, and its optimizer check imports DeepSpeed's
        # Muon module, whose torch.compile decorator imports torch._dynamo: ~4 s of CPU per rank (cProfile of a zero1
        # rank). Not the Muon module itself: with it preloaded, the forked ranks of the S3 kill test hung at their
        # first checkpoint upload (aiohttp "attached to a different loop"), cause not found.
        _ctx.set_forkserver_preload(["torch", "transformers", "accelerate", "shardtune.trainer", "shardtune.cli", "deepspeed",
                                     "torch._dynamo"])
    return _ctx


def _threads_from_env() -> None:
    """torch read OMP_NUM_THREADS when the server imported it: a child sets it again (a rank that did not still ran
    2 threads: 2 ranks on 2 cores, oversubscribed); torchrun's and any fresh interpreter read it at import."""
    if "OMP_NUM_THREADS" in os.environ:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _rank(rank: int, world: int, port: int, argv: list[str], env: dict, log: str) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    _threads_from_env()
    from shardtune.cli import main

    os._exit(main(argv))


def launch(argv: list[str], log_dir: Path, world: int = 2, env: dict | None = None, timeout: float = 300) -> list[int]:
    """Run `shardtune <argv>` on `world` ranks; returns each rank's exit code (negative = killed by that signal).
    Rank r's output is appended to log_dir/rank<r>.log."""
    ctx, port = context(), free_port()
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    procs = [ctx.Process(target=_rank, args=(r, world, port, argv, env, str(log_dir / f"rank{r}.log"))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    while any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs) or time.time() > deadline:
            for p in procs:  # one rank failed: the others would block in their next collective
                p.kill()  # SIGKILL; a rank that has just exited on its own is left alone
        time.sleep(0.02)
    for p in procs:
        p.join()
    return [p.exitcode for p in procs]


def _one(argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """The child of `run`: the environment, folder, argv and output files of a fresh `python -m shardtune.cli`."""
    import atexit
    import sys
    import traceback

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [sys.executable, *argv]
    for path, target in ((out, 1), (err, 2)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), target)
    _threads_from_env()
    from shardtune.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what the interpreter's exit runs (W&B's hooks among them)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(argv: list[str], env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
    """`python -m shardtune.cli ARGV` as one process forked from the preloaded server, with no launcher's variables:
    what subprocess.run(capture_output=True, text=True) returns, in ~1 s of start-up instead of ~9 s of imports.
    For the tests of a one-process run's behaviour; the tests of the real entry points start real interpreters."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out, err = f"{tmp}/stdout", f"{tmp}/stderr"
        proc = context().Process(target=_one, args=([str(a) for a in argv], dict(os.environ if env is None else env),
                                                    str(cwd or os.getcwd()), out, err))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(argv, timeout)
        return subprocess.CompletedProcess(argv, proc.exitcode, Path(out).read_text(), Path(err).read_text())
