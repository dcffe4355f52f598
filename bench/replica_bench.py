"""Replicas on one machine: the HTTP step straight to one replica, through nginx
(deploy/nginx.conf, routing by ``X-Session-Id``) to one, and through nginx to two.

    python bench/replica_bench.py [--clients 64] [--duration 3] [--rounds 2] [--redis]

Each replica is a real ``bentoml serve`` (one worker, its own BentoML home); with ``--redis``
they share a redis-server, as the Compose deployment does, else each keeps its sessions in its
own embedded store (nginx's consistent hash sends a session to one replica, every time). The
load is load_bench's closed loop (aiohttp, 1-timestep steps with ``seq``), each request carrying
``X-Session-Id``. The three set-ups are all up at once and measured in alternating rounds.
Prints a table and writes ``runs/bench/replica_bench.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from load_bench import (  # this directory: run as a script, like load_bench
    RUNS,
    SERVER_ENV,
    CpuMeter,
    ServerCpu,
    Window,
    error_code,
    http_client,
    new_loop,
    quantile_ms,
    step_body,
)

from tests.servers import PROCESS_GROUPS, RedisServer, bentoml_server, free_port
from tests.topology import render_nginx


async def step_worker(
    http: aiohttp.ClientSession, base: str, session_id: str, window: Window
) -> None:
    seq, url = 0, f"{base}/v1/sessions/step"
    headers = {"Content-Type": "application/json", "X-Session-Id": session_id}
    while window.open:
        body = orjson.dumps(step_body(session_id, seq))
        started = time.perf_counter()
        async with http.post(url, data=body, headers=headers) as resp:
            raw = await resp.read()
        reply: Any = orjson.loads(raw) if raw else None
        if resp.status == 200:
            seq = reply["t"]
            window.answered(started, 1)
        else:
            window.error(error_code(resp.status, reply))


async def create(http: aiohttp.ClientSession, base: str, ids: list[str]) -> None:
    """Sessions made where nginx will route their steps: by their X-Session-Id."""

    async def one(session_id: str) -> None:
        headers = {"Content-Type": "application/json", "X-Session-Id": session_id}
        body = orjson.dumps({"session_id": session_id})
        async with http.post(f"{base}/v1/sessions/create", data=body, headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"create {session_id}: {resp.status} {await resp.text()}")

    await asyncio.gather(*(one(i) for i in ids))


async def measure(
    base: str, cpus: list[ServerCpu], clients: int, duration: float, tag: str
) -> dict[str, Any]:
    async with http_client(clients) as http:
        ids = [f"{tag}-{i}" for i in range(clients)]
        await create(http, base, ids)
        now = time.perf_counter()
        window = Window(start=now + 1.0, end=now + 1.0 + duration)
        tasks = [asyncio.create_task(step_worker(http, base, i, window)) for i in ids]
        await asyncio.sleep(1.0)
        meters = [CpuMeter(c) for c in cpus]
        for m in meters:
            m.start()
        await asyncio.sleep(duration)
        used = [m.stop() for m in meters]
        await asyncio.gather(*tasks)
    return {
        "req_s": window.requests / duration,
        "p50_ms": quantile_ms(window.latencies, 0.5),
        "p99_ms": quantile_ms(window.latencies, 0.99),
        "errors": window.errors,
        "replica_cpu_pct": [u.server for u in used],
        "client_cpu_pct": used[0].client,
    }


@contextlib.contextmanager
def nginx(hosts: list[str], tmp: Path) -> Iterator[str]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    conf = tmp / f"nginx-{port}.conf"
    conf.write_text(render_nginx(hosts, port))
    pid = tmp / f"nginx-{port}.pid"
    args = [binary, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / f"nginx-{port}.err")]
    proc = subprocess.Popen([*args, "-g", f"daemon off; pid {pid};"])
    try:
        for _ in range(50):
            with contextlib.suppress(OSError):
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--redis", action="store_true", help="replicas share a redis-server")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="replica-bench-"))
    results: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        env = dict(SERVER_ENV)
        if args.redis:
            redis = RedisServer(tmp)
            redis.start()
            stack.callback(redis.stop)
            env["LSTM_REDIS_URL"] = redis.url
        replicas = [
            stack.enter_context(
                bentoml_server(
                    {**env, "BENTOML_HOME": str(tmp / f"home-{i}")}, log=tmp / f"r{i}.log"
                )
            )
            for i in range(3)
        ]
        cpus = [ServerCpu(PROCESS_GROUPS[u]) for u in replicas]
        hosts = [u.removeprefix("http://") for u in replicas]
        one = stack.enter_context(nginx([hosts[0], hosts[0]], tmp))  # both lines: one replica
        two = stack.enter_context(nginx([hosts[1], hosts[2]], tmp))
        setups = {
            "direct, 1 replica": (replicas[0], cpus[:1]),
            "nginx, 1 replica": (one, cpus[:1]),
            "nginx, 2 replicas": (two, cpus[1:]),
        }
        with asyncio.Runner(loop_factory=new_loop) as runner:
            for r in range(args.rounds):
                order = list(setups.items())
                for name, (base, used) in order if r % 2 == 0 else reversed(order):
                    tag = f"{name.replace(' ', '').replace(',', '')}-{r}"
                    row = runner.run(measure(base, used, args.clients, args.duration, tag))
                    results.setdefault(name, []).append(row)
                    print(f"  round {r} {name}: {row}", flush=True)
    print(f"\n| set-up | req/s at {args.clients} clients (median) | p50 / p99 ms | replica CPU % |")
    print("|---|---|---|---|")
    summary = {}
    for name, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("req_s", "p50_ms", "p99_ms")}
        cpu = [
            round(statistics.median(r["replica_cpu_pct"][i] for r in rows))
            for i in range(len(rows[0]["replica_cpu_pct"]))
        ]
        summary[name] = {**med, "replica_cpu_pct": cpu, "rounds": rows}
        print(
            f"| {name} | {med['req_s']:,.0f} | {med['p50_ms']:.1f} / {med['p99_ms']:.1f} | {cpu} |"
        )
    out = RUNS / "replica_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": summary}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
