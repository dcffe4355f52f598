"""Tier 4: many concurrent clients against a real server, each session checked offline."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import pytest
import torch

from model import load_checkpoint
from tests.conftest import SHIPPED
from tests.servers import bentoml_server

pytestmark = pytest.mark.slow

SESSIONS = 200
STEPS = 20


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with bentoml_server({"LSTM_MAX_SESSIONS": "1024"}) as url:  # 3 runs x 200 sessions
        yield url


def plan(held_out: list[np.ndarray], seed: int = 0) -> list[tuple[np.ndarray, list[int]]]:
    """For each session: a held-out slice and how to chunk it into STEPS steps."""
    rng = random.Random(seed)
    plans = []
    for i in range(SESSIONS):
        sizes = [rng.randint(1, 6) for _ in range(STEPS)]
        series = held_out[i % len(held_out)]
        start = (i // len(held_out)) * 97
        plans.append((series[start : start + sum(sizes)], sizes))
    return plans


async def create(http: aiohttp.ClientSession, url: str, sid: str) -> None:
    async with http.post(f"{url}/v1/sessions/create", json={"session_id": sid}) as r:
        assert r.status == 200, await r.text()


async def over_http(
    http: aiohttp.ClientSession, url: str, sid: str, values: np.ndarray, sizes: list[int]
) -> list[dict[str, Any]]:
    await create(http, url, sid)
    outputs: list[dict[str, Any]] = []
    t = 0
    for size in sizes:
        body = {"session_id": sid, "inputs": values[t : t + size].tolist(), "seq": t}
        async with http.post(f"{url}/v1/sessions/step", json=body) as r:
            reply = await r.json()
            assert r.status == 200, reply
        t += size
        assert reply["t"] == t
        outputs += reply["outputs"]
    async with http.post(f"{url}/v1/sessions/delete", json={"session_id": sid}) as r:
        assert r.status == 200
    return outputs


async def over_websocket(
    http: aiohttp.ClientSession, url: str, sid: str, values: np.ndarray, sizes: list[int]
) -> list[dict[str, Any]]:
    await create(http, url, sid)
    outputs: list[dict[str, Any]] = []
    t = 0
    async with http.ws_connect(f"{url}/v1/stream?session_id={sid}") as ws:
        for size in sizes:
            await ws.send_json({"inputs": values[t : t + size].tolist(), "seq": t})
            reply = await ws.receive_json()
            t += size
            assert reply.get("t") == t, reply
            outputs += reply["outputs"]
    return outputs


async def over_step_many(
    http: aiohttp.ClientSession, url: str, plans: list[tuple[np.ndarray, list[int]]], first: int
) -> list[list[dict[str, Any]]]:
    """A gateway: each request carries two consecutive chunks of every session it serves."""
    sids = [f"many-{first + i}" for i in range(len(plans))]
    for sid in sids:
        await create(http, url, sid)
    outputs: list[list[dict[str, Any]]] = [[] for _ in plans]
    ts = [0] * len(plans)
    for r in range(0, STEPS, 2):
        items = []
        for k in (r, r + 1):
            for i, (values, sizes) in enumerate(plans):
                t = sum(sizes[:k])
                items.append(
                    {"session_id": sids[i], "inputs": values[t : t + sizes[k]].tolist(), "seq": t}
                )
        async with http.post(f"{url}/v1/sessions/step_many", json={"items": items}) as resp:
            body = await resp.json()
            assert resp.status == 200, body
        for item, result in zip(items, body["results"], strict=True):
            assert result["ok"], result
            i = sids.index(item["session_id"])
            ts[i] += len(item["inputs"])
            assert result["result"]["t"] == ts[i]
            outputs[i] += result["result"]["outputs"]
    return outputs


@pytest.mark.parametrize("transport", ["http", "websocket", "step_many"])
def test_200_concurrent_sessions_each_equal_their_offline_run(
    server: str,
    held_out_series: list[np.ndarray],
    transport: str,
) -> None:
    plans = plan(held_out_series)

    async def main() -> list[list[dict[str, Any]]]:
        connector = aiohttp.TCPConnector(limit=64 if transport == "http" else 0)
        async with aiohttp.ClientSession(connector=connector) as http:
            if transport == "step_many":  # two gateways, each with half of the sessions
                half = len(plans) // 2
                a, b = await asyncio.gather(
                    over_step_many(http, server, plans[:half], 0),
                    over_step_many(http, server, plans[half:], half),
                )
                return a + b
            run = over_http if transport == "http" else over_websocket
            return await asyncio.gather(
                *(
                    run(http, server, f"{transport}-{i}", values, sizes)
                    for i, (values, sizes) in enumerate(plans)
                )
            )

    results = asyncio.run(main())
    model = load_checkpoint(SHIPPED).model
    worst = 0.0
    with torch.no_grad():
        for (values, _), outputs in zip(plans, results, strict=True):
            offline = model(torch.from_numpy(values).unsqueeze(0))
            mean, std = offline.mean, offline.std
            got_mean = np.array([o["mean"] for o in outputs])
            got_std = np.array([o["std"] for o in outputs])
            worst = max(
                worst,
                float(np.abs(got_mean - mean[0].numpy()).max()),
                float(np.abs(got_std - std[0].numpy()).max()),
            )
    assert worst <= 1e-5, f"largest difference from the offline run: {worst}"
