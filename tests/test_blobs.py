"""Exported session blobs that cannot be forged (LSTM_BLOB_KEY) and whose every field is checked.

Before: a blob was protected by a plain SHA-256 that anyone can recompute, and an import took a
forged ``next_std`` of 0 or -1, ``h`` = 3e38 or ``t`` = 2**64 (every later step then answered 500).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from service.backends import EmbeddedBackend
from service.batcher import MicroBatcher
from service.engine import Engine, EngineLimits
from service.errors import (
    BlobCorrupted,
    BlobOutOfRange,
    BlobSignatureInvalid,
    ServiceError,
    SessionNotFound,
)
from service.schemas import Step
from service.sessions import SessionStore, StatePool, StoreLimits
from service.state_blob import SessionState, SignatureError, decode, encode
from tests.servers import bentoml_server
from tests.test_engine import MODEL, tiny_model

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
VALUES = [0.3, -0.2, 1.1, 0.7, -0.9, 0.4]


def engine(key: bytes | None) -> Engine:
    pool = StatePool(2, 8, 1, 16, "cpu")
    store = SessionStore(pool, StoreLimits(16, 60, 60, False, 10))
    return Engine(
        EmbeddedBackend(store),
        MicroBatcher(tiny_model(), pool),
        model=MODEL,
        n_features=1,
        limits=EngineLimits(16, 64, 8, 4),
        blob_key=key,
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def exported(source: Engine, sid: str = "src") -> bytes:
    await source.create(sid, None)
    await source.step(Step(session_id=sid, inputs=[[v] for v in VALUES], seq=0))
    return (await source.export(sid))[1]


def test_a_signed_blob_moves_between_deployments_of_one_key_exactly() -> None:
    async def scenario() -> None:
        here, there = engine(KEY), engine(KEY)
        blob = await exported(here)
        assert decode(blob, KEY)[0]["signed"] is True
        moved = await there.import_blob(blob, "moved", None)
        assert moved.t == len(VALUES)
        a = await here.step(Step(session_id="src", inputs=[[0.5]], seq=6))
        b = await there.step(Step(session_id="moved", inputs=[[0.5]], seq=6))
        assert a["outputs"] == b["outputs"]

    run(scenario())


def forge_unsigned(blob: bytes, key: bytes | None, **changes: Any) -> bytes:
    """What anyone can make: a blob read, changed, and re-checksummed (no key)."""
    header, state = decode(blob, key)
    header = {
        k: v
        for k, v in header.items()
        if k not in ("layers", "hidden", "features", "dtype", "signed", "window")
    }
    tensors = {
        f.name: getattr(state, f.name).clone()
        for f in dataclasses.fields(state)
        if getattr(state, f.name) is not None
    }
    for name, value in changes.items():
        if name in tensors:
            tensors[name].fill_(value)
        else:
            header[name] = value
    return encode(SessionState(**tensors), header)


@pytest.mark.parametrize(
    ("importer_key", "make", "refusal"),
    [
        (KEY, lambda b: forge_unsigned(b, KEY, t=2), "not signed"),
        (KEY, lambda b: b[:-1] + bytes([b[-1] ^ 1]), "does not match"),
        (OTHER_KEY, lambda b: b, "does not match"),
        (None, lambda b: b, "no key to check it with"),
    ],
    ids=["forged and re-checksummed", "signature flipped", "another key's", "signed, no key here"],
)
def test_a_blob_not_signed_with_this_key_is_refused_and_nothing_is_created(
    importer_key: bytes | None, make: Callable[[bytes], bytes], refusal: str
) -> None:
    async def scenario() -> None:
        blob = make(await exported(engine(KEY)))
        importer = engine(importer_key)
        with pytest.raises(BlobSignatureInvalid, match=refusal):
            await importer.import_blob(blob, "forged", None)
        with pytest.raises(SessionNotFound):
            await importer.get("forged")
        assert len(importer.store) == 0

    run(scenario())


def test_an_unsigned_blob_to_a_keyed_decode_and_back_is_a_signature_error() -> None:
    state = SessionState(torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(1), torch.ones(1))
    with pytest.raises(SignatureError):
        decode(encode(state, {"t": 0}), KEY)
    with pytest.raises(SignatureError):
        decode(encode(state, {"t": 0}, KEY), None)
    assert decode(encode(state, {"t": 0}, KEY), KEY)[0]["t"] == 0


# The forgeries found from outside, and the rest of the ranges a state can have. Without a key
# a blob is only checksummed, so these are what an attacker can import: each must be refused.
OUT_OF_RANGE = {
    "next_std 0": {"next_std": 0.0},
    "next_std -1": {"next_std": -1.0},
    "next_std huge": {"next_std": 1e30},
    "next_mean huge": {"next_mean": 1e30},
    "h 3e38": {"h": 3e38},
    "h 1.5": {"h": 1.5},
    "c beyond t": {"c": 7.5},
    "t 2**64": {"t": 2**64},
    "t -3": {"t": -3},
    "t a float": {"t": 6.0},
    "t a string": {"t": "6"},
    "t true": {"t": True},
}


@pytest.mark.parametrize("changes", OUT_OF_RANGE.values(), ids=OUT_OF_RANGE.keys())
def test_a_blob_out_of_the_models_range_is_refused_and_nothing_is_created(
    changes: dict[str, Any],
) -> None:
    async def scenario() -> None:
        blob = forge_unsigned(await exported(engine(None)), None, **changes)
        importer = engine(None)
        with pytest.raises(BlobOutOfRange):
            await importer.import_blob(blob, "forged", None)
        assert len(importer.store) == 0

    run(scenario())


def test_a_forecast_is_held_to_the_models_own_bounds() -> None:
    """A fixed ±1e15 refused forecasts the model makes from inputs it accepts (a review); the
    model's bounds are what its head reaches, so a forecast just past them is refused, and a
    session at t = 0 holds no forecast but the fresh one."""

    async def scenario() -> None:
        source = engine(None)
        bounds = source.forecast_bounds
        blob = await exported(source)
        mean, std_max, std_min = (float(b[0]) for b in bounds)
        for changes in (
            {"next_mean": mean * 1.001},
            {"next_mean": -mean * 1.001},
            {"next_std": std_max * 1.001},
            {"next_std": std_min / 1.001},
        ):
            with pytest.raises(BlobOutOfRange, match="beyond the model's"):
                await engine(None).import_blob(forge_unsigned(blob, None, **changes), "f", None)
        edge = forge_unsigned(blob, None, next_mean=mean * 0.999, next_std=std_max * 0.999)
        assert (await engine(None).import_blob(edge, "edge", None)).t == len(VALUES)
        await source.create("fresh", None)
        fresh = (await source.export("fresh"))[1]
        assert (await engine(None).import_blob(fresh, "fresh", None)).t == 0
        with pytest.raises(BlobOutOfRange, match=r"a forecast before any value \(t = 0\)"):
            await engine(None).import_blob(forge_unsigned(fresh, None, next_mean=0.5), "f", None)

    run(scenario())


@pytest.mark.parametrize("running", [False, True])
def test_no_forecast_from_inputs_the_schema_accepts_goes_beyond_the_bounds(running: bool) -> None:
    from model.forecaster import ForecasterConfig, LSTMForecaster
    from model.scaling import RunningScaleForecaster
    from service.schemas import VALUE_CEILING

    torch.manual_seed(1)
    config = ForecasterConfig(("v", "w"), hidden_size=8, num_layers=2)
    if running:
        config = dataclasses.replace(config, scaling="running", scale_halflife=3.0)
    model = (RunningScaleForecaster if running else LSTMForecaster)(config).eval()
    with torch.no_grad():
        model.head.weight.mul_(4.0)  # forecasts far out, so that the bounds are approached
    bounds = model.forecast_bounds(VALUE_CEILING)
    inputs = torch.cat(
        [
            (torch.rand(16, 64, 2) * 2 - 1) * VALUE_CEILING,
            torch.sign(torch.randn(16, 64, 2)) * VALUE_CEILING,
            torch.randn(16, 64, 2),
        ]
    )
    with torch.no_grad():
        f = model(inputs)
    mean, std = f.mean.double(), f.std.double()
    assert bool((mean.abs() <= bounds.mean).all()) and bool((std <= bounds.std_max).all())
    assert bool((std >= bounds.std_min).all())
    assert float((mean.abs() / bounds.mean).max()) > 0.05  # not a bound no forecast comes near


def test_states_the_model_produces_are_in_range() -> None:
    """The bounds are not too tight: a long stream of large inputs exports and imports."""

    async def scenario() -> None:
        source = engine(None)
        await source.create("long", None)
        for t in range(0, 64, 16):
            chunk = [[(-1) ** i * 50.0] for i in range(16)]
            await source.step(Step(session_id="long", inputs=chunk, seq=t))
        blob = (await source.export("long"))[1]
        assert (await engine(None).import_blob(blob, "long", None)).t == 64

    run(scenario())


@pytest.mark.parametrize(
    "blob",
    [
        b"LSTMSTATE1\n",
        b"LSTMSTATE1\n" + b"\xff" * 40,
        b"LSTMSTATE1\n\x05\x00\x00\x00[1,2]" + b"0" * 32,
    ],
    ids=["truncated", "garbage header length", "header not an object"],
)
def test_a_truncated_or_malformed_blob_is_corrupted(blob: bytes) -> None:
    async def scenario() -> None:
        for key in (None, KEY):
            with pytest.raises(BlobCorrupted):
                await engine(key).import_blob(blob, "x", None)

    run(scenario())


@pytest.mark.slow
def test_a_server_with_a_key_signs_exports_and_refuses_forgeries(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    env = {"LSTM_BLOB_KEY": KEY.decode(), "LSTM_SNAPSHOT_PATH": ""}
    with bentoml_server(env, log=log) as url:

        def post(route: str, body: dict[str, Any]) -> httpx.Response:
            return httpx.post(f"{url}/v1/sessions/{route}", json=body, timeout=30)

        assert post("create", {"session_id": "wire"}).status_code == 200
        body = {"session_id": "wire", "seq": 0, "inputs": [[v] for v in VALUES]}
        assert post("step", body).status_code == 200
        blob = base64.b64decode(post("export", {"session_id": "wire"}).json()["blob"])
        assert decode(blob, KEY)[0]["signed"] is True
        ok = post("import", {"blob": base64.b64encode(blob).decode(), "session_id": "copy"})
        assert ok.status_code == 200 and ok.json()["t"] == len(VALUES)
        forged = forge_unsigned(blob, KEY, next_std=-1.0)
        refused = post("import", {"blob": base64.b64encode(forged).decode(), "session_id": "f"})
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "blob_signature_invalid"
        assert post("get", {"session_id": "f"}).status_code == 404
    text = log.read_text()
    assert KEY.decode() not in text, "the key was logged"
    assert "Traceback" not in text
    assert sum("blob_signature_invalid" in line for line in text.splitlines()) == 1


def test_the_key_must_be_long_enough() -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError):
        Settings(blob_key="short")
    assert "k" * 32 not in repr(Settings(blob_key="k" * 32))


def test_every_blob_refusal_is_a_coded_422() -> None:
    for error in (BlobCorrupted, BlobSignatureInvalid, BlobOutOfRange):
        assert issubclass(error, ServiceError) and error.status == 422
