"""The Compose topology run natively from the same config files: Redis, two service replicas,
nginx routing by X-Session-Id, Prometheus scraping the replicas and evaluating the alert rules."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import pytest
import torch

from model import load_checkpoint
from tests.conftest import SHIPPED
from tests.servers import RedisServer, bentoml_server, free_port, kill_hard, need_binary
from tests.topology import render_nginx, render_prometheus, render_rules

pytestmark = pytest.mark.slow


@dataclass
class Topology:
    replicas: list[str]
    proxy: str
    prometheus: str


def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(url)


@contextlib.contextmanager
def process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    nginx, prometheus = need_binary("nginx"), need_binary("prometheus")
    tmp = tmp_path_factory.mktemp("topology")
    redis = RedisServer(tmp)
    redis.start()
    env = {"LSTM_REDIS_URL": redis.url, "LSTM_SWEEP_INTERVAL_S": "1"}
    try:
        with bentoml_server(env) as a, bentoml_server(env) as b:
            replicas = [a, b]
            hosts = [u.removeprefix("http://") for u in replicas]
            proxy_port, prom_port = free_port(), free_port()
            (tmp / "nginx.conf").write_text(render_nginx(hosts, proxy_port))
            (tmp / "alerts.yml").write_text(render_rules("2s"))
            (tmp / "prometheus.yml").write_text(render_prometheus(hosts, tmp / "alerts.yml"))
            nginx_args = [
                nginx,
                "-p",
                str(tmp),
                "-c",
                str(tmp / "nginx.conf"),
                "-e",
                str(tmp / "nginx-error.log"),
                "-g",
                f"daemon off; pid {tmp / 'nginx.pid'};",
            ]
            prom_args = [
                prometheus,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ]
            with process(nginx_args, tmp / "nginx.log"), process(prom_args, tmp / "prometheus.log"):
                proxy = f"http://127.0.0.1:{proxy_port}"
                prom = f"http://127.0.0.1:{prom_port}"
                wait_http(f"{proxy}/nginx-health")
                wait_http(f"{prom}/-/ready")
                yield Topology(replicas, proxy, prom)
    finally:
        redis.stop()


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


def test_sessions_through_the_proxy_are_exact_and_spread(
    topology: Topology,
    held_out_series: list[np.ndarray],
) -> None:
    plans = [held_out_series[i][100 + 7 * i : 116 + 7 * i] for i in range(10)]

    async def main() -> list[list[float]]:
        return await asyncio.gather(
            *(stream_via_proxy(topology.proxy, f"proxied-{i}", v) for i, v in enumerate(plans))
        )

    for values, means in zip(plans, asyncio.run(main()), strict=True):
        np.testing.assert_allclose(means, offline(values)[:, 0], atol=1e-5)
    served = []
    for url in topology.replicas:
        text = httpx.get(f"{url}/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("lstm_timesteps_processed_total"))
        served.append(float(line.split()[-1]))
    assert all(n > 0 for n in served), f"consistent hashing left a replica idle: {served}"


def test_prometheus_scrapes_every_replica_and_alerts_when_one_dies(
    topology: Topology,
    held_out_series: list[np.ndarray],
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        up = prom_query(topology.prometheus, 'up{job="lstm"}')
        steps = prom_query(topology.prometheus, "lstm_timesteps_processed_total")
        if len(up) == 2 and all(r["value"][1] == "1" for r in up) and len(steps) == 2:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"Prometheus never saw both replicas: {up} {steps}")
    assert prom_query(topology.prometheus, "lstm_model_info")
    assert prom_query(topology.prometheus, 'min(lstm_store_up{job="lstm"})')[0]["value"][1] == "1"

    kill_hard(topology.replicas[0])
    deadline = time.monotonic() + 40
    firing: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not firing:
        alerts = httpx.get(f"{topology.prometheus}/api/v1/alerts").json()["data"]["alerts"]
        firing = [
            a
            for a in alerts
            if a["labels"]["alertname"] == "LSTMReplicaDown" and a["state"] == "firing"
        ]
        time.sleep(0.5)
    assert firing, (
        "LSTMReplicaDown did not fire after a replica was killed: "
        f"up={prom_query(topology.prometheus, 'up')} "
        f"rules={httpx.get(f'{topology.prometheus}/api/v1/rules').json()}"
    )
    assert firing[0]["labels"]["instance"] == topology.replicas[0].removeprefix("http://")

    # The proxy keeps serving every session from the surviving replica.
    values = held_out_series[3][300:310]
    means = asyncio.run(stream_via_proxy(topology.proxy, "after-the-kill", values))
    np.testing.assert_allclose(means, offline(values)[:, 0], atol=1e-5)
