"""The service in process: the class called directly, and through BentoML's ASGI app."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import pytest
import torch
from starlette.testclient import TestClient

from model import load_checkpoint
from model.native import NativeLSTM
from service.schemas import (
    DEFAULT_PATHS,
    PATHS_CEILING,
    CreateSession,
    Forecast,
    Predict,
    SessionRef,
    Step,
    StepMany,
)
from service.service import LSTMSessions
from tests.conftest import SHIPPED

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def client(asgi_client: TestClient) -> TestClient:
    return asgi_client


def post(client: TestClient, route: str, body: Any) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(route, content=raw, headers={"content-type": "application/json"})
    return r.status_code, r.json()


def create(client: TestClient, sid: str, **extra: Any) -> dict[str, Any]:
    status, body = post(client, "/v1/sessions/create", {"session_id": sid, **extra})
    assert status == 200, body
    return body


def assert_outputs_match(ours: list[dict[str, Any]], ref: list[dict[str, Any]]) -> None:
    """Step outputs equal to /v1/predict's for the same values (float32 tolerance)."""
    for got, want in zip(ours, ref, strict=True):
        assert got["mean"] == pytest.approx(want["mean"], abs=1e-5)
        assert got["std"] == pytest.approx(want["std"], abs=1e-5)
        if want["anomaly_z"] is None:
            assert got["anomaly_z"] is None
        else:
            assert got["anomaly_z"] == pytest.approx(want["anomaly_z"], abs=1e-4)


# --- tier 1: the class called directly --------------------------------------------------------


def test_class_called_directly() -> None:
    svc = LSTMSessions()
    # The default engine on a CPU with a compiler: the native one, checked against eager at start.
    assert isinstance(svc.batcher.runner.model.engine, NativeLSTM)

    async def scenario() -> None:
        info = await svc.create(CreateSession(session_id="direct"))
        assert info.t == 0 and info.model == "acsf1-forecaster"
        stepped = await svc.step(Step(session_id="direct", inputs=[[0.5], [-0.2]], seq=0))
        assert stepped.t == 2 and stepped.outputs[0].anomaly_z is None
        whole = await svc.predict(Predict(inputs=[[0.5], [-0.2]]))
        assert [o.mean for o in stepped.outputs] == [o.mean for o in whole.outputs]
        fc = await svc.forecast(Forecast(session_id="direct", horizon=2))
        assert fc.t == 2 and fc.forecast[0].mean == stepped.outputs[-1].mean
        assert (await svc.get(SessionRef(session_id="direct"))).t == 2
        assert (await svc.reset(SessionRef(session_id="direct"))).t == 0
        assert (await svc.delete(SessionRef(session_id="direct"))).deleted
        await svc.batcher.close()

    asyncio.run(scenario())


# --- tier 2: through to_asgi() -----------------------------------------------------------------


def test_chunked_steps_equal_predict(client: TestClient) -> None:
    values = [[v] for v in (0.3, -0.5, 1.7, -0.6, -0.6, 1.7, 0.2, 0.0, -1.1, 2.4, 0.9)]
    _, whole = post(client, "/v1/predict", {"inputs": values})
    create(client, "exact")
    outputs, t = [], 0
    for size in (1, 4, 2, 1, 3):
        status, body = post(
            client,
            "/v1/sessions/step",
            {"session_id": "exact", "inputs": values[t : t + size], "seq": t},
        )
        assert status == 200, body
        t += size
        assert body["t"] == t
        outputs += body["outputs"]
    assert_outputs_match(outputs, whole["outputs"])


def test_seq_retry_is_answered_again_not_applied_twice(client: TestClient) -> None:
    create(client, "retry")
    first = post(client, "/v1/sessions/step", {"session_id": "retry", "inputs": [[1.0]], "seq": 0})
    again = post(client, "/v1/sessions/step", {"session_id": "retry", "inputs": [[1.0]], "seq": 0})
    assert first == again and first[1]["t"] == 1
    status, body = post(
        client, "/v1/sessions/step", {"session_id": "retry", "inputs": [[2.0]], "seq": 0}
    )
    assert status == 409 and body["error"]["code"] == "seq_conflict" and body["error"]["t"] == 1
    status, body = post(
        client, "/v1/sessions/step", {"session_id": "retry", "inputs": [[1.0]], "seq": 5}
    )
    assert status == 409 and body["error"]["t"] == 1
    assert post(client, "/v1/sessions/get", {"session_id": "retry"})[1]["t"] == 1


def test_forecast_does_not_change_the_session(client: TestClient) -> None:
    create(client, "fc")
    status, body = post(client, "/v1/sessions/forecast", {"session_id": "fc", "horizon": 2})
    assert status == 409 and body["error"]["code"] == "no_observations"
    post(client, "/v1/sessions/step", {"session_id": "fc", "inputs": [[0.1], [0.2]]})
    _, a = post(client, "/v1/sessions/forecast", {"session_id": "fc", "horizon": 5})
    _, b = post(client, "/v1/sessions/forecast", {"session_id": "fc", "horizon": 5})
    assert a == b and len(a["forecast"]) == 5 and a["t"] == 2
    assert a["paths"] == DEFAULT_PATHS and a["seed"] == 0
    _, stepped = post(client, "/v1/sessions/step", {"session_id": "fc", "inputs": [[0.3]]})
    _, ref = post(client, "/v1/predict", {"inputs": [[0.1], [0.2], [0.3]]})
    assert stepped["outputs"][0]["mean"] == pytest.approx(ref["outputs"][2]["mean"], abs=1e-5)


def test_forecast_samples_paths_reproducibly_per_seed(client: TestClient) -> None:
    create(client, "paths")
    # a varying series: a constant one leaves the running-scaled model a std at its floor (1e-5
    # here), where float32 rounding of mean + z * std is no longer relative to the std
    inputs = [[v] for v in (0.4, -0.2, 1.1, 0.7, -0.5, 0.3, 0.9, -0.1)]
    _, stepped = post(client, "/v1/sessions/step", {"session_id": "paths", "inputs": inputs})
    body = {"session_id": "paths", "horizon": 6, "paths": 300, "seed": 7}
    status, a = post(client, "/v1/sessions/forecast", body)
    assert status == 200 and a["paths"] == 300 and a["seed"] == 7
    _, again = post(client, "/v1/sessions/forecast", body)
    _, other = post(client, "/v1/sessions/forecast", {**body, "seed": 8})
    assert again == a and other["forecast"][0] == a["forecast"][0]
    assert other["forecast"][1:] != a["forecast"][1:]  # later steps are sampled
    first = a["forecast"][0]  # the step's own Gaussian forecast, quantiles from it
    assert first["mean"] == stepped["outputs"][-1]["mean"]
    assert first["std"] == stepped["outputs"][-1]["std"]
    # ... read at the levels the shipped model's calibration gives step 1 (not 10/50/90%)
    levels = load_checkpoint(SHIPPED).model.horizon_levels[0, :, 0].double()
    z = torch.special.ndtri(levels).tolist()
    assert z != pytest.approx([-1.2816, 0.0, 1.2816], abs=0.01)
    for name, zq in zip(("p10", "p50", "p90"), z, strict=True):
        assert first[name][0] - first["mean"][0] == pytest.approx(zq * first["std"][0], rel=1e-3)
    for s in a["forecast"]:
        assert s["p10"][0] <= s["p50"][0] <= s["p90"][0] and s["std"][0] > 0
    for paths in (1, PATHS_CEILING + 1):
        status, err = post(client, "/v1/sessions/forecast", {**body, "paths": paths})
        assert status == 422 and err["error"]["code"] == "invalid_request"
    assert post(client, "/v1/sessions/get", {"session_id": "paths"})[1]["t"] == 8


def test_reset_delete_and_gates(client: TestClient) -> None:
    create(client, "life")
    _, one = post(
        client, "/v1/sessions/step", {"session_id": "life", "inputs": [[0.4]], "return_gates": True}
    )
    assert set(one["gates"]) == {"forget", "input", "output"}
    assert len(one["gates"]["forget"]) == 2 and len(one["gates"]["forget"][0]) == 1
    _, info = post(client, "/v1/sessions/reset", {"session_id": "life"})
    assert info["t"] == 0
    _, again = post(client, "/v1/sessions/step", {"session_id": "life", "inputs": [[0.4]]})
    # A step with gates runs the eager stack, one without the native engine: equal to float32
    # rounding (tests/test_native.py), not bit for bit.
    assert again["gates"] is None
    assert_outputs_match(again["outputs"], one["outputs"])
    assert post(client, "/v1/sessions/delete", {"session_id": "life"})[0] == 200
    status, body = post(client, "/v1/sessions/get", {"session_id": "life"})
    assert status == 404 and body["error"]["code"] == "session_not_found"


def test_expired_session_says_so(client: TestClient) -> None:
    create(client, "brief", ttl_s=0.2)
    time.sleep(0.3)
    status, body = post(client, "/v1/sessions/step", {"session_id": "brief", "inputs": [[1.0]]})
    assert status == 404 and body["error"]["code"] == "session_expired"


BAD_STEPS: list[tuple[str, bytes | dict[str, Any], int, str]] = [
    ("wrong feature count", {"inputs": [[1.0, 2.0]]}, 422, "wrong_feature_count"),
    # (a row of none was invalid_request; an outside test run)
    ("a row of no values", {"inputs": [[]]}, 422, "wrong_feature_count"),
    ("T = 0", {"inputs": []}, 422, "empty_chunk"),
    ("T over the limit", {"inputs": [[0.0]] * 513}, 422, "chunk_too_long"),
    ("T over the ceiling", {"inputs": [[0.0]] * 4097}, 422, "chunk_too_long"),
    ("NaN", b'{"session_id": "victim", "inputs": [[NaN]]}', 422, "non_finite_number"),
    ("Infinity", b'{"session_id": "victim", "inputs": [[Infinity]]}', 422, "non_finite_number"),
    ("1e400", b'{"session_id": "victim", "inputs": [[1e400]]}', 422, "non_finite_number"),
    ("string", {"inputs": [["1.5"]]}, 422, "not_a_number"),
    ("boolean", {"inputs": [[True]]}, 422, "not_a_number"),
    ("null", {"inputs": [[None]]}, 422, "not_a_number"),
    ("missing inputs", {"inputs": None}, 422, "missing_field"),
    ("unknown field", {"inputs": [[1.0]], "colour": "red"}, 422, "unknown_field"),
    ("bad seq", {"inputs": [[1.0]], "seq": "zero"}, 422, "not_an_integer"),
    ("seq conflict", {"inputs": [[1.0]], "seq": 7}, 409, "seq_conflict"),
    ("bad id pattern", {"session_id": "no spaces!", "inputs": [[1.0]]}, 422, "bad_session_id"),
    ("unknown session", {"session_id": "ghost", "inputs": [[1.0]]}, 404, "session_not_found"),
    ("malformed JSON", b'{"session_id": "victim", "inputs": [[1.0]', 400, "malformed_json"),
    (
        "body over the limit",
        b'{"session_id": "victim", "inputs": [' + b"[1.0]," * 400_000 + b"[1.0]]}",
        413,
        "body_too_large",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "code"), BAD_STEPS, ids=[c[0] for c in BAD_STEPS]
)
def test_bad_steps_are_refused_and_change_nothing(
    client: TestClient,
    case: str,
    body: bytes | dict[str, Any],
    status: int,
    code: str,
) -> None:
    if post(client, "/v1/sessions/get", {"session_id": "victim"})[0] != 200:
        create(client, "victim")
        post(client, "/v1/sessions/step", {"session_id": "victim", "inputs": [[0.5]]})
    _, before = post(client, "/v1/sessions/forecast", {"session_id": "victim", "horizon": 3})
    if isinstance(body, dict):
        body = {"session_id": "victim", **body}
        if body.get("inputs", 0) is None:
            del body["inputs"]
    got_status, got = post(client, "/v1/sessions/step", body)
    assert got_status == status, got
    assert got["error"]["code"] == code and got["error"]["message"]
    if code == "wrong_feature_count":  # a row of none said only that it was short
        assert (got["error"]["expected"], got["error"]["got"]) == (1, len(body["inputs"][0]))
    _, after = post(client, "/v1/sessions/forecast", {"session_id": "victim", "horizon": 3})
    assert after == before  # same t, same state, same next forecast


@pytest.mark.parametrize(
    ("route", "body", "status", "code"),
    [
        (
            "/v1/sessions/forecast",
            {"session_id": "victim", "horizon": 257},
            422,
            "horizon_too_long",
        ),
        (
            "/v1/sessions/forecast",
            {"session_id": "victim", "horizon": 5000},
            422,
            "horizon_too_long",
        ),
        ("/v1/sessions/forecast", {"session_id": "victim", "horizon": 0}, 422, "invalid_request"),
        ("/v1/sessions/create", {"session_id": "victim"}, 409, "session_exists"),
        ("/v1/sessions/create", {"ttl_s": 10**7}, 422, "ttl_too_long"),
        ("/v1/sessions/create", {"ttl_s": 1e308}, 422, "ttl_too_long"),
        ("/v1/sessions/create", {"ttl_s": -1}, 422, "invalid_request"),
        ("/v1/predict", {"inputs": [[0.0]] * 4097}, 422, "chunk_too_long"),
        ("/v1/predict", {"inputs": [[0.0], []]}, 422, "wrong_feature_count"),
        ("/v1/sessions/delete", {"session_id": "ghost"}, 404, "session_not_found"),
    ],
)
def test_other_refusals(
    client: TestClient, route: str, body: dict[str, Any], status: int, code: str
) -> None:
    if post(client, "/v1/sessions/get", {"session_id": "victim"})[0] != 200:
        create(client, "victim")
    got_status, got = post(client, route, body)
    assert (got_status, got["error"]["code"]) == (status, code), got
    if code == "ttl_too_long":  # this deployment's limit, however long (1e308 had none)
        assert got["error"]["limit"] == 86_400.0, got


def test_model_card(client: TestClient) -> None:
    status, card = post(client, "/v1/model", {})
    assert status == 200
    assert card["features"] == ["power"] and card["device"] == "cpu"
    assert card["metrics"]["beats_all_baselines"] is True
    assert card["limits"]["max_chunk"] == 512


def test_openapi_describes_every_route_and_field(client: TestClient) -> None:
    spec = client.get("/docs.json").json()
    for route in (
        "/v1/sessions/create",
        "/v1/sessions/step",
        "/v1/sessions/forecast",
        "/v1/sessions/get",
        "/v1/sessions/reset",
        "/v1/sessions/delete",
        "/v1/predict",
        "/v1/model",
    ):
        assert route in spec["paths"], route
    schemas = spec["components"]["schemas"]
    step = next(
        v
        for k, v in schemas.items()
        if k.startswith("Step") and "inputs" in v.get("properties", {})
    )
    for field in ("session_id", "inputs", "seq", "return_gates"):
        assert field in step["properties"]
    assert step["properties"]["session_id"]["pattern"]
    assert client.get("/").status_code == 200  # the Swagger page


def test_export_import_moves_a_session_exactly(client: TestClient) -> None:
    values = [[0.2], [-0.4], [1.1], [0.0], [-0.7]]
    create(client, "mover")
    post(client, "/v1/sessions/step", {"session_id": "mover", "inputs": values[:3]})
    status, exported = post(client, "/v1/sessions/export", {"session_id": "mover"})
    assert status == 200 and exported["t"] == 3
    status, info = post(
        client, "/v1/sessions/import", {"blob": exported["blob"], "session_id": "moved"}
    )
    assert status == 200 and info["t"] == 3
    _, a = post(client, "/v1/sessions/step", {"session_id": "mover", "inputs": values[3:]})
    _, b = post(
        client, "/v1/sessions/step", {"session_id": "moved", "inputs": values[3:], "seq": 3}
    )
    assert a["outputs"] == b["outputs"] and b["t"] == 5
    status, body = post(client, "/v1/sessions/import", {"blob": exported["blob"]})
    assert status == 409 and body["error"]["code"] == "session_exists"  # "mover" still exists


def test_tampered_or_foreign_blobs_are_refused(client: TestClient) -> None:
    import base64

    from service.state_blob import decode, encode

    create(client, "origin")
    post(client, "/v1/sessions/step", {"session_id": "origin", "inputs": [[0.3]]})
    _, exported = post(client, "/v1/sessions/export", {"session_id": "origin"})
    raw = bytearray(base64.b64decode(exported["blob"]))
    raw[-50] ^= 0x10
    tampered = base64.b64encode(bytes(raw)).decode()
    status, body = post(client, "/v1/sessions/import", {"blob": tampered, "session_id": "t1"})
    assert status == 422 and body["error"]["code"] == "blob_corrupted"
    status, body = post(client, "/v1/sessions/import", {"blob": "not base64!", "session_id": "t2"})
    assert status == 422 and body["error"]["code"] == "blob_corrupted"
    header, state = decode(base64.b64decode(exported["blob"]))
    foreign = encode(state, {**header, "model": "another-model"})
    status, body = post(
        client,
        "/v1/sessions/import",
        {"blob": base64.b64encode(foreign).decode(), "session_id": "t3"},
    )
    assert status == 409 and body["error"]["code"] == "model_mismatch"
    # Another version of this model, not loaded: it migrates when it kept inputs, else not.
    bare = dataclasses.replace(state, window=None)
    old = encode(bare, {**header, "model_version": "000000000000"})
    status, body = post(
        client, "/v1/sessions/import", {"blob": base64.b64encode(old).decode(), "session_id": "t4"}
    )
    assert status == 409 and body["error"]["code"] == "migration_impossible"
    for sid in ("t1", "t2", "t3", "t4"):
        assert post(client, "/v1/sessions/get", {"session_id": sid})[0] == 404
    older = encode(state, {**header, "model_version": "000000000000"})
    status, body = post(
        client,
        "/v1/sessions/import",
        {"blob": base64.b64encode(older).decode(), "session_id": "t5"},
    )
    assert status == 200 and body["model_version"] == header["model_version"], body
    assert body["t"] == 1


@pytest.mark.parametrize(
    ("edit", "code"),
    [
        ({"t": -3}, "blob_out_of_range"),
        ({"t": "7"}, "blob_out_of_range"),
        ({"session_id": "no spaces allowed!"}, "blob_corrupted"),
        ({"session_id": 42}, "blob_corrupted"),
    ],
    ids=["negative t", "string t", "bad id", "non-string id"],
)
def test_blobs_with_bad_headers_are_refused(
    client: TestClient, edit: dict[str, Any], code: str
) -> None:
    import base64

    from service.state_blob import decode, encode

    if post(client, "/v1/sessions/get", {"session_id": "header-src"})[0] != 200:
        create(client, "header-src")
    _, exported = post(client, "/v1/sessions/export", {"session_id": "header-src"})
    header, state = decode(base64.b64decode(exported["blob"]))
    blob = base64.b64encode(encode(state, {**header, **edit})).decode()
    status, body = post(client, "/v1/sessions/import", {"blob": blob})
    assert (status, body["error"]["code"]) == (422, code), body


def test_step_many_applies_each_item_on_its_own_and_in_order(client: TestClient) -> None:
    values = [[0.4], [-0.6], [1.7], [-0.6], [-0.58]]
    for sid in ("many-a", "many-b"):
        create(client, sid)
    items = [
        {"session_id": "many-a", "inputs": values[:2], "seq": 0},
        {"session_id": "many-b", "inputs": values[:1]},
        {"session_id": "many-a", "inputs": values[2:], "seq": 2},  # after item 0, same session
        {"session_id": "ghost", "inputs": [[1.0]]},
        {"session_id": "many-b", "inputs": [[1.0, 2.0]]},  # wrong feature count: fails alone
        {"session_id": "many-a", "inputs": [[0.0]], "seq": 99},  # seq conflict
    ]
    status, body = post(client, "/v1/sessions/step_many", {"items": items})
    assert status == 200, body
    results = body["results"]
    assert [r["ok"] for r in results] == [True, True, True, False, False, False]
    assert [r["error"]["code"] for r in results[3:]] == [
        "session_not_found",
        "wrong_feature_count",
        "seq_conflict",
    ]
    assert results[2]["result"]["t"] == 5 and results[1]["result"]["t"] == 1
    _, whole = post(client, "/v1/predict", {"inputs": values})
    streamed = results[0]["result"]["outputs"] + results[2]["result"]["outputs"]
    for a, b in zip(streamed, whole["outputs"], strict=True):
        assert a["mean"][0] == pytest.approx(b["mean"][0], abs=1e-5)
    assert post(client, "/v1/sessions/get", {"session_id": "many-b"})[1]["t"] == 1


def test_step_many_limits(client: TestClient) -> None:
    status, body = post(
        client, "/v1/sessions/step_many", {"items": [{"session_id": "x", "inputs": [[0.0]]}] * 1025}
    )
    assert (status, body["error"]["code"]) == (422, "too_many_items")
    assert body["error"]["limit"] == 1024
    status, body = post(client, "/v1/sessions/step_many", {"items": []})
    assert status == 422


# Errors the handler finds fail their item alone; schema errors refuse the whole request.
# the engine's refusals, per item (a row of no values among them: the engine counts features)
ITEM_LEVEL = {
    "wrong feature count",
    "a row of no values",
    "T over the limit",
    "seq conflict",
    "unknown session",
}


@pytest.mark.parametrize(
    ("case", "body", "status", "code"), BAD_STEPS, ids=[c[0] for c in BAD_STEPS]
)
def test_bad_step_many_items_get_the_step_s_error_and_change_nothing(
    client: TestClient, case: str, body: bytes | dict[str, Any], status: int, code: str
) -> None:
    for sid in ("victim", "bystander"):
        if post(client, "/v1/sessions/get", {"session_id": sid})[0] != 200:
            create(client, sid)
            post(client, "/v1/sessions/step", {"session_id": sid, "inputs": [[0.5]]})
    _, before = post(client, "/v1/sessions/forecast", {"session_id": "victim", "horizon": 3})
    t_bystander = post(client, "/v1/sessions/get", {"session_id": "bystander"})[1]["t"]
    good = {"session_id": "bystander", "inputs": [[0.1]]}
    if isinstance(body, bytes):
        raw = b'{"items": [' + json.dumps(good).encode() + b", " + body + b"]}"
    else:
        item = {"session_id": "victim", **{k: v for k, v in body.items() if v is not None}}
        raw = json.dumps({"items": [good, item]}).encode()
    got_status, got = post(client, "/v1/sessions/step_many", raw)
    if case in ITEM_LEVEL:
        assert got_status == 200, got
        bystander, refused = got["results"]
        assert bystander["ok"] and bystander["result"]["t"] == t_bystander + 1
        assert not refused["ok"] and refused["error"]["code"] == code, refused
        assert refused["error"]["message"]
    else:
        assert (got_status, got["error"]["code"]) == (status, code), got
        assert post(client, "/v1/sessions/get", {"session_id": "bystander"})[1]["t"] == t_bystander
    _, after = post(client, "/v1/sessions/forecast", {"session_id": "victim", "horizon": 3})
    assert after == before


def test_the_request_deadline_answers_504_and_leaves_no_timer_behind() -> None:
    from bentoml._internal.server.http import traffic

    from service.http import RequestDeadline

    assert traffic.TimeoutMiddleware is RequestDeadline  # what BentoML builds its stack from

    async def quick(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(5)

    async def scenario() -> tuple[list[Any], list[Any], int]:
        loop = asyncio.get_running_loop()
        sent: list[Any] = []

        async def send(message: Any) -> None:
            sent.append(message)

        for _ in range(100):
            await RequestDeadline(quick, timeout=60)({"type": "http"}, None, send)
        live = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        late: list[Any] = []

        async def send_late(message: Any) -> None:
            late.append(message)

        await RequestDeadline(slow, timeout=0.05)({"type": "http"}, None, send_late)
        return sent, late, len(live)

    sent, late, live_timers = asyncio.run(scenario())
    assert len(sent) == 200 and live_timers == 0  # BentoML's left 100 timers of 60 s here
    assert late[0]["status"] == 504
    assert json.loads(late[1]["body"])["error"]["code"] == "request_timeout"


def test_step_many_fast_lane_replays_waits_for_busy_sessions_and_survives_cancellation() -> None:
    svc = LSTMSessions()

    async def scenario() -> None:
        for sid in ("lane-a", "lane-b"):
            await svc.create(CreateSession(session_id=sid))
        first = StepMany(items=[Step(session_id="lane-a", inputs=[[0.5]], seq=0)])
        once = json.loads((await svc.step_many(first)).body)["results"][0]
        again = json.loads((await svc.step_many(first)).body)["results"][0]
        assert once == again and once["result"]["t"] == 1  # a retry is answered, not applied
        # lane-b is busy (held by another operation): its item waits its turn, then applies.
        session = svc.store.get("lane-b")
        await session.acquire()
        many = asyncio.create_task(
            svc.step_many(StepMany(items=[Step(session_id="lane-b", inputs=[[0.1]], seq=0)]))
        )
        await asyncio.sleep(0.05)
        assert not many.done() and session.t == 0
        session.release()
        assert json.loads((await many).body)["results"][0]["result"]["t"] == 1
        # A request cancelled mid-step: its steps still complete, then the locks are freed.
        cancelled = asyncio.create_task(
            svc.step_many(
                StepMany(items=[Step(session_id=s, inputs=[[0.2]]) for s in ("lane-a", "lane-b")])
            )
        )
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        a, b = svc.store.get("lane-a"), svc.store.get("lane-b")
        for _ in range(100):  # the steps finish in the background, then free their sessions
            if not (a.busy or b.busy):
                break
            await asyncio.sleep(0.01)
        assert not a.busy and not b.busy  # never a lock left held
        assert (a.t, b.t) in ((1, 1), (2, 2))  # whole steps or none
        await svc.batcher.close()

    asyncio.run(scenario())


def test_step_many_requests_crossing_sessions_never_wait_on_each_other() -> None:
    """R1 = [s1, s2, s2] and R2 = [s2, s1, s1] at once: each locks one session in the fast lane
    and needs the other's on the general path. A fast-lane lock is freed with its step."""
    svc = LSTMSessions()

    async def scenario() -> None:
        for sid in ("cross-1", "cross-2"):
            await svc.create(CreateSession(session_id=sid))

        def request(a: str, b: str) -> StepMany:
            return StepMany(items=[Step(session_id=s, inputs=[[0.3]]) for s in (a, b, b)])

        one, two = await asyncio.wait_for(
            asyncio.gather(
                svc.step_many(request("cross-1", "cross-2")),
                svc.step_many(request("cross-2", "cross-1")),
            ),
            timeout=10,
        )
        for reply in (one, two):
            assert all(r["ok"] for r in json.loads(reply.body)["results"])
        assert svc.store.get("cross-1").t == svc.store.get("cross-2").t == 3
        await svc.batcher.close()

    asyncio.run(scenario())


def test_step_outcomes_are_written_once_per_loop_pass() -> None:
    """PassTally: many counts in one pass of the loop are one write per label, none lost."""
    from prometheus_client import CollectorRegistry, Counter

    from service.metrics import PassTally

    counter = Counter("c_total", "c", ["outcome"], registry=CollectorRegistry())
    tally = PassTally(counter)
    writes: list[tuple[str, float]] = []

    def child(label: str) -> Any:
        real = counter.labels(label)

        class Spy:
            def inc(self, n: float = 1) -> None:
                writes.append((label, n))
                real.inc(n)

        return Spy()

    tally.counter = type("C", (), {"labels": staticmethod(child)})()  # type: ignore[assignment]

    async def one_pass() -> None:
        for _ in range(50):
            tally.add("applied")
        tally.add("seq_conflict", 2)
        assert writes == []  # nothing written inside the pass
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(one_pass())
    assert sorted(writes) == [("applied", 50), ("seq_conflict", 2)]
    tally.add("applied")  # no loop running: at once
    assert writes[-1] == ("applied", 1)
    assert counter.labels("applied")._value.get() == 51


def test_step_outcomes_due_on_a_loop_that_is_gone_are_written_on_the_next() -> None:
    from prometheus_client import CollectorRegistry, Counter

    from service.metrics import PassTally

    counter = Counter("d_total", "d", ["outcome"], registry=CollectorRegistry())
    tally = PassTally(counter)
    gone = asyncio.new_event_loop()
    tally.counts, tally.armed = {"applied": 2}, gone  # a write was due when that loop stopped
    gone.close()

    async def later() -> None:
        tally.add("applied")
        await asyncio.sleep(0)

    asyncio.run(later())
    assert counter.labels("applied")._value.get() == 3


def test_a_step_many_sent_again_answers_each_item_as_a_step_sent_again(client: TestClient) -> None:
    """What the README says of it: of two items of one session, the last is answered from its
    replay record, the first seq_conflict with t (a session keeps its last step only)."""
    create(client, "twice")
    body = {
        "items": [
            {"session_id": "twice", "inputs": [[0.1]], "seq": 0},
            {"session_id": "twice", "inputs": [[0.2]], "seq": 1},
        ]
    }
    first = post(client, "/v1/sessions/step_many", body)[1]["results"]
    again = post(client, "/v1/sessions/step_many", body)[1]["results"]
    assert [r["ok"] for r in first] == [True, True]
    assert not again[0]["ok"] and again[0]["error"]["code"] == "seq_conflict"
    assert again[0]["error"]["t"] == 2
    assert again[1] == first[1]
    assert post(client, "/v1/sessions/get", {"session_id": "twice"})[1]["t"] == 2
