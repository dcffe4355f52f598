"""Clients of a deployment behind the proxy, shared by the native topology (test_topology) and
the containers (test_compose): sessions stepped by HTTP with seq and retried until they land,
streams over the WebSocket, Prometheus queries, and the model run offline to compare against."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import httpx
import numpy as np
import torch

from model import load_checkpoint
from tests.conftest import SHIPPED


def offline(values: np.ndarray) -> np.ndarray:
    model = load_checkpoint(SHIPPED).model
    with torch.no_grad():
        return model(torch.from_numpy(values).unsqueeze(0)).mean[0].numpy()


async def stream_via_proxy(proxy: str, sid: str, values: np.ndarray) -> list[float]:
    headers = {"X-Session-Id": sid}
    means: list[float] = []
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{proxy}/v1/sessions/create", json={"session_id": sid}) as r:
            assert r.status == 200, await r.text()
        for t in range(0, len(values), 2):
            body = {"session_id": sid, "inputs": values[t : t + 2].tolist(), "seq": t}
            for _ in range(50):  # retry with the same seq until it lands
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.post(f"{proxy}/v1/sessions/step", json=body) as r:
                        reply: dict[str, Any] = await r.json()
                        if r.status == 200:
                            break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError(f"{sid}: seq {t} never landed")
            assert reply["t"] == min(t + 2, len(values))
            means += [o["mean"][0] for o in reply["outputs"]]
    return means


def prom_query(prom: str, query: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{prom}/api/v1/query", params={"query": query}).json()
    assert reply["status"] == "success", reply
    return list(reply["data"]["result"])


async def stream_messages(url: str, values: np.ndarray, t0: int) -> list[dict[str, Any]]:
    """One message a value over a WebSocket, each with its seq; the replies in order."""
    replies = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        for t in range(len(values)):
            await ws.send_json({"inputs": values[t : t + 1].tolist(), "seq": t0 + t})
            replies.append(await ws.receive_json(timeout=30))
    return replies
