"""Start real ``bentoml serve`` processes for the slow tier; stop them whatever happens."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


PROCESS_GROUPS: dict[str, int] = {}  # server URL -> process group, for kill -9 tests
PROCESSES: dict[str, subprocess.Popen[bytes]] = {}  # server URL -> the process started


# Lines a test wants in the run's output whatever the capture (the containers' timings, what was
# not started): conftest prints them in the terminal summary. Here, not in conftest, so that the
# tests and conftest share one key (conftest is imported under a name of its own).
REPORT = pytest.StashKey[list[str]]()


def kill_hard(url: str) -> None:
    """kill -9 a server started by bentoml_server: its arbiter and its workers at once.

    BentoML's workers run in sessions of their own, so killing the arbiter's process group would
    leave them serving: kill every descendant by pid.
    """
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        arbiter = psutil.Process(PROCESS_GROUPS[url])
        for proc in [*arbiter.children(recursive=True), arbiter]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(port: int) -> list[str]:
    bentoml = Path(sys.executable).with_name("bentoml")
    return [
        str(bentoml),
        "serve",
        "service.service:LSTMSessions",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def lstm_serve_command(port: int) -> list[str]:
    """``lstm-serve serve``, what ``make serve`` runs."""
    return [sys.executable, "-m", "client.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]


def server_env(env: dict[str, str] | None) -> dict[str, str]:
    """The test's environment for a server: its own snapshot file, bentoml's own metrics dir."""
    snapshot = tempfile.mktemp(prefix="lstm-snapshot-")  # a path the server creates
    full_env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "true",
        "LSTM_SNAPSHOT_PATH": snapshot,
        **(env or {}),
    }
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # bentoml serve sets its own
    return full_env


@contextlib.contextmanager
def bentoml_server(
    env: dict[str, str] | None = None,
    *,
    timeout_s: float = 60.0,
    log: Path | None = None,
    command: Callable[[int], list[str]] = serve_command,
    port: int | None = None,
    fd_limit: int | None = None,
) -> Iterator[str]:
    """A real server on a (free) loopback port (or ``port``: a replica restarted where a proxy
    expects it); yields its base URL once /readyz answers 200.

    ``fd_limit``: the server's RLIMIT_NOFILE, soft and hard (lowered only: a test may exhaust it).
    """
    import psutil

    port = port or free_port()
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115

    def limit_fds() -> None:
        import resource

        if fd_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    proc = subprocess.Popen(
        command(port),
        cwd=ROOT,
        env=server_env(env),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=limit_fds if fd_limit is not None else None,
    )
    url = f"http://127.0.0.1:{port}"
    PROCESS_GROUPS[url] = proc.pid
    PROCESSES[url] = proc
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"bentoml serve not ready within {timeout_s} s")
            time.sleep(0.2)
        # Taken now: a test may stop the server's first process, which would hide the others.
        with contextlib.suppress(psutil.NoSuchProcess):
            workers = psutil.Process(proc.pid).children(recursive=True)
        yield url
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            workers += psutil.Process(proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # a clean stop: the arbiter stops its workers
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _, alive = psutil.wait_procs(workers, timeout=10)
        for worker in alive:  # workers live in sessions of their own: never leave one behind
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        if log:
            out.close()  # type: ignore[union-attr]


def run_server_to_exit(
    env: dict[str, str],
    timeout_s: float = 60,
    command: Callable[[int], list[str]] = serve_command,
    port: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Start a server expected to refuse to start; return how it ended."""
    return subprocess.run(
        command(port or free_port()),
        cwd=ROOT,
        env=server_env(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def need_binary(name: str) -> str:
    """The path of a Debian-packaged binary a test needs: skip locally, fail under CI."""
    import shutil

    import pytest

    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing under CI: .ci/run must install it")
        pytest.skip(f"{name} is not installed (apt-get install it, or run .ci/run)")
    return path


class RedisServer:
    """A real redis-server on a free loopback port, append-only persistence in ``directory``
    (fsynced as ``appendfsync`` says: always, unless a benchmark compares)."""

    def __init__(self, directory: Path, appendfsync: str = "always") -> None:
        self.binary = need_binary("redis-server")
        self.directory = directory
        self.appendfsync = appendfsync
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                self.appendfsync,
                "--dir",
                str(self.directory),
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
            self.proc = None


def cluster_ports(n: int) -> list[int]:
    """Free loopback ports for cluster nodes: each at most 55535, and its cluster bus port (the
    port + 10000) free too."""
    import random

    found: list[int] = []
    while len(found) < n:
        port = random.randint(20_000, 45_000)
        if port in found:
            continue
        try:
            for p in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        found.append(port)
    return found


class RedisClusterServers:
    """A real Redis Cluster on loopback: three masters and three replicas of Debian's
    redis-server, each its own process (``kill`` one, ``start`` it again: it rejoins)."""

    def __init__(self, directory: Path, node_timeout_ms: int = 1000) -> None:
        self.binary = need_binary("redis-server")
        self.cli = need_binary("redis-cli")
        self.directory = directory
        self.node_timeout_ms = node_timeout_ms
        self.ports = cluster_ports(6)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def start_node(self, port: int) -> None:
        node_dir = self.directory / str(port)
        node_dir.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
                str(node_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_for(lambda: self.command(port, "PING") == "PONG", f"node {port} to start")

    def command(self, port: int, *args: str) -> str:
        done = subprocess.run(
            [self.cli, "-p", str(port), *args], capture_output=True, text=True, timeout=10
        )
        return done.stdout.strip()

    @staticmethod
    def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                if check():
                    return
            time.sleep(0.1)
        raise TimeoutError(f"waited {timeout_s} s for {what}")

    def start(self) -> None:
        for port in self.ports:
            self.start_node(port)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        done = subprocess.run(
            [self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        self.wait_for(lambda: self.healthy(replicated=True), "the cluster to be ok")

    def healthy(self, replicated: bool = False) -> bool:
        """Every live node says ok and three live masters serve all the slots; ``replicated``:
        and each master has a replica in sync (WAIT 1 answers only then)."""
        live = [p for p, proc in self.procs.items() if proc.poll() is None]
        if not all("cluster_state:ok" in self.command(p, "CLUSTER", "INFO") for p in live):
            return False
        masters = self.masters()
        if replicated:
            info = [self.command(p, "INFO", "replication") for p in masters]
            return len(masters) == 3 and all("state=online" in i for i in info)
        return len(masters) == 3

    def masters(self) -> list[int]:
        """The ports of the live masters that hold slots."""
        found = []
        asked = next(p for p, proc in self.procs.items() if proc.poll() is None)
        for line in self.command(asked, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            live = "fail" not in fields[2] and fields[7] == "connected"
            if "master" in fields[2] and live and len(fields) > 8:
                found.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return found

    def kill(self, port: int) -> None:
        self.procs[port].kill()  # SIGKILL: no shutdown, no last write
        self.procs[port].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.procs.clear()
