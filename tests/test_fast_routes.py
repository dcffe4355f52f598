"""The hot routes in front of BentoML (service/fast_routes.py): in process, that they answer what
they must and pass everything else on; against real servers, that a server with them answers
every body exactly as one without them (``LSTM_FAST_ROUTES=false``: BentoML's stack), and keeps
BentoML's request metrics and the one-line refusal log."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

from service.fast_routes import FastRoutes
from service.schemas import Step
from tests.servers import bentoml_server

# --- in process ------------------------------------------------------------------------------


class FakeMetrics(RunnerTrafficMetricsMiddleware):
    """BentoML's metrics middleware, set up with metric objects that record what they were told."""

    class Child:
        def __init__(self) -> None:
            self.values: list[float] = []

        def inc(self, n: float = 1) -> None:
            self.values.append(n)

        def dec(self, n: float = 1) -> None:
            self.values.append(-n)

        def observe(self, v: float) -> None:
            self.values.append(v)

        def set(self, v: float) -> None:
            self.values.append(v)

    class Family:
        def __init__(self) -> None:
            self.children: dict[tuple[Any, ...], FakeMetrics.Child] = {}

        def labels(self, **labels: Any) -> FakeMetrics.Child:
            key = tuple(sorted(labels.items()))
            return self.children.setdefault(key, FakeMetrics.Child())

    def __init__(self, app: Any) -> None:  # no super(): its metrics would be registered
        self.app = app
        self._is_setup = True
        self.metrics_request_total = FakeMetrics.Family()
        self.metrics_request_duration = FakeMetrics.Family()
        self.metrics_request_in_progress = FakeMetrics.Family()
        self.metrics_last_request_timestamp = FakeMetrics.Family()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    def totals(self) -> dict[int, float]:
        return {
            dict(k)["http_response_code"]: sum(c.values)
            for k, c in self.metrics_request_total.children.items()
        }


async def inner_app(scope: Any, receive: Any, send: Any) -> None:
    """BentoML's place: answers 299 so a test sees who answered."""
    await send({"type": "http.response.start", "status": 299, "headers": []})
    await send({"type": "http.response.body", "body": b"inner"})


def make(handler: Any = None, *, timeout_s: float = 5.0) -> tuple[FastRoutes, FakeMetrics]:
    metrics = FakeMetrics(inner_app)

    async def echo(body: Step) -> Any:
        return {"session_id": body.session_id, "n": len(body.inputs)}

    fast = FastRoutes(
        metrics,
        {"/v1/sessions/step": (Step, handler or echo)},
        max_body_bytes=1024,
        timeout_s=timeout_s,
        refused_at_edge=lambda path, code: refused.append(code),
    )
    refused: list[str] = []
    fast.refused = refused  # type: ignore[attr-defined]
    return fast, metrics


def call(
    app: FastRoutes,
    path: str,
    chunks: list[bytes],
    headers: list[tuple[bytes, bytes]] | None = None,
    method: str = "POST",
) -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": headers if headers is not None else [(b"content-type", b"application/json")],
    }
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


GOOD = b'{"session_id": "a", "inputs": [[0.5], [0.25]], "seq": 0}'


def test_step_is_answered_in_front_and_counted_in_bentomls_metrics() -> None:
    app, metrics = make()
    status, body = call(app, "/v1/sessions/step", [GOOD])
    assert (status, body) == (200, b'{"session_id":"a","n":2}')
    assert metrics.totals() == {200: 1}
    (gauge,) = metrics.metrics_last_request_timestamp.children.values()
    assert len(gauge.values) == 1 and abs(gauge.values[0] - time.time()) < 60
    # in progress: begun and answered within one pass of the loop, nothing to write
    assert sum(sum(g.values) for g in metrics.metrics_request_in_progress.children.values()) == 0


def test_requests_in_flight_are_in_progress_and_counts_are_written_per_pass() -> None:
    """Metric writes once per pass of the loop: what is in flight shows as in progress, and
    many requests answered in one pass are one write per status."""
    release = asyncio.Event()

    async def held(body: Step) -> Any:
        await release.wait()
        return {"ok": True}

    app, metrics = make(held)

    async def scenario() -> tuple[float, float]:
        async def one() -> None:
            messages = [{"type": "http.request", "body": GOOD, "more_body": False}]

            async def receive() -> dict[str, Any]:
                return messages.pop(0) if messages else {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                pass

            scope = {
                "type": "http",
                "method": "POST",
                "path": "/v1/sessions/step",
                "headers": [(b"content-type", b"application/json")],
            }
            await app(scope, receive, send)

        tasks = [asyncio.ensure_future(one()) for _ in range(5)]
        for _ in range(3):
            await asyncio.sleep(0)
        gauges = metrics.metrics_request_in_progress.children.values()
        during = sum(sum(g.values) for g in gauges)
        release.set()
        await asyncio.gather(*tasks)
        await asyncio.sleep(0)
        return during, sum(sum(g.values) for g in gauges)

    during, after = asyncio.run(scenario())
    assert (during, after) == (5, 0)
    ((_, total),) = metrics.metrics_request_total.children.items()
    assert total.values == [5]  # one write for the five


def test_other_routes_and_methods_go_to_bentoml() -> None:
    app, metrics = make()
    assert call(app, "/v1/sessions/get", [b"{}"]) == (299, b"inner")
    assert call(app, "/v1/sessions/step", [b""], method="GET") == (299, b"inner")
    assert metrics.totals() == {}


def test_before_bentomls_first_request_bentoml_answers() -> None:
    app, metrics = make()
    metrics._is_setup = False  # its metrics are made on its first request
    assert call(app, "/v1/sessions/step", [GOOD]) == (299, b"inner")


def test_a_body_in_chunks_is_joined() -> None:
    app, _ = make()
    assert call(app, "/v1/sessions/step", [GOOD[:10], GOOD[10:30], GOOD[30:]])[0] == 200


def test_refusals_at_the_edge_have_their_codes() -> None:
    app, metrics = make()
    big = b'{"session_id": "a", "inputs": [' + b"[0.5]," * 400 + b"[0.5]]}"
    by_length = [(b"content-type", b"application/json"), (b"content-length", b"5000")]
    cases = [
        (call(app, "/v1/sessions/step", [big]), 413, "body_too_large"),
        (call(app, "/v1/sessions/step", [big[:700], big[700:]]), 413, "body_too_large"),
        (call(app, "/v1/sessions/step", [b"{}"], by_length), 413, "body_too_large"),
        (
            call(app, "/v1/sessions/step", [GOOD], [(b"content-type", b"text/plain")]),
            415,
            "unsupported_media_type",
        ),
        (call(app, "/v1/sessions/step", [b"{nope"]), 400, "malformed_json"),
        (
            call(app, "/v1/sessions/step", [b'{"session_id": "a", "inputs": []}']),
            422,
            "empty_chunk",
        ),
    ]
    for (status, body), want_status, want_code in cases:
        assert status == want_status, body
        assert orjson.loads(body)["error"]["code"] == want_code
    assert app.refused == [c for _, _, c in cases]  # type: ignore[attr-defined]
    assert metrics.totals() == {413: 3, 415: 1, 400: 1, 422: 1}


def test_a_service_error_is_its_own_body() -> None:
    from service.errors import SessionNotFound

    async def missing(body: Step) -> Any:
        raise SessionNotFound("no session 'a'", session_id="a")

    status, body = call(make(missing)[0], "/v1/sessions/step", [GOOD])
    assert status == 404
    assert b'"code":"session_not_found"' in body


def test_past_the_deadline_504() -> None:
    async def slow(body: Step) -> Any:
        await asyncio.sleep(5)

    app, metrics = make(slow, timeout_s=0.05)
    status, body = call(app, "/v1/sessions/step", [GOOD])
    assert status == 504 and b"request_timeout" in body
    assert metrics.totals() == {504: 1}


def test_a_failure_is_a_500_in_our_shape(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(body: Step) -> Any:
        raise RuntimeError("boom")

    status, body = call(make(broken)[0], "/v1/sessions/step", [GOOD])
    assert status == 500 and b'"code":"internal_error"' in body
    assert "boom" in caplog.text  # its traceback is logged: a real failure


# --- real servers: the same answers as BentoML's stack ---------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    logs = tmp_path_factory.mktemp("fast")
    env = {"LSTM_MAX_BODY_BYTES": "4096"}
    with (
        bentoml_server(env, log=logs / "fast.log") as fast,
        bentoml_server({**env, "LSTM_FAST_ROUTES": "false"}, log=logs / "slow.log") as slow,
    ):
        yield fast, slow, logs / "fast.log"


def bodies(sid: str) -> list[tuple[str, Any]]:
    """(route, body or raw bytes), in order: each server gets the same sequence."""
    step, many, predict = "/v1/sessions/step", "/v1/sessions/step_many", "/v1/predict"
    return [
        (step, {"session_id": sid, "inputs": [[0.5]], "seq": 0}),
        (step, {"session_id": sid, "inputs": [[0.4], [1.7]], "seq": 1, "return_gates": True}),
        (step, {"session_id": sid, "inputs": [[0.4], [1.7]], "seq": 1, "return_gates": True}),
        (step, {"session_id": sid, "inputs": [[0.1]], "seq": 0}),  # seq conflict
        (step, {"session_id": sid, "inputs": [[0.1]], "seq": 2}),  # same seq, other inputs
        (step, {"session_id": "nobody", "inputs": [[0.1]]}),
        (step, {"session_id": sid, "inputs": [[0.1, 0.2]]}),
        (step, {"session_id": sid, "inputs": []}),
        (step, {"session_id": sid, "inputs": [["0.5"]]}),
        (step, {"session_id": sid, "inputs": [[1e300]]}),
        (step, {"session_id": sid, "inputs": [[0.5]], "seq": -1}),
        (step, {"session_id": sid, "inputs": [[0.5]], "extra": 1}),
        (step, {"session_id": "bad id!", "inputs": [[0.5]]}),
        (step, {"inputs": [[0.5]]}),
        (step, b'{"session_id": "x", "inputs": [[NaN]]}'),
        (step, b"{nope"),
        (step, b""),
        (step, b"[1, 2]"),
        (step, b'{"session_id": "x", "inputs": [' + b"[0.5]," * 2000 + b"[0.5]]}"),
        (
            many,
            {
                "items": [
                    {"session_id": sid, "inputs": [[0.3]], "seq": 4},
                    {"session_id": "nobody", "inputs": [[0.1]]},
                ]
            },
        ),
        (many, {"items": [{"session_id": sid, "inputs": [[0.3]], "seq": 4}]}),
        (many, {"items": []}),
        (many, {"items": [{"session_id": sid, "inputs": []}]}),
        (predict, {"inputs": [[0.5], [0.2], [-1.0]]}),
        (predict, {"inputs": [[0.5], [0.2]], "return_gates": True}),
        (predict, {"inputs": []}),
        (predict, {"inputs": [[0.1, 0.2]]}),
        (predict, {"inputs": [[0.5]], "session_id": sid}),
        (predict, b"{nope"),
        (predict, b'{"inputs": [' + b"[0.5]," * 2000 + b"[0.5]]}"),
    ]


def replay(base: str, sid: str) -> list[tuple[int, Any]]:
    got = []
    with httpx.Client(base_url=base, timeout=30) as http:
        assert http.post("/v1/sessions/create", json={"session_id": sid}).status_code == 200
        for route, body in bodies(sid):
            if isinstance(body, bytes):
                r = http.post(route, content=body, headers={"content-type": "application/json"})
            else:
                r = http.post(route, json=body)
            got.append((r.status_code, r.json()))
        r = http.post("/v1/sessions/step", content=b"{}", headers={"content-type": "text/csv"})
        got.append((r.status_code, r.json()))
    return got


def same_answers(fast: list[Any], slow: list[Any], what: str) -> list[Any]:
    """``fast``, once every answer in it is the one BentoML's stack gave (``slow``)."""
    for k, (f, s) in enumerate(zip(fast, slow, strict=True)):
        assert f == s, f"{what} {k}: in front {f} != through bentoml {s}"
    return fast


@pytest.mark.slow
def test_the_fast_routes_answer_as_bentomls_stack(servers: tuple[str, str, Path]) -> None:
    fast, slow, _ = servers
    fast_answers = same_answers(replay(fast, "same"), replay(slow, "same"), "body")
    assert {status for status, _ in fast_answers} >= {200, 400, 404, 409, 413, 415, 422}


def scrape(base: str, name: str, endpoint: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and f'endpoint="{endpoint}"' in line:
            code = re.search(r'http_response_code="(\d+)"', line)
            found[code.group(1) if code else ""] = float(line.rsplit(" ", 1)[1])
    return found


@pytest.mark.slow
def test_bentomls_request_metrics_see_the_fast_routes(servers: tuple[str, str, Path]) -> None:
    fast, _, log = servers
    before = scrape(fast, "bentoml_service_request_total", "/v1/sessions/step")
    with httpx.Client(base_url=fast, timeout=30) as http:
        http.post("/v1/sessions/create", json={"session_id": "counted"})
        for seq in range(3):
            http.post(
                "/v1/sessions/step", json={"session_id": "counted", "inputs": [[0.5]], "seq": seq}
            )
        http.post("/v1/sessions/step", json={"session_id": "counted", "inputs": []})
    after = scrape(fast, "bentoml_service_request_total", "/v1/sessions/step")
    assert after.get("200", 0) - before.get("200", 0) == 3
    assert after.get("422", 0) - before.get("422", 0) == 1
    hist = scrape(fast, "bentoml_service_request_duration_seconds_count", "/v1/sessions/step")
    assert hist.get("200", 0) >= 3
    refused = [line for line in log.read_text().splitlines() if "POST /v1/sessions/step:" in line]
    assert any("refused POST /v1/sessions/step: 422 empty_chunk" in line for line in refused)
    assert "Traceback" not in log.read_text()


def stream_messages() -> list[str | bytes]:
    """Stream messages, good and bad, in order: each server gets the same sequence."""
    good = [json.dumps({"inputs": [[0.5]], "seq": 0}), json.dumps({"inputs": [[0.4]], "seq": 1})]
    return [
        *good,
        good[1],  # a retry: replayed
        json.dumps({"inputs": [[0.1]], "seq": 0}),  # seq conflict
        json.dumps({"inputs": [[0.1, 0.2]]}),  # wrong feature count
        json.dumps({"inputs": []}),
        json.dumps({"inputs": [[0.5]], "extra": 1}),
        b'{"inputs": [[NaN]]}',
        "{nope",
        json.dumps({"inputs": [[0.3]], "seq": 2, "return_gates": True}),
        json.dumps({"inputs": [[0.5]] * 2000}),  # over LSTM_MAX_BODY_BYTES: closes 1009
    ]


def stream_replay(base: str, sid: str) -> list[Any]:
    """Every reply (parsed) and, last, the close code and reason; an unknown session's close."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    ws_base = "ws" + base.removeprefix("http")
    assert httpx.post(f"{base}/v1/sessions/create", json={"session_id": sid}).status_code == 200
    got: list[Any] = []
    with connect(f"{ws_base}/v1/stream?session_id={sid}", open_timeout=10) as ws:
        for message in stream_messages():
            ws.send(message)
            got.append(json.loads(ws.recv(timeout=10)))
        try:  # the last one was over the limit: its error, then the close
            got.append(("no close", ws.recv(timeout=10)))
        except ConnectionClosed as e:
            got.append((e.rcvd.code if e.rcvd else None, e.rcvd.reason if e.rcvd else None))
    with connect(f"{ws_base}/v1/stream?session_id=ghost", open_timeout=10) as ws:
        got.append(json.loads(ws.recv(timeout=10)))
        try:
            ws.recv(timeout=10)
        except ConnectionClosed as e:
            got.append(e.rcvd.code if e.rcvd else None)
    return got


@pytest.mark.slow
def test_the_stream_in_front_answers_as_bentomls_stack(servers: tuple[str, str, Path]) -> None:
    fast, slow, _ = servers
    fast_answers = same_answers(
        stream_replay(fast, "streamed"), stream_replay(slow, "streamed"), "message"
    )
    assert fast_answers[-1] == 4404 and fast_answers[-3] == (1009, "body_too_large")
    assert fast_answers[-4]["error"]["code"] == "body_too_large"
    codes = {a.get("error", {}).get("code") for a in fast_answers if isinstance(a, dict)}
    assert {"seq_conflict", "wrong_feature_count", "empty_chunk", None} <= codes


def websocket_bytes_received(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("bentoml_service_websocket_data_received_count{")
        and 'endpoint="/v1/stream"' in line
    )


@pytest.mark.slow
def test_the_stream_is_served_in_front_of_bentomls_stack(servers: tuple[str, str, Path]) -> None:
    """BentoML's traffic middleware observes two size summaries per message (a quarter of the
    stream's server time): in front of it, a stream's messages never reach it."""
    fast, slow, _ = servers
    for base in (fast, slow):
        stream_replay(base, "counted-stream")
    assert websocket_bytes_received(slow) > 0  # the stack BentoML serves does write them
    assert websocket_bytes_received(fast) == 0


def test_the_deadline_holds_on_a_later_loop_and_never_swallows_another_cancel() -> None:
    from service.fast_routes import Deadlines

    deadlines = Deadlines(0.05)

    async def request(seconds: float) -> str:
        task = deadlines.begin()
        try:
            await asyncio.sleep(seconds)
            return "answered"
        except asyncio.CancelledError:
            if deadlines.expired(task):
                return "504"
            raise
        finally:
            deadlines.end(task)

    assert asyncio.run(request(0)) == "answered"  # this loop ends with the timer still pending
    assert asyncio.run(request(5)) == "504"  # a later loop: the deadline still holds

    async def cancelled_twice() -> None:
        task = asyncio.ensure_future(request(5))
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        begun, before = deadlines.running[task]
        deadlines.running[task] = (begun - 1.0, before)  # late now
        deadlines._expire(loop)  # the deadline's cancel...
        task.cancel()  # ...and a shutdown's, before the request runs again
        with pytest.raises(asyncio.CancelledError):
            await task  # not answered as a 504: the other cancel stands
        assert not deadlines.running and not deadlines.cancelled

    asyncio.run(cancelled_twice())
