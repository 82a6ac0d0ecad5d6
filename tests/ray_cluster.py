"""A real two-node Ray cluster on loopback, for tests: head on 127.0.0.2, a worker node on 127.0.0.3.

A test session starts one (``SharedCluster``, conftest's ``cluster`` fixture), on first use, and every test
that needs a cluster shares it: starting one costs about 20 s and stopping it about 10 s here. Each driver a
test starts is its own Ray job, so tests do not see each other's actors. Both nodes are ``ray start`` processes with their own CPUs, so work really
crosses a node boundary (127.0.0.1 would make Ray swap in the host's address;
127.0.0.2/3 stay on loopback). Teardown stops only what this cluster started:
the processes whose command line names its temp dir or its head address, found
by process id, never a broad ``ray stop``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from conftest import free_port

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}  # the same in every node and in the driver (FACTS.md)


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _cmdline(pid: int) -> str:
    """A process's command line ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cluster_pids(marks: list[str]) -> list[int]:
    """Processes whose command line contains one of ``marks``."""
    pids = (int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit())
    return [pid for pid in pids if pid != os.getpid() and any(m in _cmdline(pid) for m in marks)]


def _running(pid: int) -> bool:
    """Alive and not a zombie: a stopped process whose parent never reaps it still has its /proc entry."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _with_descendants(pids: list[int]) -> list[int]:
    kids, out, todo = _children(), [], list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo.extend(kids.get(pid, []))
    return out


def worker_pids(marks: list[str], name: str) -> list[int]:
    """Processes of this cluster whose command line mentions ``name`` (an actor class, a task).

    Ray workers rename themselves (``ray::ExtractActor``), dropping the marks, so
    the cluster's processes are searched together with their descendants.
    """
    return [pid for pid in _with_descendants(cluster_pids(marks)) if name in _cmdline(pid)]


class Cluster:
    def __init__(self, address: str, temp_dir: str, env: dict[str, str], dashboard: str | None = None):
        self.address, self.temp_dir, self.env = address, temp_dir, env
        self.dashboard = dashboard  # http://HOST:PORT of the job server, with two_node_cluster(dashboard=True)

    @property
    def marks(self) -> list[str]:
        return [self.temp_dir, self.address]

    def nodes_alive(self) -> bool:
        """Both raylets and the head's GCS still run: a test that killed a worker or a driver leaves this true."""
        names = [_cmdline(pid).split(" ", 1)[0] for pid in cluster_pids(self.marks)]
        return sum(n.endswith("/raylet") for n in names) == 2 and any(n.endswith("/gcs_server") for n in names)

    def stop(self) -> None:
        # The GCS and the log monitors take several seconds over SIGTERM; what is left after 5 s is killed.
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            pids = _with_descendants(cluster_pids(self.marks))
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while pids and time.time() < deadline and any(_running(p) for p in pids):
                time.sleep(0.1)


@contextmanager
def two_node_cluster(cpus_per_node: int = 1, dashboard: bool = False, extra_env: dict[str, str] | None = None):
    """Start the cluster; with ``dashboard`` the head also serves the job API (``ray job submit``) on a free port.

    ``extra_env`` goes to both nodes (so to every Ray worker) and to ``Cluster.env`` for the drivers: the S3
    server's endpoint and credentials, which workers read from their own environment.
    """
    # A short path: Ray's unix sockets live under the temp dir and their paths are limited to ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    port = free_port(HEAD_IP)
    address = f"{HEAD_IP}:{port}"
    # this cluster's own token
    env = {**os.environ, **(extra_env or {}), **ENV, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head_extra = ["--include-dashboard", "false"]
    dashboard_url = None
    if dashboard:
        dash_port = free_port(HEAD_IP)
        head_extra = ["--include-dashboard", "true", "--dashboard-host", HEAD_IP, "--dashboard-port", str(dash_port)]
        dashboard_url = f"http://{HEAD_IP}:{dash_port}"
    cluster = Cluster(address, temp_dir, env, dashboard_url)
    common = ["--num-cpus", str(cpus_per_node), "--num-gpus", "0", "--disable-usage-stats"]
    try:
        # Each node's dashboard agent on a port of its own: on Ray's default (52365, which an agent also binds on
        # 127.0.0.1) it would contend with a local Ray instance that a test in the other pytest worker starts, and
        # a node without its agent takes no `ray job submit`.
        subprocess.run(
            [
                _ray(),
                "start",
                "--head",
                "--node-ip-address",
                HEAD_IP,
                "--port",
                str(port),
                "--temp-dir",
                temp_dir,
                *head_extra,
                *common,
                "--dashboard-agent-listen-port",
                str(free_port()),
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [
                _ray(),
                "start",
                "--address",
                address,
                "--node-ip-address",
                WORKER_IP,
                *common,
                "--dashboard-agent-listen-port",
                str(free_port()),
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


class SharedCluster:
    """The session's cluster: started by the first test that asks, started again if a test left a node dead.

    Tests hold this object, not a ``Cluster``: after a restart its address, env and marks name the new one.
    """

    def __init__(self, **options):
        self.options = options
        self._stack: ExitStack | None = None
        self._cluster: Cluster | None = None

    def start(self) -> SharedCluster:
        self._current()
        return self

    def _current(self) -> Cluster:
        if self._cluster is None:
            self._stack = ExitStack()
            self._cluster = self._stack.enter_context(two_node_cluster(**self.options))
        return self._cluster

    address = property(lambda self: self._current().address)
    env = property(lambda self: self._current().env)
    marks = property(lambda self: self._current().marks)
    dashboard = property(lambda self: self._current().dashboard)

    def restore(self) -> None:
        """After a test: if a node or the GCS is gone, stop what is left; the next test starts a fresh cluster."""
        if self._cluster is not None and not self._cluster.nodes_alive():
            self.close()

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack = self._cluster = None
