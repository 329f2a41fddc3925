"""A real multi-node Ray cluster on loopback, for tests: a head and workers as separate `ray start` processes.

Each cluster lives in its own short temp folder (Ray's sockets need a short path) with its own HOME,
RAY_TMPDIR and token (token authentication on, as `ray start --head` has it by default), and is stopped
by PID afterwards: every process it started carries ``MIMICSHIELD_TEST_CLUSTER=<folder>`` in its
environment, which is how `stop()` finds them (never `ray stop`, which would stop any cluster on the
machine). A plain `ray.init()` in the test process would join nothing: the cluster's address is passed
explicitly.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

MARK = "MIMICSHIELD_TEST_CLUSTER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with(mark: str) -> list[int]:
    """PIDs of this user's processes whose environment holds MARK=mark."""
    needle = f"{MARK}={mark}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


class LocalRayCluster:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="msr-", dir="/tmp"))
        (self.root / "home").mkdir()
        self.token = self.root / "token"
        self.token.write_text(uuid.uuid4().hex)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "HOME": str(self.root / "home"), "RAY_TMPDIR": str(self.root / "t"),
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token),
                    "RAY_USAGE_STATS_ENABLED": "0", MARK: str(self.root)}
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
            self.env.pop(name, None)
        self.raylets: list[int] = []  # raylet PIDs, head first

    def _ray_start(self, *args: str) -> None:
        before = set(self._raylet_pids())
        subprocess.run(["ray", "start", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", *args],
                       env=self.env, check=True, capture_output=True, timeout=120)
        new = set(self._raylet_pids()) - before
        assert len(new) == 1, new
        self.raylets.append(new.pop())

    def _raylet_pids(self) -> list[int]:
        out = []
        for pid in processes_with(str(self.root)):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    out.append(pid)
            except OSError:
                pass
        return out

    def start_head(self, num_cpus: float = 0) -> None:
        self._ray_start("--head", "--port", str(self.port), "--num-cpus", f"{num_cpus:g}",
                        "--temp-dir", str(self.root / "t"), "--include-dashboard=false")

    def add_worker(self, num_cpus: float) -> None:
        self._ray_start("--address", self.address, "--num-cpus", f"{num_cpus:g}")

    def raylet_of(self, pid: int) -> int | None:
        """The raylet (one of ours) that `pid` descends from."""
        while pid > 1:
            if pid in self.raylets:
                return pid
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                return None
        return None

    def kill_node(self, raylet: int) -> None:
        """SIGKILL a node's raylet, as a lost machine looks to Ray."""
        os.kill(raylet, signal.SIGKILL)

    def stop(self) -> None:
        for _ in range(3):
            pids = processes_with(str(self.root))
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
