"""/v1/stream, the WebSocket transport: the same exactness, ordering and errors as the HTTP step.

Tier 1 drives StreamEndpoint alone in a small Starlette app (limits, backpressure); tier 2 the
service in process, message for message against the HTTP route.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from service.errors import SessionNotFound
from service.schemas import Step
from service.stream import StreamEndpoint, StreamLimits
from tests.test_service import BAD_STEPS, assert_outputs_match, create, post

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def send(ws: Any, body: dict[str, Any] | bytes) -> Any:
    if isinstance(body, bytes):
        ws.send_bytes(body)
    else:
        ws.send_text(json.dumps(body))
    return json.loads(ws.receive_text())


# --- tier 1: the endpoint alone ----------------------------------------------------------------


class FakeService:
    """Steps that take a while and count how many of one connection run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most_at_once = 0
        self.seen: list[int] = []

    async def step(self, body: Step) -> dict[str, Any]:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        await asyncio.sleep(0.005)
        self.running -= 1
        self.seen.append(int(body.inputs[0][0]))
        return {"session_id": body.session_id, "t": len(self.seen)}

    async def check(self, session_id: str) -> None:
        if session_id == "ghost":
            raise SessionNotFound(f"no session {session_id!r}", session_id=session_id)


def endpoint_client(limits: StreamLimits) -> tuple[TestClient, FakeService, StreamEndpoint]:
    fake = FakeService()
    endpoint = StreamEndpoint(limits, admit=lambda ws: fake)

    async def route(ws: WebSocket) -> None:
        await endpoint.serve(ws)

    app = Starlette(routes=[WebSocketRoute("/stream", route)])
    return TestClient(app), fake, endpoint


LIMITS = StreamLimits(max_streams=2, idle_s=5.0, max_message_bytes=200)


def test_pipelined_messages_run_one_at_a_time_and_answer_in_order() -> None:
    client, fake, _ = endpoint_client(LIMITS)
    with client.websocket_connect("/stream?session_id=s") as ws:
        for i in range(8):  # sent before any reply is read
            ws.send_text(json.dumps({"inputs": [[float(i)]]}))
        replies = [json.loads(ws.receive_text()) for _ in range(8)]
    assert [r["t"] for r in replies] == list(range(1, 9))
    assert fake.seen == list(range(8))
    assert fake.most_at_once == 1  # the next message is read only after the reply is sent


def test_the_stream_limit_is_enforced_and_named() -> None:
    client, _, endpoint = endpoint_client(LIMITS)
    with (
        client.websocket_connect("/stream?session_id=a") as a,
        client.websocket_connect("/stream?session_id=b") as b,
    ):
        assert send(a, {"inputs": [[1.0]]})["t"] == 1
        assert send(b, {"inputs": [[1.0]]})["t"] == 2
        with client.websocket_connect("/stream?session_id=c") as c:
            refused = json.loads(c.receive_text())
            with pytest.raises(WebSocketDisconnect) as closed:
                c.receive_text()
        assert refused["status"] == 429 and refused["error"]["code"] == "too_many_streams"
        assert "LSTM_MAX_STREAMS" in refused["error"]["message"]
        assert closed.value.code == 4429
    with client.websocket_connect("/stream?session_id=d") as d:  # the two closed: room again
        assert send(d, {"inputs": [[1.0]]})["t"] == 3
    assert endpoint.open == 0


def test_idle_connections_are_closed_saying_why() -> None:
    client, _, _ = endpoint_client(StreamLimits(max_streams=2, idle_s=0.2, max_message_bytes=200))
    with client.websocket_connect("/stream?session_id=s") as ws:
        started = time.monotonic()
        error = json.loads(ws.receive_text())
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert time.monotonic() - started < 3
    assert (
        error["error"]["code"] == "idle_timeout"
        and "LSTM_STREAM_IDLE_S" in error["error"]["message"]
    )
    assert closed.value.code == 4408


def test_only_waiting_counts_as_idle_not_the_connection_s_age_or_a_slow_step() -> None:
    """The idle limit is a wait for the next message: a busy connection outlives it many times,
    a step longer than it is not cut, and the wait after the last reply still closes it."""
    client, fake, _ = endpoint_client(
        StreamLimits(max_streams=2, idle_s=0.3, max_message_bytes=200)
    )
    slow = fake.step

    async def step(body: Step) -> dict[str, Any]:
        if body.inputs[0][0] < 0:
            await asyncio.sleep(0.5)  # longer than the idle limit, inside a step
        return await slow(body)

    fake.step = step  # type: ignore[method-assign]
    with client.websocket_connect("/stream?session_id=s") as ws:
        started = time.monotonic()
        t = 0
        while time.monotonic() - started < 1.2:  # four idle limits of messages 0.1 s apart
            t = send(ws, {"inputs": [[1.0]]})["t"]
            time.sleep(0.1)
        t = send(ws, {"inputs": [[-1.0]]})["t"]
        assert t == len(fake.seen)  # every message answered, the slow one too
        waited = time.monotonic()
        error = json.loads(ws.receive_text())
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert error["error"]["code"] == "idle_timeout" and closed.value.code == 4408
    assert 0.25 < time.monotonic() - waited < 3


def test_a_message_over_the_size_limit_closes_the_stream_unapplied() -> None:
    client, fake, _ = endpoint_client(LIMITS)
    with client.websocket_connect("/stream?session_id=s") as ws:
        error = send(ws, {"inputs": [[1.0]] * 100})
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert error["status"] == 413 and error["error"]["code"] == "body_too_large"
    assert error["error"]["limit"] == 200 and "LSTM_MAX_BODY_BYTES" in error["error"]["message"]
    assert closed.value.code == 1009 and fake.seen == []


def test_the_size_limit_counts_bytes_not_characters() -> None:
    client, fake, _ = endpoint_client(LIMITS)
    # 120 characters, 300 bytes in UTF-8: over the 200-byte limit (it passed as 120 "bytes")
    message = json.dumps({"inputs": [[1.0]], "pad": "é" * 90}, ensure_ascii=False)
    assert len(message) < 200 < len(message.encode())
    with client.websocket_connect("/stream?session_id=s") as ws:
        ws.send_text(message)
        error = json.loads(ws.receive_text())
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert error["error"]["code"] == "body_too_large" and closed.value.code == 1009
    assert fake.seen == []


def test_schema_refused_messages_are_counted_by_code_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refused: list[str] = []
    fake = FakeService()
    endpoint = StreamEndpoint(LIMITS, admit=lambda ws: fake, refused=refused.append)

    async def route(ws: WebSocket) -> None:
        await endpoint.serve(ws)

    client = TestClient(Starlette(routes=[WebSocketRoute("/stream", route)]))
    with (
        caplog.at_level("INFO", logger="lstm_sessions.stream"),
        client.websocket_connect("/stream?session_id=s") as ws,
    ):
        assert send(ws, {"inputs": [[1.0]], "seq": 2**64})["error"]["code"] == "seq_out_of_range"
        assert send(ws, {"inputs": [["x"]]})["error"]["code"] == "not_a_number"
    assert refused == ["seq_out_of_range", "not_a_number"]
    assert caplog.messages == [
        "refused WS /v1/stream message: 422 seq_out_of_range",
        "refused WS /v1/stream message: 422 not_a_number",
    ]


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("session_id=ghost", 404, "session_not_found"),
        # HTTP's code for an id off the pattern (it was invalid_request; an outside test run)
        ("session_id=no%20spaces", 422, "bad_session_id"),
        # no session_id at all: HTTP's code for a field not given (bad_session_id before)
        ("", 422, "missing_field"),
        ("session_id=", 422, "bad_session_id"),
    ],
)
def test_a_connection_to_no_valid_session_is_refused(
    query: str, status: int, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    client, _, _ = endpoint_client(LIMITS)
    with (
        caplog.at_level("INFO", logger="lstm_sessions.stream"),
        client.websocket_connect(f"/stream?{query}") as ws,
    ):
        error = json.loads(ws.receive_text())
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert error["status"] == status and closed.value.code == 4000 + status
    assert error["error"]["code"] == code
    # One line, as an HTTP refusal gets (none before; an outside test run).
    closing = 4000 + status
    assert caplog.messages == [f"refused WS /v1/stream: {status} {code} (closed {closing})"]


# --- tier 2: the service in process ------------------------------------------------------------


@pytest.fixture
def client(asgi_client: TestClient) -> TestClient:
    return asgi_client


VALUES = [[v] for v in (0.3, -0.5, 1.7, -0.6, -0.6, 1.7, 0.2, 0.0, -1.1, 2.4, 0.9)]


def test_streamed_chunks_equal_predict_and_mix_with_http(client: TestClient) -> None:
    _, whole = post(client, "/v1/predict", {"inputs": VALUES})
    create(client, "ws-exact")
    outputs, t = [], 0
    status, first = post(
        client, "/v1/sessions/step", {"session_id": "ws-exact", "inputs": VALUES[:2], "seq": 0}
    )
    assert status == 200
    outputs += first["outputs"]
    t = 2
    with client.websocket_connect("/v1/stream?session_id=ws-exact") as ws:
        for size in (1, 4, 3, 1):
            reply = send(ws, {"inputs": VALUES[t : t + size], "seq": t})
            t += size
            assert reply["session_id"] == "ws-exact" and reply["t"] == t, reply
            outputs += reply["outputs"]
    assert_outputs_match(outputs, whole["outputs"])
    assert post(client, "/v1/sessions/get", {"session_id": "ws-exact"})[1]["t"] == len(VALUES)


def test_a_reply_has_the_http_reply_s_shape(client: TestClient) -> None:
    for sid in ("ws-shape", "http-shape"):
        create(client, sid)
    with client.websocket_connect("/v1/stream?session_id=ws-shape") as ws:
        streamed = send(ws, {"inputs": VALUES[:3], "return_gates": True})
    _, stepped = post(
        client,
        "/v1/sessions/step",
        {"session_id": "http-shape", "inputs": VALUES[:3], "return_gates": True},
    )
    assert {**streamed, "session_id": "http-shape"} == stepped


def test_a_retried_message_is_answered_again_not_applied_twice(client: TestClient) -> None:
    create(client, "ws-retry")
    with client.websocket_connect("/v1/stream?session_id=ws-retry") as ws:
        first = send(ws, {"inputs": [[1.0]], "seq": 0})
        again = send(ws, {"inputs": [[1.0]], "seq": 0})
        conflict = send(ws, {"inputs": [[2.0]], "seq": 0})
        still_open = send(ws, {"inputs": [[2.0]], "seq": 1})
    assert first == again and first["t"] == 1
    assert conflict["status"] == 409 and conflict["error"]["code"] == "seq_conflict"
    assert conflict["error"]["t"] == 1
    assert still_open["t"] == 2


def test_pipelined_messages_of_a_session_apply_in_order(client: TestClient) -> None:
    create(client, "ws-pipe")
    with client.websocket_connect("/v1/stream?session_id=ws-pipe") as ws:
        for t, value in enumerate(VALUES):
            ws.send_text(json.dumps({"inputs": [value], "seq": t}))
        replies = [json.loads(ws.receive_text()) for _ in VALUES]
    assert [r["t"] for r in replies] == list(range(1, len(VALUES) + 1))
    _, whole = post(client, "/v1/predict", {"inputs": VALUES})
    for reply, ref in zip(replies, whole["outputs"], strict=True):
        assert reply["outputs"][0]["mean"] == pytest.approx(ref["mean"], abs=1e-5)


# The HTTP table minus what is not a message's: the id is the connection's, and the body limit
# closes the connection (tested above).
MESSAGE_CASES = [c for c in BAD_STEPS if c[0] not in ("bad id pattern", "unknown session")]


@pytest.mark.parametrize(
    ("case", "body", "status", "code"), MESSAGE_CASES, ids=[c[0] for c in MESSAGE_CASES]
)
def test_bad_messages_get_the_http_error_and_change_nothing(
    client: TestClient, case: str, body: bytes | dict[str, Any], status: int, code: str
) -> None:
    if post(client, "/v1/sessions/get", {"session_id": "ws-victim"})[0] != 200:
        create(client, "ws-victim")
        post(client, "/v1/sessions/step", {"session_id": "ws-victim", "inputs": [[0.5]]})
    _, before = post(client, "/v1/sessions/forecast", {"session_id": "ws-victim", "horizon": 3})
    if isinstance(body, bytes):
        message: dict[str, Any] | bytes = body.replace(b'"session_id": "victim", ', b"")
    else:
        message = {k: v for k, v in body.items() if v is not None}
    with client.websocket_connect("/v1/stream?session_id=ws-victim") as ws:
        got = send(ws, message)
        if status != 413:  # every other refusal leaves the stream open
            assert send(ws, {"inputs": [[1.0, 2.0]]})["error"]["code"] == "wrong_feature_count"
    assert (got["status"], got["error"]["code"]) == (status, code), got
    assert got["error"]["message"]
    _, after = post(client, "/v1/sessions/forecast", {"session_id": "ws-victim", "horizon": 3})
    assert after == before


def test_a_session_gone_mid_stream_closes_it_saying_why(client: TestClient) -> None:
    create(client, "ws-brief", ttl_s=0.3)
    with client.websocket_connect("/v1/stream?session_id=ws-brief") as ws:
        assert send(ws, {"inputs": [[1.0]]})["t"] == 1
        time.sleep(0.4)
        gone = send(ws, {"inputs": [[1.0]]})
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert gone["status"] == 404 and gone["error"]["code"] == "session_expired"
    assert closed.value.code == 4404
    with client.websocket_connect("/v1/stream?session_id=ws-brief") as ws:
        refused = json.loads(ws.receive_text())
    assert refused["error"]["code"] == "session_expired"
