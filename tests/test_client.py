"""The Python client against the service in process: sessions, streaming, safe retries."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from client import APIError, LSTMClient

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

VALUES = [[v] for v in (0.4, -0.6, 1.7, -0.6, -0.58, 1.73, 0.0, -0.2, 0.9)]


@pytest.fixture
def http(asgi_client: TestClient) -> TestClient:
    return asgi_client


class LosesOneStepAnswer:
    """An HTTP client whose first request to ``route`` reaches the server, its answer lost."""

    def __init__(self, http: TestClient, route: str = "/step") -> None:
        self.http = http
        self.route = route
        self.lost = 0

    def post(self, route: str, **kwargs: Any) -> httpx.Response:
        response = self.http.post(route, **kwargs)
        if route.endswith(self.route) and not self.lost:
            self.lost += 1
            raise httpx.ReadTimeout("the answer was lost on the way back")
        return response

    def close(self) -> None:
        pass


def test_session_stream_equals_predict_and_is_deleted_on_exit(http: TestClient) -> None:
    api = LSTMClient(http=http)
    whole = api.predict(VALUES)["outputs"]
    with api.session("client-1") as session:
        streamed = list(session.stream([VALUES[:2], VALUES[2:3], VALUES[3:]]))
        assert session.t == len(VALUES) == session.info()["t"]
        forecast = session.forecast(3)["forecast"]
    for a, b in zip(streamed, whole, strict=True):
        assert a["mean"][0] == pytest.approx(b["mean"][0], abs=1e-5)
    assert forecast[0]["mean"] == streamed[-1]["mean"]
    with pytest.raises(APIError) as gone:
        api.attach("client-1")
    assert gone.value.status == 404 and gone.value.code == "session_not_found"


def test_a_lost_answer_is_retried_with_seq_and_applied_once(http: TestClient) -> None:
    flaky = LosesOneStepAnswer(http)
    api = LSTMClient(http=flaky, backoff_s=0)  # type: ignore[arg-type]
    with api.session("client-retry") as session:
        first = session.step(VALUES[:3])
        assert flaky.lost == 1  # the first answer never arrived; the retry got the replay
        assert first["t"] == 3 == session.info()["t"]  # applied once, not twice
        second = session.step(VALUES[3:5])
        assert second["t"] == 5
    reference = LSTMClient(http=http).predict(VALUES[:5])["outputs"]
    got = first["outputs"] + second["outputs"]
    for a, b in zip(got, reference, strict=True):
        assert a["mean"][0] == pytest.approx(b["mean"][0], abs=1e-5)


def test_a_lost_create_answer_is_retried_into_the_session_it_made(http: TestClient) -> None:
    flaky = LosesOneStepAnswer(http, route="/create")
    api = LSTMClient(http=flaky, backoff_s=0)  # type: ignore[arg-type]
    with api.session("client-create") as session:
        assert flaky.lost == 1 and session.t == 0
        assert session.step(VALUES[:2])["t"] == 2
    with pytest.raises(APIError):
        LSTMClient(http=http).attach("client-create")  # deleted on exit: one session, not two


def test_errors_raise_with_their_code(http: TestClient) -> None:
    api = LSTMClient(http=http)
    with api.session("client-bad") as session:
        with pytest.raises(APIError) as bad:
            session.step([[1.0, 2.0]])
        assert bad.value.status == 422 and bad.value.code == "wrong_feature_count"
        assert bad.value.details["expected"] == 1
        assert session.t == 0


def test_cli_serve_says_what_to_do_when_the_port_is_taken() -> None:
    import socket

    cli = Path(sys.executable).with_name("lstm-serve")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [str(cli), "serve", "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr


def results_fingerprint(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.iterdir())}


@pytest.mark.slow
def test_benchmarks_leave_the_committed_results_alone_unless_asked_to_record() -> None:
    recorded = ROOT / "bench" / "results"
    before = results_fingerprint(recorded)
    runs = ROOT / "runs" / "bench"
    cli = Path(sys.executable).with_name("lstm-serve")
    smallest = {  # each script at its fastest settings
        "lstm-serve bench": [str(cli), "bench", "--", "--quick", "--device", "cpu", "--steps", "1"],
        "scale_bench": [
            sys.executable,
            str(ROOT / "bench" / "scale_bench.py"),
            *("--sizes", "100", "--seconds", "0.1"),
        ],
    }
    for name, command in smallest.items():
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0, (name, done.stderr)
        wrote = [line for line in done.stdout.splitlines() if line.startswith("wrote ")]
        assert wrote and str(runs) in wrote[-1], (name, done.stdout[-500:])  # says where
        assert Path(wrote[-1].split()[1]).is_file()
    assert results_fingerprint(recorded) == before


def test_the_load_benchmark_writes_the_committed_results_only_with_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("load_bench", ROOT / "bench" / "load_bench.py")
    assert spec and spec.loader
    load_bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "load_bench", load_bench)  # its dataclasses look it up
    spec.loader.exec_module(load_bench)
    monkeypatch.setattr(sys, "argv", ["load_bench.py", "--quick"])
    plain = load_bench.parse_args()
    monkeypatch.setattr(sys, "argv", ["load_bench.py", "--quick", "--record"])
    recording = load_bench.parse_args()
    assert plain.out.parent == plain.plot.parent == ROOT / "runs" / "bench"
    assert recording.out == ROOT / "bench" / "results" / "load_bench.json"
    assert recording.plot == ROOT / "bench" / "results" / "load_bench.png"


# --- lstm-serve stream: a bad CSV or option stops it in one line, never a traceback ------------


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


METER_ROWS = [f"m{i % 2},{i // 2},{(i * 37 % 11) / 5 - 1:.2f}" for i in range(12)]


def run_stream(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from client.cli import main

    status = main(["stream", *argv, "--quiet"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize(
    ("header", "options", "says"),
    [
        ("series_id,time,kwh", ["--id-col", "meter"], "no column 'meter' (--id-col)"),
        ("series_id,t,kwh", [], "no column 'time' (--time-col); its columns: series_id, t, kwh"),
        ("", [], "its columns: none"),
    ],
)
def test_cli_stream_refuses_a_missing_column_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    header: str,
    options: list[str],
    says: str,
) -> None:
    source = write_csv(tmp_path / "in.csv", header, METER_ROWS if header else [])
    # Checked before any request: the URL has no server behind it.
    status, out, err = run_stream([str(source), "--url", "http://127.0.0.1:9", *options], capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("lstm-serve: ") and says in err, err


def test_cli_stream_of_a_missing_file_or_server_says_so_without_a_traceback(
    tmp_path: Path,
) -> None:
    cli = Path(sys.executable).with_name("lstm-serve")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(cli), "stream", *argv], capture_output=True, text=True)

    gone = run(str(tmp_path / "nope.csv"))
    assert gone.returncode == 2 and gone.stderr.count("\n") == 1
    assert "cannot read" in gone.stderr and "No such file" in gone.stderr
    source = write_csv(tmp_path / "in.csv", "series_id,time,kwh", METER_ROWS)
    down = run(str(source), "--url", "http://127.0.0.1:9", "--quiet")
    assert down.returncode == 1 and down.stderr.count("\n") == 1, down.stderr
    assert "cannot read the model card at http://127.0.0.1:9" in down.stderr
    assert "Traceback" not in gone.stderr + down.stderr


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    from tests.servers import bentoml_server

    with bentoml_server() as url:
        yield url


@pytest.mark.slow
def test_cli_stream_warns_when_the_csv_s_columns_are_not_the_model_s_features(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the shipped model's one feature is "power": a "kwh" column streams, with a warning
    other = write_csv(tmp_path / "kwh.csv", "series_id,time,kwh", METER_ROWS)
    status, out, err = run_stream([str(other), "--url", server], capsys)
    assert status == 0 and len(out.splitlines()) == 1 + len(METER_ROWS)
    assert err.count("\n") == 1 and err.startswith("lstm-serve: warning: "), err
    assert "['kwh']" in err and "['power']" in err and "acsf1-forecaster:" in err
    own = write_csv(tmp_path / "power.csv", "series_id,time,power", METER_ROWS)
    status, out, err = run_stream([str(own), "--url", server], capsys)
    assert status == 0 and len(out.splitlines()) == 1 + len(METER_ROWS)
    assert err == ""  # the model's own column name: nothing to warn about


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rows", "options", "says", "code"),
    [
        (METER_ROWS, ["--value-cols", "watts"], "no column 'watts' (--value-cols)", 2),
        (["m0,0,1.5", "m0,1,lots"], [], "in.csv:3: could not convert string to float", 2),
        (METER_ROWS, ["--value-cols", "power,power"], "the model takes 1", 2),
        (METER_ROWS, ["--chunk", "100000"], "over the service's limit of 512", 2),
        (METER_ROWS, ["--out", "/nonexistent/dir/out.csv"], "cannot write /nonexistent/dir", 2),
        # kept sessions are named after their series: this id is one the service refuses
        (["bad id!,0,1.5"], ["--keep"], "series 'bad id!': the service answered 422", 2),
    ],
)
def test_cli_stream_refuses_bad_input_in_one_line(
    server: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rows: list[str],
    options: list[str],
    says: str,
    code: int,
) -> None:
    source = write_csv(tmp_path / "in.csv", "series_id,time,power", rows)
    status, _, err = run_stream([str(source), "--url", server, *options], capsys)
    assert status == code
    assert err.count("\n") == 1 and err.startswith("lstm-serve: ") and says in err, err
