"""Starting and stopping real servers: failed starts, metrics of their own, restarts after a crash,
signals to ``lstm-serve serve``, the last applied step across a clean restart."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from service.results import Outputs, StepDone
from service.sessions import AppliedStep
from service.snapshot import read_snapshot, step_from_json, step_to_json, write_snapshot
from service.state_blob import SessionState
from tests.servers import (
    PROCESS_GROUPS,
    PROCESSES,
    bentoml_server,
    free_port,
    kill_hard,
    lstm_serve_command,
    run_server_to_exit,
    serve_command,
)
from tests.test_server import metric, post

VALUES = [[0.5], [-0.58], [1.73]]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_snapshot_carries_the_last_applied_step_exactly(tmp_path: Path) -> None:
    import torch

    outputs = Outputs([[0.1 + 1e-17], [1 / 3]], [[2.5], [0.7]], [None, [-1e-300]], None)
    step = AppliedStep(7, bytes(range(16)), StepDone(9, outputs))
    state = SessionState(torch.zeros(2, 4), torch.ones(2, 4), torch.zeros(1), torch.ones(1))
    header = {"session_id": "s", "last_step": step_to_json(step, 1234.5)}
    write_snapshot(tmp_path / "snap", [(header, state)])
    [(read, _)] = read_snapshot(tmp_path / "snap")
    assert step_from_json(read["last_step"]) == (step, 1234.5)


def shipped_dir_corrupted(tmp_path: Path) -> Path:
    from tests.conftest import SHIPPED

    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "card.json").write_bytes((SHIPPED / "card.json").read_bytes())
    (bad / "model.safetensors").write_bytes((SHIPPED / "model.safetensors").read_bytes()[:1000])
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["bentoml serve", "lstm-serve serve"])
@pytest.mark.parametrize("failure", ["unknown model tag", "bad checkpoint", "port taken"])
def test_a_failed_start_exits_non_zero_in_a_few_lines_saying_what_to_do(
    entry: str, failure: str, tmp_path: Path
) -> None:
    entry_command = serve_command if entry == "bentoml serve" else lstm_serve_command
    extra: list[str] = []
    env: dict[str, str] = {}
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server's socket
        holder.bind(("127.0.0.1", 0))
        port = int(holder.getsockname()[1])
        if failure == "unknown model tag":
            env["LSTM_MODEL_TAG"] = "no-such-model:v1"
            todo = "python -m service.model_registry import"
        elif failure == "bad checkpoint":
            bad = shipped_dir_corrupted(tmp_path)
            env["LSTM_MODEL_DIR"] = str(bad)
            if entry == "lstm-serve serve":
                extra = ["--model-dir", str(bad)]
            todo = "checkpoint directory"
        else:
            holder.listen()
            todo = "--port 3001"
        if failure != "port taken":
            holder.close()  # the port was only reserved
        done = run_server_to_exit(env, command=lambda p: [*entry_command(p), *extra], port=port)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert len(output.splitlines()) < 15, output
    assert "Traceback" not in output
    assert todo in output


@pytest.mark.slow
def test_a_second_server_on_the_same_snapshot_refuses_to_start(tmp_path: Path) -> None:
    """Two servers from one checkout share LSTM_SNAPSHOT_PATH's default: the second restored the
    first's sessions and removed the journal it was writing, so the first's answered steps were
    gone at its crash (found by an outside test run). Now the second refuses in a line or two,
    and the first's journal stays."""
    env = {"LSTM_SNAPSHOT_PATH": str(tmp_path / "s.snapshot"), "LSTM_JOURNAL": "write"}
    with bentoml_server(env) as first:
        assert post(first, "/v1/sessions/create", {"session_id": "kept"}).status_code == 200
        journals = sorted(p.name for p in tmp_path.glob("s.snapshot.journal.*"))
        assert journals
        second = run_server_to_exit(env)
        output = second.stdout + second.stderr
        assert second.returncode != 0, output
        assert "is in use by another server" in output and "LSTM_SNAPSHOT_PATH" in output
        # the pid that stops it: its arbiter's (a worker killed alone is restarted)
        assert f"(pid {PROCESS_GROUPS[first]}, worker " in output, output
        assert len(output.splitlines()) < 15 and "Traceback" not in output, output
        assert sorted(p.name for p in tmp_path.glob("s.snapshot.journal.*")) == journals
        step = {"session_id": "kept", "inputs": [[0.5]], "seq": 0}
        assert post(first, "/v1/sessions/step", step).status_code == 200
        kill_hard(first)
    with bentoml_server(env) as again:  # the step answered after the refused start survived
        assert post(again, "/v1/sessions/get", {"session_id": "kept"}).json()["t"] == 1


@pytest.mark.slow
def test_each_server_keeps_its_own_metrics() -> None:
    # Every server of a test run shares one BENTOML_HOME, as two started from one checkout do.
    with bentoml_server() as first:
        assert post(first, "/v1/sessions/create", {"session_id": "mine"}).status_code == 200

        def intact() -> None:
            assert metric(first, "lstm_sessions_created_total") == 1
            assert metric(first, "lstm_sessions_active") == 1
            assert metric(first, "lstm_store_up") == 1
            assert metric(first, "lstm_state_memory_bytes") > 0

        intact()
        with bentoml_server() as second:
            intact()
            assert metric(second, "lstm_sessions_created_total") == 0
        intact()
        failed = run_server_to_exit({"LSTM_MODEL_TAG": "no-such-model:v1"})
        assert failed.returncode != 0
        intact()


@pytest.mark.slow
def test_lstm_serve_restarts_at_once_after_a_crash() -> None:
    port = free_port()
    with httpx.Client() as client:  # a connection that stays open across the crash
        with bentoml_server(command=lstm_serve_command, port=port) as url:
            assert client.post(f"{url}/v1/sessions/create", json={}).status_code == 200
            kill_hard(url)
        held = [
            c
            for c in psutil.net_connections("tcp")
            if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN
        ]
        assert held, "the crash left no socket on the port: the test proves nothing"
        started = time.monotonic()
        with bentoml_server(command=lstm_serve_command, port=port, timeout_s=45) as url:
            assert post(url, "/v1/sessions/create", {}).status_code == 200
        assert time.monotonic() - started < 45


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_lstm_serve_stops_the_whole_server_writing_the_snapshot(
    signum: signal.Signals, tmp_path: Path
) -> None:
    env = {"LSTM_SNAPSHOT_PATH": str(tmp_path / "s.snapshot")}
    port = free_port()
    with bentoml_server(env, command=lstm_serve_command, port=port) as url:
        post(url, "/v1/sessions/create", {"session_id": "kept"})
        assert post(url, "/v1/sessions/step", {"session_id": "kept", "inputs": VALUES}).is_success
        proc = PROCESSES[url]
        proc.send_signal(signum)  # to lstm-serve's pid only, as `kill PID` does
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while listening(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not listening(port), "the server kept serving after lstm-serve was stopped"
    assert (tmp_path / "s.snapshot").exists()
    with bentoml_server(env) as url:
        assert post(url, "/v1/sessions/get", {"session_id": "kept"}).json()["t"] == len(VALUES)


@pytest.mark.slow
def test_a_retry_after_a_clean_restart_gets_the_same_answer(tmp_path: Path) -> None:
    env = {"LSTM_SNAPSHOT_PATH": str(tmp_path / "s.snapshot")}
    step: dict[str, Any] = {"session_id": "retried", "seq": 0, "inputs": VALUES}
    with bentoml_server(env) as url:
        post(url, "/v1/sessions/create", {"session_id": "retried"})
        first = post(url, "/v1/sessions/step", step)
        assert first.status_code == 200
    with bentoml_server(env) as url:
        again = post(url, "/v1/sessions/step", step)
        assert again.status_code == 200, again.text
        assert again.json() == first.json()
        assert post(url, "/v1/sessions/get", {"session_id": "retried"}).json()["t"] == len(VALUES)
        assert metric(url, "lstm_idempotent_replays_total") == 1
        later = post(url, "/v1/sessions/step", {**step, "inputs": [[0.0]]})
        assert later.status_code == 409  # the same seq with other inputs is still refused


@pytest.mark.slow
def test_lstm_serve_serves_the_model_its_model_dir_names(tmp_path: Path) -> None:
    import json

    from tests.conftest import SHIPPED

    other = tmp_path / "other-model"
    other.mkdir()
    card = json.loads((SHIPPED / "card.json").read_text())
    (other / "card.json").write_text(json.dumps({**card, "name": "other-forecaster"}))
    (other / "model.safetensors").write_bytes((SHIPPED / "model.safetensors").read_bytes())

    def command(port: int) -> list[str]:
        return [*lstm_serve_command(port), "--model-dir", str(other)]

    with bentoml_server(command=command, log=tmp_path / "log") as url:
        assert post(url, "/v1/model", {}).json()["name"] == "other-forecaster"
