"""A running-scaled model (model/scaling.py) served for real: each session keeps its series'
running statistics beside (h, c), so a stream sent in chunks gets what the whole series gets
through the model in process, at any magnitude, across export and import, a clean restart (the
snapshot) and Redis; a blob whose statistics no series could make is refused."""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from model import ForecasterConfig, Normalisation, save_checkpoint
from model.checkpoint import load_checkpoint
from model.scaling import RunningScaleForecaster
from tests.servers import RedisServer, bentoml_server


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = ForecasterConfig(
        ("kw",), hidden_size=8, num_layers=2, scaling="running", scale_halflife=8.0
    )
    model = RunningScaleForecaster(config, Normalisation((0.0,), (1.0,))).eval()
    out = tmp_path_factory.mktemp("running") / "running-tiny"
    save_checkpoint(model, out, name="running-tiny")
    return out


def series(n: int = 30) -> list[list[float]]:
    """A series far from the unit scale: thousands, with a daily-ish cycle and noise."""
    rng = np.random.default_rng(7)
    t = np.arange(n)
    values = 4000.0 + 900.0 * np.sin(t / 3.0) + rng.normal(0.0, 50.0, n)
    return [[float(v)] for v in values.astype(np.float32)]


def in_process(checkpoint: Path, values: list[list[float]]) -> list[float]:
    model = load_checkpoint(checkpoint).model
    with torch.no_grad():
        f = model(torch.tensor([values]))
    return [float(v) for v in f.mean[0, :, 0]]


def post(url: str, route: str, body: dict[str, Any]) -> tuple[int, Any]:
    r = httpx.post(url + route, json=body, timeout=30)
    return r.status_code, r.json()


def stream(url: str, sid: str, values: list[list[float]], sizes: list[int], t: int = 0) -> list:
    out = []
    for size in sizes:
        status, body = post(
            url, "/v1/sessions/step", {"session_id": sid, "inputs": values[t : t + size], "seq": t}
        )
        assert status == 200, body
        t += size
        out += [o["mean"][0] for o in body["outputs"]]
    return out


def assert_close(got: list[float], want: list[float]) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


@pytest.fixture
def embedded(checkpoint: Path, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    env = {"LSTM_MODEL_DIR": str(checkpoint), "LSTM_SNAPSHOT_PATH": str(tmp_path / "s.snap")}
    with bentoml_server(env) as url:
        yield url, env


def test_chunks_equal_the_whole_series_and_the_model_in_process(
    checkpoint: Path, embedded: tuple[str, dict[str, str]]
) -> None:
    url, _ = embedded
    values = series()
    whole = in_process(checkpoint, values)
    # the forecasts are in the series' own units: the model saw it in its running ones
    assert abs(np.mean(whole[5:]) - 4000.0) < 2000.0
    status, predicted = post(url, "/v1/predict", {"inputs": values})
    assert status == 200
    assert_close([o["mean"][0] for o in predicted["outputs"]], whole)
    post(url, "/v1/sessions/create", {"session_id": "meter"})
    assert_close(stream(url, "meter", values, [1, 6, 2, 13, 8]), whole)
    # step_many applies each item with its own statistics: two sessions, two magnitudes
    post(url, "/v1/sessions/create", {"session_id": "small"})
    post(url, "/v1/sessions/create", {"session_id": "big"})
    small = [[v[0] / 1000.0] for v in values]
    got: dict[str, list[float]] = {"small": [], "big": []}
    for t in range(0, 30, 10):
        items = [
            {"session_id": "small", "inputs": small[t : t + 10], "seq": t},
            {"session_id": "big", "inputs": values[t : t + 10], "seq": t},
        ]
        status, body = post(url, "/v1/sessions/step_many", {"items": items})
        assert status == 200, body
        for item in body["results"]:
            got[item["result"]["session_id"]] += [o["mean"][0] for o in item["result"]["outputs"]]
    assert_close(got["big"], whole)
    assert_close(got["small"], in_process(checkpoint, small))
    # a step that returns its gates runs the model's torch forward: the same statistics
    post(url, "/v1/sessions/create", {"session_id": "gated"})
    first = stream(url, "gated", values, [7])
    status, body = post(
        url,
        "/v1/sessions/step",
        {"session_id": "gated", "inputs": values[7:19], "seq": 7, "return_gates": True},
    )
    assert status == 200 and body["gates"] is not None
    rest = stream(url, "gated", values, [11], t=19)
    assert_close(first + [o["mean"][0] for o in body["outputs"]] + rest, whole)
    status, forecast = post(url, "/v1/sessions/forecast", {"session_id": "meter", "horizon": 4})
    assert status == 200 and len(forecast["forecast"]) == 4
    assert_close([forecast["forecast"][0]["mean"][0]], whole[-1:])  # the next value's forecast


def test_the_first_values_get_no_anomaly_score_in_any_chunking(
    embedded: tuple[str, dict[str, str]],
) -> None:
    """The model was not trained on forecasts from fewer than 8 values (their scale, from a
    handful of values, is arbitrary: z of 1e4 and more): the first 8 values' anomaly_z is null,
    however the values are chunked, on a retry, and in a prediction."""
    url, _ = embedded
    values = series(12)
    post(url, "/v1/sessions/create", {"session_id": "warming"})
    scores = []
    for t, size in ((0, 3), (3, 6), (9, 3)):
        body = {"session_id": "warming", "inputs": values[t : t + size], "seq": t}
        status, reply = post(url, "/v1/sessions/step", body)
        assert status == 200
        assert post(url, "/v1/sessions/step", body)[1] == reply  # a retry: the same answer
        scores += [o["anomaly_z"] for o in reply["outputs"]]
    assert scores[:8] == [None] * 8 and all(z is not None for z in scores[8:])
    _, predicted = post(url, "/v1/predict", {"inputs": values})
    assert [o["anomaly_z"] for o in predicted["outputs"]][:8] == [None] * 8
    assert [o["anomaly_z"][0] for o in predicted["outputs"][8:]] == pytest.approx(
        [z[0] for z in scores[8:]], rel=1e-4, abs=1e-4
    )


def test_export_import_and_a_clean_restart_keep_the_statistics(
    checkpoint: Path, embedded: tuple[str, dict[str, str]]
) -> None:
    from service.state_blob import decode, encode

    url, _ = embedded
    values = series()
    whole = in_process(checkpoint, values)
    post(url, "/v1/sessions/create", {"session_id": "kept"})
    stream(url, "kept", values, [12])
    status, exported = post(url, "/v1/sessions/export", {"session_id": "kept"})
    assert status == 200
    header, state = decode(base64.b64decode(exported["blob"]))
    assert header["stats"] == 3 and state.stats is not None and float(state.stats[0]) > 1.0
    status, info = post(
        url, "/v1/sessions/import", {"blob": exported["blob"], "session_id": "copied"}
    )
    assert status == 200 and info["t"] == 12
    assert_close(stream(url, "copied", values, [18], t=12), whole[12:])
    # statistics no series of 12 values makes: a weight beyond t, or beyond what 12 values
    # weigh at half-life 8 (7.78), a negative variance, a NaN
    assert float(state.stats[0]) == pytest.approx((1 - 2 ** (-12 / 8)) / (1 - 2 ** (-1 / 8)))
    bad_stats = ([13.0, 4000.0, 1.0], [7.9, 4000.0, 1.0], [5.0, 4000.0, -1.0], [5.0, math.nan, 1.0])
    for bad in bad_stats:
        forged = encode(
            type(state)(state.h, state.c, state.next_mean, state.next_std, None, torch.tensor(bad)),
            header,
        )
        status, body = post(
            url,
            "/v1/sessions/import",
            {"blob": base64.b64encode(forged).decode(), "session_id": "forged"},
        )
        assert status == 422 and body["error"]["code"] in ("blob_out_of_range", "blob_corrupted")
    status, body = post(url, "/v1/sessions/get", {"session_id": "forged"})
    assert status == 404
    without = encode(type(state)(state.h, state.c, state.next_mean, state.next_std), header)
    status, body = post(
        url,
        "/v1/sessions/import",
        {"blob": base64.b64encode(without).decode(), "session_id": "bare"},
    )
    assert status == 422 and body["error"]["code"] == "blob_corrupted"


def test_a_clean_restart_continues_the_series(checkpoint: Path, tmp_path: Path) -> None:
    values = series()
    whole = in_process(checkpoint, values)
    env = {"LSTM_MODEL_DIR": str(checkpoint), "LSTM_SNAPSHOT_PATH": str(tmp_path / "s.snap")}
    with bentoml_server(env) as url:
        post(url, "/v1/sessions/create", {"session_id": "restarted"})
        first = stream(url, "restarted", values, [9])
    with bentoml_server(env) as url:
        rest = stream(url, "restarted", values, [21], t=9)
    assert_close(first + rest, whole)


def test_redis_sessions_keep_the_statistics(checkpoint: Path, redis: RedisServer) -> None:
    values = series()
    whole = in_process(checkpoint, values)
    env = {"LSTM_MODEL_DIR": str(checkpoint), "LSTM_REDIS_URL": redis.url}
    with bentoml_server(env) as url:
        post(url, "/v1/sessions/create", {"session_id": "shared"})
        first = stream(url, "shared", values, [4, 7])
    with bentoml_server(env) as url:  # another replica: the state only Redis holds
        rest = stream(url, "shared", values, [19], t=11)
    assert_close(first + rest, whole)
