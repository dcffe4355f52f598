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
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def bentoml_server(
    env: dict[str, str] | None = None,
    *,
    timeout_s: float = 60.0,
    log: Path | None = None,
) -> Iterator[str]:
    """A real server on a free loopback port; yields its base URL once /readyz answers 200."""
    port = free_port()
    bentoml = Path(sys.executable).with_name("bentoml")
    snapshot = tempfile.mktemp(prefix="lstm-snapshot-")
    full_env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "true",
        "LSTM_SNAPSHOT_PATH": snapshot,
        **(env or {}),
    }
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # bentoml serve sets its own
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(bentoml),
            "serve",
            "service.service:LSTMSessions",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=full_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
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
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


def run_server_to_exit(
    env: dict[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """Start a server expected to refuse to start; return how it ended."""
    bentoml = Path(sys.executable).with_name("bentoml")
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **env}
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return subprocess.run(
        [
            str(bentoml),
            "serve",
            "service.service:LSTMSessions",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
