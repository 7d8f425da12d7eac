"""A real Slurm cluster on this one host, for tests/test_slurm.py.

munged (as user munge) with its own key and socket, slurmctld, and one slurmd
per "node" (`slurmd -N NAME`, each on its own port, all at 127.0.0.1), all
configured by a generated slurm.conf in a temp folder and stopped by `stop()`.
The node names are mapped to 127.0.0.1 in /etc/hosts while the cluster runs
(jobs resolve the first node's name as their main address) and the lines are
removed again. Needs root and the Debian packages `slurmctld slurmd
slurm-client munge` (`make slurm`).

Run it by hand to experiment: `python tests/slurm_cluster.py` starts a cluster,
prints the SLURM_CONF to export, and stops it on Ctrl-C.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo")
HOSTS = Path("/etc/hosts")


def missing() -> str | None:
    """Why this machine cannot run the cluster, or None when it can."""
    absent = [b for b in BINARIES if shutil.which(b) is None]
    if absent:
        return f"no local Slurm ({', '.join(absent)} not found): install the Debian packages slurmctld slurmd slurm-client munge (`make slurm` as root)"
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root (SlurmUser=root); run the Slurm tests as root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "there is no user munge; reinstall the Debian package munge"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _running(root: Path) -> bool:
    """Whether the cluster in `root` still has its slurmctld."""
    try:
        return Path(f"/proc/{int((root / 'slurmctld.pid').read_text())}").exists()
    except (OSError, ValueError):
        return False


class LocalSlurm:
    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, prefix: str = "stnode"):
        self.names = [f"{prefix}{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node
        # /tmp, not $TMPDIR: munged (user munge) must reach it, and a unix socket path has at most 107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="shardtune-slurm-", dir="/tmp"))
        self.root.chmod(0o755)  # munged (user munge) walks into root/munge
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.hosts_line = f"127.0.0.1 {' '.join(self.names)}  # shardtune-test-slurm {self.root}\n"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    # ------------------------------------------------------------------ start / stop

    def start(self, timeout: float = 60) -> "LocalSlurm":
        try:
            self._start_munge()
            self._write_conf()
            self._map_hosts()
            self._daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            for name in self.names:
                self._daemon(f"slurmd-{name}", ["slurmd", "-D", "-f", str(self.conf), "-N", name])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        d = self.root / "munge"
        d.mkdir()
        d.chmod(0o711)  # munged: clients (any user) need execute on the socket's folder
        key = d / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        for p in (d, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        key.chmod(0o600)
        self.socket = d / "munge.socket"
        cmd = ["munged", "--foreground", f"--socket={self.socket}", f"--key-file={key}", f"--pid-file={d / 'munged.pid'}",
               f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"]
        self._daemon("munged", cmd, user=munge.pw_uid, group=munge.pw_gid)
        deadline = time.time() + 20
        while not self.socket.exists():
            if self.procs["munged"].poll() is not None or time.time() > deadline:
                raise RuntimeError(f"munged did not start: {self._tail('munged')}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.names))
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir()
        host = socket.gethostname().split(".")[0]
        r = self.root
        lines = [
            "ClusterName=shardtune-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=1,bf_interval=1",
            "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "ReturnToService=2", "JobRequeue=1", "KillWait=30", "MinJobAge=600",
            "InactiveLimit=0", "Waittime=0", "SlurmctldDebug=info", "SlurmdDebug=info",
        ]
        lines += [
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} State=UNKNOWN"
            for n, p in zip(self.names, node_ports)
        ]
        lines.append(f"PartitionName=debug Nodes={','.join(self.names)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _map_hosts(self) -> None:
        """Our line in /etc/hosts; lines left by clusters that no longer run (a killed session) are dropped."""
        lines = [line for line in HOSTS.read_text().splitlines(keepends=True)
                 if "# shardtune-test-slurm " not in line or _running(Path(line.rsplit(" ", 1)[-1].strip()))]
        HOSTS.write_text("".join(lines) + self.hosts_line)

    def _unmap_hosts(self) -> None:
        text = HOSTS.read_text()
        if self.hosts_line in text:
            HOSTS.write_text(text.replace(self.hosts_line, ""))

    def _daemon(self, name: str, cmd: list[str], **kw) -> None:
        out = open(self.root / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True, **kw)

    def _tail(self, name: str, n: int = 2000) -> str:
        files = [self.root / f"{name}.out", self.root / "log" / f"{name}.log"]
        return " | ".join(f.read_text(errors="replace")[-n:] for f in files if f.is_file())

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: {self._tail(name)}")
            p = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            state = p.stdout.strip()
            if p.returncode == 0 and sorted(line.split()[0] for line in state.splitlines() if line.split()[1:] == ["idle"]) == self.names:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the Slurm nodes did not come up idle within {timeout:.0f}s (sinfo: {state!r}): {self._tail('slurmctld')}")

    def stop(self) -> None:
        """Stop every daemon (slurmd first, munged last) and undo /etc/hosts; the temp folder stays for post-mortems."""
        order = [n for n in self.procs if n.startswith("slurmd")] + [n for n in ("slurmctld", "munged") if n in self.procs]
        for name in order:
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self.procs.clear()
        self._unmap_hosts()

    # ------------------------------------------------------------------ jobs

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Reason, Restarts, ExitCode, BatchHost, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def release(self, job_id: str, timeout: float = 120) -> None:
        """Start a requeued job now rather than after Slurm's ~2 minute hold (the hold is what protects it from
        the race below). First its last run must be gone from the nodes, and the new credential must come from a
        later second than the old one's revocation: slurmd compares whole seconds, and a job started in the same
        second is killed as "non-startable: Job credential revoked"."""
        self._wait_idle(timeout)
        time.sleep(1.05 - time.time() % 1)  # into the next whole second after the nodes went idle
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def wait_job(self, job_id: str, until, timeout: float, what: str) -> dict[str, str]:
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not reach {what} within {timeout:.0f}s: {info}")


if __name__ == "__main__":
    reason = missing()
    if reason:
        raise SystemExit(reason)
    cluster = LocalSlurm().start()
    print(f"export SLURM_CONF={cluster.conf}   # logs in {cluster.root}/log; Ctrl-C stops the cluster", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.stop()
