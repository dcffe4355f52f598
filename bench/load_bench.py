"""Load against real ``bentoml serve`` processes: what a client sees, end to end, per API.

    python bench/load_bench.py [--duration 3] [--quick] [--record] [--out FILE] [--plot FILE]
                               [--server-env NAME=VALUE ...] [--wait-quiet S] [--journal]

What is measured. Every scenario is a closed loop: each worker sends a request, waits for the
answer, and sends the next at once, for ``--duration`` seconds after a short warm-up. Throughput
and latency count only answers that arrive inside the measured window; errors are counted over the
whole scenario (warm-up included), so none is hidden. Each scenario makes its own sessions with
fresh ids, so ``t`` starts at 0, and sends every step with the right ``seq``.

- HTTP step: concurrency C = C sessions, each with one worker stepping it by 1 timestep at a time;
  against the default (micro-batched) server and one started with ``LSTM_MAX_BATCH=1``.
- WebSocket ``/v1/stream``: C sessions, one connection each, one message in flight per connection.
- ``step_many``: concurrency C = items per request, one 1-timestep item for each of C sessions.
  Two requesters run in parallel over disjoint sets of C sessions each (2C sessions in all), so the
  server parses one request while the other's batch computes. Timesteps/s counts applied items.
- ``/v1/predict``, the stateless alternative: every call resends a whole history (16, 256, 1024
  timesteps) at concurrency 16; each call answers one new value, so its timesteps/s is requests/s.
  And a 256-step history from one client, whose p50 is held to issue 14's target: under 3x (ONNX
  Runtime's time for that sequence in the recorded ``model_bench-cpu.json``, plus ``/v1/ping``'s
  p50 at one client).
- ``--journal`` instead: the embedded store's write-ahead journal (``LSTM_JOURNAL``) side by
  side, three servers up at once (off, write, fsync), on step_many (64 and 256) and the WebSocket
  (64), ``--repeat`` alternating rounds; each mode's timesteps/s against off, round by round.
- The floors: BentoML's trivial ``/v1/ping`` at the same concurrencies on the batched server
  (every route but the fast ones pays at least this); the fast routes' own floor, a step resent
  with the seq and inputs it was applied with, answered from its replay record (parse,
  validate, lock, seq check, reply: all of the hot path but the batcher and the model), over
  HTTP and over the stream; and the bare model's batched one-timestep step in this process (no
  HTTP): batch 1, 16, 64, 256, with torch's default thread count and with one thread (the
  server's, LSTM_TORCH_THREADS).

Servers run one after another, never two at once (the machine this was written on has 2 cores):
first the batched server for every scenario but one, then the unbatched one for the HTTP step. The
load generator is aiohttp on uvloop with orjson (httpx costs several times more CPU per request).
Per scenario it records its own CPU (``time.process_time``) and the server's (psutil, over the
server's process tree) across the measured window, as % of one core, so a reader can see which
side saturates; and the rest of the machine's CPU ("other"), since anything else running on the
same cores skews every figure (a row notes it when that passes 20%).

Results: a markdown table and the targets on stdout, ``runs/bench/load_bench.json`` (rows,
targets, machine, command line) and ``runs/bench/load_bench.png``; with ``--record``, the same
files under the committed ``bench/results/`` that the README quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.servers import PROCESS_GROUPS, bentoml_server, serve_command

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# git-ignored: a run that is not a recording never rewrites the figures the README quotes
RUNS = ROOT / "runs" / "bench"
MODEL_DIR = ROOT / "models" / "acsf1-forecaster"
CONCURRENCIES = (1, 16, 64, 256)
QUICK_CONCURRENCIES = (16, 64)
HISTORIES = (16, 256, 1024)
QUICK_HISTORIES = (16, 256)
PREDICT_CONCURRENCY = 16
# /v1/predict with this history, one client: its p50 against ONNX Runtime's time for the same
# sequence (the recorded model bench's, batch 1) plus /v1/ping's p50 at one client, times 3.
PREDICT_TARGET_HISTORY = 256
MODEL_BENCH = RESULTS / "model_bench-cpu.json"
MANY_REQUESTERS = 2
JSON_HEADERS = {"Content-Type": "application/json"}
SERVER_ENV = {"LSTM_MAX_SESSIONS": "50000", "LSTM_SNAPSHOT_PATH": ""}

RUNS_MADE = itertools.count()  # fresh session ids for each run of a scenario
Worker = Coroutine[Any, Any, None]
MakeWorkers = Callable[[aiohttp.ClientSession, "Window", list[str]], list[Worker]]


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Window:
    """The measured interval of one scenario, and what its workers saw."""

    start: float  # perf_counter
    end: float
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    timesteps: int = 0
    errors: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)

    @property
    def open(self) -> bool:
        """Workers keep sending while this is true (warm-up included)."""
        return time.perf_counter() < self.end

    def answered(self, started: float, timesteps: int) -> None:
        now = time.perf_counter()
        if self.start <= now <= self.end:
            self.latencies.append(now - started)
            self.requests += 1
            self.timesteps += timesteps

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] += 1


@dataclass
class Row:
    scenario: str  # the series: http_batched, http_unbatched, websocket, step_many, ping, ...
    concurrency: int
    timesteps_s: float | None = None
    req_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    client_cpu_pct: float | None = None  # % of one core, over the measured window
    server_cpu_pct: float | None = None
    other_cpu_pct: float | None = None  # the rest of the machine, same window
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        history = self.extra.get("history")
        return f"{self.scenario} (history {history})" if history else self.scenario


class ServerCpu:
    """CPU seconds of a server's arbiter and all its descendants."""

    def __init__(self, pid: int) -> None:
        import psutil

        root = psutil.Process(pid)
        self.procs = [root, *root.children(recursive=True)]

    def seconds(self) -> float:
        import psutil

        total = 0.0
        for proc in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total


def quantile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


@dataclass
class CpuUse:
    """CPU over a measured window, each in % of one core."""

    client: float  # this process: the load generator (or the in-process model)
    server: float | None
    other: float  # the rest of the machine: anything else running skews the figures


class CpuMeter:
    """Client, server and whole-machine CPU between ``start`` and ``stop``."""

    def __init__(self, server: ServerCpu | None) -> None:
        self.server = server
        self.begin = self.read()

    def read(self) -> tuple[float, float, float, float]:
        import psutil

        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
        server = self.server.seconds() if self.server is not None else 0.0
        return time.perf_counter(), time.process_time(), server, busy

    def start(self) -> None:
        self.begin = self.read()

    def stop(self) -> CpuUse:
        (w0, c0, s0, b0), (w1, c1, s1, b1) = self.begin, self.read()
        wall, client, server = w1 - w0, c1 - c0, s1 - s0
        other = max(0.0, (b1 - b0) - client - server)
        return CpuUse(
            100 * client / wall,
            100 * server / wall if self.server is not None else None,
            100 * other / wall,
        )


async def closed_loop(
    workers: Callable[[Window], list[Worker]],
    server: ServerCpu,
    *,
    warmup: float,
    duration: float,
) -> tuple[Window, CpuUse]:
    """Run the workers through warm-up and the measured window."""
    now = time.perf_counter()
    window = Window(start=now + warmup, end=now + warmup + duration)
    tasks = [asyncio.create_task(w) for w in workers(window)]
    meter = CpuMeter(server)
    await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
    meter.start()
    await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
    cpu = meter.stop()
    await asyncio.gather(*tasks)  # in-flight requests finish; they are not counted
    return window, cpu


def to_row(
    scenario: str, concurrency: int, measured: tuple[Window, CpuUse], duration: float
) -> Row:
    window, cpu = measured
    return Row(
        scenario,
        concurrency,
        timesteps_s=window.timesteps / duration,
        req_s=window.requests / duration,
        p50_ms=quantile_ms(window.latencies, 0.50),
        p99_ms=quantile_ms(window.latencies, 0.99),
        errors=window.errors,
        client_cpu_pct=cpu.client,
        server_cpu_pct=cpu.server,
        other_cpu_pct=cpu.other,
        note="; ".join(n for n in (error_note(window), busy_note(cpu)) if n),
        extra={"error_kinds": dict(window.error_kinds), "requests": window.requests},
    )


BUSY_OTHER_PCT = 20.0
QUIET_PCT = 15.0  # the whole machine, between scenarios (our server idle)
BUSY_RETRIES = 2  # with --wait-quiet: reruns of a scenario that others disturbed


def is_busy(row: Row) -> bool:
    return (row.other_cpu_pct or 0.0) >= BUSY_OTHER_PCT


def quietest(tries: list[Row]) -> Row:
    best = min(tries, key=lambda r: r.other_cpu_pct or 0.0)
    best.extra["tries"] = len(tries)
    best.extra["errors_all_tries"] = sum(r.errors for r in tries)
    return best


def wait_for_quiet(max_wait: float) -> float:
    """Wait up to ``max_wait`` s for the machine to idle (others may share it); seconds waited."""
    import psutil

    began = time.perf_counter()
    while time.perf_counter() - began < max_wait:
        if psutil.cpu_percent(interval=0.5) < QUIET_PCT:
            break
    return time.perf_counter() - began


def error_note(window: Window) -> str:
    """The commonest errors, so a failing scenario says why in the table itself."""
    kinds = window.error_kinds.most_common(2)
    return "errors: " + ", ".join(f"{k} x{n}" for k, n in kinds) if kinds else ""


def busy_note(cpu: CpuUse) -> str:
    if cpu.other < BUSY_OTHER_PCT:
        return ""
    return f"machine busy: other processes used {cpu.other:.0f}% of a core"


# --- the client side ---------------------------------------------------------------------------


def value(seq: int) -> float:
    """A smooth input series: step ``seq`` of a session always sends the same value."""
    return round(0.5 + 0.4 * math.sin(seq * 0.2), 6)


def step_body(session_id: str, seq: int) -> dict[str, Any]:
    return {"session_id": session_id, "inputs": [[value(seq)]], "seq": seq}


def error_code(status: int, reply: Any) -> str:
    if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
        return f"{status} {reply['error'].get('code')}"
    return f"{status}"


def resync(error: Any, seq: int) -> int:
    """After a seq conflict, continue from the session's t that the error names."""
    if isinstance(error, dict) and isinstance(error.get("t"), int):
        return int(error["t"])
    return seq


def http_client(limit: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60), skip_auto_headers=["Accept"]
    )


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, Any]:
    async with http.post(url, data=body, headers=JSON_HEADERS) as resp:
        raw = await resp.read()
        status = resp.status
    try:
        return status, orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return status, None


TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)


async def create_sessions(http: aiohttp.ClientSession, base: str, ids: list[str]) -> None:
    async def create(session_id: str) -> None:
        body = orjson.dumps({"session_id": session_id})
        status, reply = await post(http, f"{base}/v1/sessions/create", body)
        if status != 200:
            raise RuntimeError(f"create {session_id}: {error_code(status, reply)}")

    await asyncio.gather(*(create(i) for i in ids))


async def step_worker(
    http: aiohttp.ClientSession, base: str, session_id: str, window: Window
) -> None:
    seq, url = 0, f"{base}/v1/sessions/step"
    while window.open:
        body = orjson.dumps(step_body(session_id, seq))
        started = time.perf_counter()
        try:
            status, reply = await post(http, url, body)
        except TRANSPORT_ERRORS as e:  # resend the same seq: a replay if it was applied
            window.error(type(e).__name__)
            await asyncio.sleep(0.01)
            continue
        if status == 200:
            seq = reply["t"]
            window.answered(started, 1)
        else:
            window.error(error_code(status, reply))
            seq = resync(reply.get("error") if isinstance(reply, dict) else None, seq)


async def many_worker(
    http: aiohttp.ClientSession, base: str, session_ids: list[str], window: Window
) -> None:
    seqs = dict.fromkeys(session_ids, 0)
    url = f"{base}/v1/sessions/step_many"
    while window.open:
        body = orjson.dumps({"items": [step_body(s, q) for s, q in seqs.items()]})
        started = time.perf_counter()
        try:
            status, reply = await post(http, url, body)
        except TRANSPORT_ERRORS as e:
            window.error(type(e).__name__)
            await asyncio.sleep(0.01)
            continue
        if status != 200:
            window.error(error_code(status, reply))
            continue
        applied = 0
        for session_id, item in zip(session_ids, reply["results"], strict=True):
            if item["ok"]:
                seqs[session_id] = item["result"]["t"]
                applied += 1
            else:
                window.error(f"item {item['error'].get('code')}")
                seqs[session_id] = resync(item["error"], seqs[session_id])
        window.answered(started, applied)


async def repeat_post(
    http: aiohttp.ClientSession, url: str, body: bytes, expect: int | None, window: Window
) -> None:
    """Send the same body again and again (predict, ping); ``expect``: outputs per answer."""
    while window.open:
        started = time.perf_counter()
        try:
            status, reply = await post(http, url, body)
        except TRANSPORT_ERRORS as e:
            window.error(type(e).__name__)
            await asyncio.sleep(0.01)
            continue
        if status != 200:
            window.error(error_code(status, reply))
        elif expect is not None and len(reply["outputs"]) != expect:
            window.error("wrong number of outputs")
        else:
            window.answered(started, 1)


async def ws_worker(
    http: aiohttp.ClientSession, base: str, session_id: str, window: Window
) -> None:
    seq = 0
    url = f"ws{base.removeprefix('http')}/v1/stream?session_id={session_id}"
    while window.open:
        try:
            async with http.ws_connect(url, heartbeat=None) as ws:
                while window.open:
                    started = time.perf_counter()
                    await ws.send_str(orjson.dumps({"inputs": [[value(seq)]], "seq": seq}).decode())
                    msg = await ws.receive()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        window.error(f"websocket {msg.type.name}")
                        break
                    reply = orjson.loads(msg.data)
                    if "error" in reply:
                        window.error(f"ws {reply['error'].get('code')}")
                        seq = resync(reply["error"], seq)
                    else:
                        seq = reply["t"]
                        window.answered(started, 1)
        except TRANSPORT_ERRORS as e:
            window.error(type(e).__name__)
            await asyncio.sleep(0.01)


async def replay_worker(
    http: aiohttp.ClientSession, base: str, session_id: str, window: Window
) -> None:
    """Step once, then resend that same step (same seq, same inputs) again and again: each is
    answered from the replay record, the hot route's path without the batcher or the model."""
    url, body = f"{base}/v1/sessions/step", orjson.dumps(step_body(session_id, 0))
    status, reply = await post(http, url, body)
    if status != 200:
        window.error(error_code(status, reply))
        return
    await repeat_post(http, url, body, 1, window)


async def ws_replay_worker(
    http: aiohttp.ClientSession, base: str, session_id: str, window: Window
) -> None:
    """``replay_worker`` over the stream: the first message applies, every later one replays."""
    url = f"ws{base.removeprefix('http')}/v1/stream?session_id={session_id}"
    message = orjson.dumps({"inputs": [[value(0)]], "seq": 0}).decode()
    while window.open:
        try:
            async with http.ws_connect(url, heartbeat=None) as ws:
                while window.open:
                    started = time.perf_counter()
                    await ws.send_str(message)
                    msg = await ws.receive()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        window.error(f"websocket {msg.type.name}")
                        break
                    reply = orjson.loads(msg.data)
                    if reply.get("t") != 1:
                        window.error(f"ws {reply.get('error', {}).get('code', 'not a replay')}")
                    else:
                        window.answered(started, 1)
        except TRANSPORT_ERRORS as e:
            window.error(type(e).__name__)
            await asyncio.sleep(0.01)


# --- scenarios ---------------------------------------------------------------------------------


@dataclass
class Bench:
    base: str
    server: ServerCpu
    warmup: float
    duration: float
    quiet_wait: float = 0.0

    async def run(
        self, scenario: str, concurrency: int, limit: int, make: MakeWorkers, ids: int
    ) -> Row:
        """Create ``ids`` fresh sessions, then run ``make(http, window, session_ids)`` workers.

        With ``quiet_wait``, wait for an idle machine first, and run again (fresh sessions) when
        other processes took CPU during the window, keeping the quietest try.
        """
        tries: list[Row] = []
        for attempt in range(1 + (BUSY_RETRIES if self.quiet_wait else 0)):
            waited = wait_for_quiet(self.quiet_wait) if self.quiet_wait else 0.0
            prefix = f"{scenario}-c{concurrency}-{attempt}-{next(RUNS_MADE)}"  # rounds repeat
            tries.append(await self.once(scenario, concurrency, limit, make, ids, prefix))
            tries[-1].extra["waited_for_quiet_s"] = waited
            if not is_busy(tries[-1]):
                break
        return quietest(tries)

    async def once(
        self, scenario: str, concurrency: int, limit: int, make: MakeWorkers, ids: int, prefix: str
    ) -> Row:
        async with http_client(limit) as http:
            session_ids = [f"{prefix}-{i}" for i in range(ids)]
            await create_sessions(http, self.base, session_ids)
            measured = await closed_loop(
                lambda w: make(http, w, session_ids),
                self.server,
                warmup=self.warmup,
                duration=self.duration,
            )
        return to_row(scenario, concurrency, measured, self.duration)

    async def http_step(self, scenario: str, c: int) -> Row:
        def make(http: aiohttp.ClientSession, w: Window, ids: list[str]) -> list[Worker]:
            return [step_worker(http, self.base, i, w) for i in ids]

        return await self.run(scenario, c, c, make, ids=c)

    async def step_many(self, c: int) -> Row:
        def make(http: aiohttp.ClientSession, w: Window, ids: list[str]) -> list[Worker]:
            return [
                many_worker(http, self.base, ids[k::MANY_REQUESTERS], w)
                for k in range(MANY_REQUESTERS)
            ]

        row = await self.run("step_many", c, MANY_REQUESTERS, make, ids=c * MANY_REQUESTERS)
        row.extra["requesters"] = MANY_REQUESTERS
        return row

    async def websocket(self, c: int) -> Row:
        def make(http: aiohttp.ClientSession, w: Window, ids: list[str]) -> list[Worker]:
            return [ws_worker(http, self.base, i, w) for i in ids]

        return await self.run("websocket", c, c, make, ids=c)

    async def replayed_step(self, c: int) -> Row:
        def make(http: aiohttp.ClientSession, w: Window, ids: list[str]) -> list[Worker]:
            return [replay_worker(http, self.base, i, w) for i in ids]

        return await self.run("floor_step_replay", c, c, make, ids=c)

    async def replayed_stream(self, c: int) -> Row:
        def make(http: aiohttp.ClientSession, w: Window, ids: list[str]) -> list[Worker]:
            return [ws_replay_worker(http, self.base, i, w) for i in ids]

        return await self.run("floor_stream_replay", c, c, make, ids=c)

    async def ping(self, c: int) -> Row:
        def make(http: aiohttp.ClientSession, w: Window, ids: list[str]) -> list[Worker]:
            return [repeat_post(http, f"{self.base}/v1/ping", b"{}", None, w) for _ in range(c)]

        return await self.run("ping", c, c, make, ids=0)

    async def predict(self, history: int, c: int) -> Row:
        body = orjson.dumps({"inputs": [[value(k)] for k in range(history)]})

        def make(http: aiohttp.ClientSession, w: Window, ids: list[str]) -> list[Worker]:
            url = f"{self.base}/v1/predict"
            return [repeat_post(http, url, body, history, w) for _ in range(c)]

        row = await self.run("predict", c, c, make, ids=0)
        row.extra["history"] = history
        if row.req_s is not None:  # what the server computes, all timesteps resent included
            row.extra["computed_timesteps_s"] = row.req_s * history
        return row

    async def probe(self, path: str) -> str | None:
        """None if ``path`` answers; else why not (it may not be built yet)."""
        async with http_client(1) as http:
            if path == "/v1/stream":
                probe = f"probe-ws-{next(RUNS_MADE)}"  # a route may be probed twice
                await create_sessions(http, self.base, [probe])
                url = f"ws{self.base.removeprefix('http')}/v1/stream?session_id={probe}"
                try:
                    async with http.ws_connect(url) as ws:
                        await ws.send_str(orjson.dumps({"inputs": [[0.5]], "seq": 0}).decode())
                        msg = await asyncio.wait_for(ws.receive(), 10)
                        if msg.type != aiohttp.WSMsgType.TEXT or "t" not in orjson.loads(msg.data):
                            return f"unexpected first answer: {msg.type.name} {msg.data!r:.200}"
                except aiohttp.WSServerHandshakeError as e:
                    return f"no WebSocket at /v1/stream (handshake answered {e.status})"
                except (*TRANSPORT_ERRORS, ValueError) as e:
                    return f"/v1/stream failed: {type(e).__name__}: {e}"
                return None
            status, reply = await post(http, f"{self.base}{path}", b"{}")
            return None if status == 200 else f"{path} answered {error_code(status, reply)}"


def skipped(scenario: str, concurrencies: tuple[int, ...], why: str) -> list[Row]:
    return [Row(scenario, c, note=f"skipped: {why}") for c in concurrencies]


def naive_command(port: int) -> list[str]:
    return [sys.executable, str(ROOT / "bench" / "naive_server.py"), "--port", str(port)]


@contextlib.contextmanager
def server(
    name: str,
    env: dict[str, str],
    log_dir: Path,
    command: Callable[[int], list[str]] = serve_command,
) -> Iterator[tuple[str, ServerCpu]]:
    """A server, tried twice: the service may be caught mid-edit by someone working on it."""
    log = log_dir / f"server-{name}.log"
    with contextlib.ExitStack() as stack:
        for attempt in (1, 2):
            try:
                url = stack.enter_context(
                    bentoml_server({**SERVER_ENV, **env}, log=log, command=command)
                )
                break
            except (RuntimeError, TimeoutError) as e:
                print(f"  server {name} did not start ({e}); log: {log}", flush=True)
                if attempt == 2:
                    raise
                time.sleep(5)
        yield url, ServerCpu(PROCESS_GROUPS[url])


def run_side_by_side(runner: asyncio.Runner, opts: Options, log_dir: Path) -> list[Row]:
    """The HTTP step on our batched server and on the naive one (bench/naive_server.py), both up
    at once and measured in alternating rounds, so that whatever else loads the machine weighs on
    both alike; ``--repeat`` rounds, the first server of each round alternating."""
    rows: list[Row] = []
    with (
        server("batched", opts.server_env, log_dir) as (url, cpu),
        server("naive", {}, log_dir, command=naive_command) as (naive_url, naive_cpu),
    ):
        ours = ("http_batched", Bench(url, cpu, opts.warmup, opts.duration, opts.wait_quiet))
        naive = (
            "http_naive",
            Bench(naive_url, naive_cpu, opts.warmup, opts.duration, opts.wait_quiet),
        )
        for r in range(opts.repeat):
            for c in opts.concurrencies:
                for scenario, bench in (ours, naive) if r % 2 == 0 else (naive, ours):
                    rows.append(runner.run(bench.http_step(scenario, c)))
                    rows[-1].extra["round"] = r
                    print_progress(rows[-1])
    return rows


def run_batched_server(runner: asyncio.Runner, opts: Options, log_dir: Path) -> list[Row]:
    rows: list[Row] = []
    with server("batched", opts.server_env, log_dir) as (url, cpu):
        bench = Bench(url, cpu, opts.warmup, opts.duration, opts.wait_quiet)

        def go(coro: Coroutine[Any, Any, Row]) -> None:
            rows.append(runner.run(coro))
            print_progress(rows[-1])

        for path, scenario, make in (
            ("/v1/ping", "ping", bench.ping),
            (None, "floor_step_replay", bench.replayed_step),
            ("/v1/stream", "websocket", bench.websocket),
            ("/v1/stream", "floor_stream_replay", bench.replayed_stream),
        ):
            why = None if path is None else runner.run(bench.probe(path))
            if why is not None:
                rows.extend(skipped(scenario, opts.concurrencies, why))
                print(f"  {scenario}: skipped: {why}", flush=True)
                continue
            for c in opts.concurrencies:
                go(make(c))
        for c in opts.concurrencies:
            go(bench.step_many(c))
        if PREDICT_CONCURRENCY not in opts.concurrencies:
            go(bench.http_step("http_batched", PREDICT_CONCURRENCY))
        for history in opts.histories:
            go(bench.predict(history, PREDICT_CONCURRENCY))
        go(bench.predict(PREDICT_TARGET_HISTORY, 1))  # issue 14's target: one client's p50
    return rows


def run_unbatched_server(runner: asyncio.Runner, opts: Options, log_dir: Path) -> list[Row]:
    rows: list[Row] = []
    with server("unbatched", {**opts.server_env, "LSTM_MAX_BATCH": "1"}, log_dir) as (url, cpu):
        bench = Bench(url, cpu, opts.warmup, opts.duration, opts.wait_quiet)
        for c in opts.concurrencies:
            rows.append(runner.run(bench.http_step("http_unbatched", c)))
            print_progress(rows[-1])
    return rows


JOURNAL_MODES = ("off", "write", "fsync")
JOURNAL_CASES = (("step_many", 64), ("step_many", 256), ("websocket", 64))


def run_journal(runner: asyncio.Runner, opts: Options, log_dir: Path) -> list[Row]:
    """The embedded store's journal (LSTM_JOURNAL) side by side: a server per mode, all up at
    once, each with its snapshot and journal on the same disk, measured in alternating rounds
    (``--repeat``; the first mode of each round rotating) on step_many and the WebSocket."""
    rows: list[Row] = []
    state = Path(tempfile.mkdtemp(prefix="load-bench-journal-"))
    with contextlib.ExitStack() as stack:
        benches = {}
        for mode in JOURNAL_MODES:
            env = {
                **opts.server_env,
                "LSTM_JOURNAL": mode,
                "LSTM_SNAPSHOT_PATH": str(state / mode / "sessions.snapshot"),
            }
            url, cpu = stack.enter_context(server(f"journal-{mode}", env, log_dir))
            benches[mode] = Bench(url, cpu, opts.warmup, opts.duration, opts.wait_quiet)
        for r in range(opts.repeat):
            order = JOURNAL_MODES[r % 3 :] + JOURNAL_MODES[: r % 3]
            for scenario, c in JOURNAL_CASES:
                for mode in order:
                    bench = benches[mode]
                    make = bench.step_many if scenario == "step_many" else bench.websocket
                    rows.append(runner.run(make(c)))
                    rows[-1].extra.update(journal=mode, round=r)
                    print_progress(rows[-1])
    return rows


@dataclass
class JournalCost:
    """One mode against ``off`` on one case: medians over the rounds, and the spread (lowest,
    highest) of the per-round ratio of timesteps/s."""

    scenario: str
    concurrency: int
    mode: str
    rounds: int
    timesteps_s: float
    off_timesteps_s: float
    ratio: float
    ratio_low: float
    ratio_high: float
    p99_ms: float
    off_p99_ms: float
    # The server's CPU per applied timestep (us), and its ratio to off's: steadier than
    # throughput on a machine others share, since what they take slows both alike.
    cpu_us: float
    off_cpu_us: float
    cpu_ratio: float
    cpu_ratio_low: float
    cpu_ratio_high: float


def cpu_us(row: Row) -> float | None:
    """The server's CPU per applied timestep, in microseconds."""
    if not row.timesteps_s or row.server_cpu_pct is None:
        return None
    return row.server_cpu_pct / 100 / row.timesteps_s * 1e6


def journal_costs(rows: list[Row]) -> list[JournalCost]:
    out = []
    for scenario, c in JOURNAL_CASES:
        by_round: dict[int, dict[str, Row]] = {}
        for r in rows:
            if r.scenario == scenario and r.concurrency == c and "journal" in r.extra:
                by_round.setdefault(r.extra["round"], {})[r.extra["journal"]] = r
        for mode in JOURNAL_MODES[1:]:
            pairs = [(d[mode], d["off"]) for d in by_round.values() if mode in d and "off" in d]
            pairs = [(m, o) for m, o in pairs if m.timesteps_s and o.timesteps_s]
            if not pairs:
                continue
            ratios = [m.timesteps_s / o.timesteps_s for m, o in pairs]  # type: ignore[operator]
            cpus = [(cpu_us(m), cpu_us(o)) for m, o in pairs]
            cpu_ratios = [m / o for m, o in cpus if m and o]
            out.append(
                JournalCost(
                    scenario,
                    c,
                    mode,
                    len(pairs),
                    _med([m.timesteps_s for m, _ in pairs]),
                    _med([o.timesteps_s for _, o in pairs]),
                    _med(list(ratios)),
                    min(ratios),
                    max(ratios),
                    _med([m.p99_ms for m, _ in pairs]),
                    _med([o.p99_ms for _, o in pairs]),
                    _med([m for m, _ in cpus]),
                    _med([o for _, o in cpus]),
                    _med(list(cpu_ratios)),
                    min(cpu_ratios, default=math.nan),
                    max(cpu_ratios, default=math.nan),
                )
            )
    return out


def journal_table(costs: list[JournalCost]) -> str:
    lines = [
        "| case | LSTM_JOURNAL | timesteps/s | off: timesteps/s | vs off (spread) | p99 ms "
        "| off: p99 ms | server CPU us / timestep | off: us | vs off (spread) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in costs:
        lines.append(
            f"| {k.scenario} at {k.concurrency} | {k.mode} | {fmt(k.timesteps_s)} "
            f"| {fmt(k.off_timesteps_s)} | {k.ratio:.2f}x ({k.ratio_low:.2f}-{k.ratio_high:.2f}, "
            f"{k.rounds} rounds) | {fmt(k.p99_ms, 1)} | {fmt(k.off_p99_ms, 1)} "
            f"| {fmt(k.cpu_us, 1)} | {fmt(k.off_cpu_us, 1)} "
            f"| {k.cpu_ratio:.2f}x ({k.cpu_ratio_low:.2f}-{k.cpu_ratio_high:.2f}) |"
        )
    return "\n".join(lines)


def journal_targets(costs: list[JournalCost]) -> list[Target]:
    checks = []
    for k in costs:
        if k.mode == "write":
            checks.append(
                Target(
                    f"journal write costs under 10% on {k.scenario} at {k.concurrency} "
                    "(median of the rounds' ratios >= 0.90x off)",
                    f"{k.ratio:.2f}x ({k.ratio_low:.2f}-{k.ratio_high:.2f})",
                    k.ratio >= 0.90,
                )
            )
    return checks


def bench_model(batches: tuple[int, ...], duration: float, quiet_wait: float) -> list[Row]:
    """The served model's one-timestep step in this process, batched: the compute floor.

    The eager forecaster, with torch's default thread count and, where that is more than one,
    again with one thread; then the array path a server's CPU round runs (one thread).
    """
    import torch

    from model import load_checkpoint

    model = load_checkpoint(MODEL_DIR).model
    default = torch.get_num_threads()
    rows = []
    for threads in sorted({default, 1}, reverse=True):
        torch.set_num_threads(threads)
        scenario = "model in-process" if threads == default else "model in-process, 1 thread"
        for batch in batches:
            tries: list[Row] = []
            for _ in range(1 + (BUSY_RETRIES if quiet_wait else 0)):
                if quiet_wait:
                    wait_for_quiet(quiet_wait)
                tries.append(time_model(model, batch, duration, scenario))
                if not is_busy(tries[-1]):
                    break
            rows.append(quietest(tries))
            rows[-1].extra["torch_threads"] = threads
            print_progress(rows[-1])
    # What a server's CPU round runs instead: the array path (model/native.py's
    # NativeForecaster: the native stack, the running statistics in numpy), one thread.
    from model.native import NativeForecaster, NativeLSTM, build_engine

    engine = build_engine("auto", model.lstm)
    if isinstance(engine, NativeLSTM):
        torch.set_num_threads(1)
        served = NativeForecaster(model, engine)
        for batch in batches:
            tries = []
            for _ in range(1 + (BUSY_RETRIES if quiet_wait else 0)):
                if quiet_wait:
                    wait_for_quiet(quiet_wait)
                tries.append(time_served(served, batch, duration))
                if not is_busy(tries[-1]):
                    break
            rows.append(quietest(tries))
            print_progress(rows[-1])
    torch.set_num_threads(default)
    return rows


def time_served(served: Any, batch: int, duration: float) -> Row:
    """``time_model`` for the array path a server's round calls (``NativeForecaster``)."""
    import numpy as np

    model = served.model
    x = np.full((batch, 1, model.config.n_features), 0.5, np.float32)
    shape = (model.config.num_layers, batch, model.config.hidden_size)
    state: list[Any] = [np.zeros(shape, np.float32), np.zeros(shape, np.float32)]
    state.append(np.zeros((batch, model.stats_width)) if model.stats_width else None)

    def step() -> None:
        state[:] = served(x, *state)[2:]

    return time_steps("model as served", batch, duration, step, {"torch_threads": 1})


def time_model(model: Any, batch: int, duration: float, scenario: str) -> Row:
    import torch

    x = torch.full((batch, 1, model.config.n_features), 0.5)
    state = [model.zero_state(batch)]

    def step() -> None:
        state[0] = model(x, state[0]).state

    with torch.no_grad():
        return time_steps(scenario, batch, duration, step, {})


def time_steps(
    scenario: str, batch: int, duration: float, step: Callable[[], None], extra: dict[str, Any]
) -> Row:
    """``step`` (one batched timestep) called for ``duration`` seconds after 20 warm-up calls
    (the allocator, oneDNN's primitives): a row of timesteps/s and latencies."""
    for _ in range(20):
        step()
    latencies: list[float] = []
    meter, end = CpuMeter(None), time.perf_counter() + duration
    while (started := time.perf_counter()) < end:
        step()
        latencies.append(time.perf_counter() - started)
    cpu = meter.stop()
    wall = sum(latencies)
    return Row(
        scenario,
        batch,
        timesteps_s=batch * len(latencies) / wall,
        req_s=len(latencies) / wall,
        p50_ms=quantile_ms(latencies, 0.5),
        p99_ms=quantile_ms(latencies, 0.99),
        client_cpu_pct=cpu.client,
        other_cpu_pct=cpu.other,
        note=busy_note(cpu),
        extra={"calls": len(latencies), **extra},
    )


# --- reporting ---------------------------------------------------------------------------------

COLUMNS = (
    "scenario",
    "concurrency",
    "timesteps/s",
    "req/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "client CPU %",
    "server CPU %",
    "other CPU %",
    "note",
)


def fmt(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def cells(row: Row) -> list[str]:
    return [
        row.label,
        str(row.concurrency),
        fmt(row.timesteps_s),
        fmt(row.req_s),
        fmt(row.p50_ms, 2),
        fmt(row.p99_ms, 2),
        str(row.errors),
        fmt(row.client_cpu_pct),
        fmt(row.server_cpu_pct),
        fmt(row.other_cpu_pct),
        row.note,
    ]


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def print_progress(row: Row) -> None:
    print(f"  {' | '.join(cells(row))}", flush=True)


def find(
    rows: list[Row], scenario: str, concurrency: int, history: int | None = None
) -> Row | None:
    for row in rows:
        if (
            row.scenario == scenario
            and row.concurrency == concurrency
            and row.extra.get("history") == history
            and row.timesteps_s is not None
        ):
            return row
    return None


@dataclass
class Versus:
    """Our HTTP step against the naive server's at one concurrency: medians over the rounds, and
    the spread (lowest, highest) of the per-round ratio."""

    concurrency: int
    rounds: int
    ours_req_s: float
    naive_req_s: float
    ratio: float
    ratio_low: float
    ratio_high: float
    ours_p50_ms: float
    ours_p99_ms: float
    naive_p50_ms: float
    naive_p99_ms: float


def _med(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else math.nan


def versus(rows: list[Row]) -> list[Versus]:
    out = []
    for c in sorted({r.concurrency for r in rows if r.scenario == "http_naive"}):
        rounds: dict[int, dict[str, Row]] = {}
        for r in rows:
            if (
                r.concurrency == c
                and r.scenario in ("http_batched", "http_naive")
                and "round" in r.extra
                and r.req_s is not None
            ):
                rounds.setdefault(r.extra["round"], {})[r.scenario] = r
        pairs = [(d["http_batched"], d["http_naive"]) for d in rounds.values() if len(d) == 2]
        if not pairs:
            continue
        ratios = [o.req_s / n.req_s for o, n in pairs if o.req_s and n.req_s]
        out.append(
            Versus(
                c,
                len(pairs),
                _med([o.req_s for o, _ in pairs]),
                _med([n.req_s for _, n in pairs]),
                _med(list(ratios)),
                min(ratios, default=math.nan),
                max(ratios, default=math.nan),
                _med([o.p50_ms for o, _ in pairs]),
                _med([o.p99_ms for o, _ in pairs]),
                _med([n.p50_ms for _, n in pairs]),
                _med([n.p99_ms for _, n in pairs]),
            )
        )
    return out


def versus_table(vs: list[Versus]) -> str:
    lines = [
        "| clients | ours req/s | naive req/s | ours / naive (spread) | ours p50 / p99 ms "
        "| naive p50 / p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for v in vs:
        lines.append(
            f"| {v.concurrency} | {fmt(v.ours_req_s)} | {fmt(v.naive_req_s)} "
            f"| {v.ratio:.2f}x ({v.ratio_low:.2f}-{v.ratio_high:.2f}, {v.rounds} rounds) "
            f"| {fmt(v.ours_p50_ms, 2)} / {fmt(v.ours_p99_ms, 2)} "
            f"| {fmt(v.naive_p50_ms, 2)} / {fmt(v.naive_p99_ms, 2)} |"
        )
    return "\n".join(lines)


@dataclass
class Target:
    name: str
    measured: str
    passed: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "MISS", None: "n/a"}[self.passed]


def ratio_target(name: str, num: float | None, den: float | None, at_least: float) -> Target:
    if num is None or den is None or den == 0:
        return Target(name, "not measured", None)
    r = num / den
    return Target(name, f"{r:.2f}x ({num:,.0f} / {den:,.0f})", r >= at_least)


def ort_sequence_ms(history: int) -> float | None:
    """ONNX Runtime's time for one ``history``-step sequence of the served shape at batch 1, from
    the recorded model bench (None if it has no such row)."""
    try:
        rows = json.loads(MODEL_BENCH.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return None
    for row in rows:
        if (row.get("shape"), row.get("batch"), row.get("timesteps")) == ("served", 1, history):
            value = row.get("ORT ms")
            return float(value) if value is not None else None
    return None


def predict_target(rows: list[Row]) -> Target:
    name = (
        f"/v1/predict, {PREDICT_TARGET_HISTORY}-step history, one client: p50 < 3x (ONNX "
        f"Runtime's sequence + /v1/ping's p50)"
    )

    def p50(scenario: str, history: int | None = None) -> float | None:
        for row in rows:
            if (row.scenario, row.concurrency, row.extra.get("history")) == (scenario, 1, history):
                return row.p50_ms
        return None

    predict, ping = p50("predict", PREDICT_TARGET_HISTORY), p50("ping")
    ort = ort_sequence_ms(PREDICT_TARGET_HISTORY)
    if predict is None or ping is None or ort is None:
        return Target(name, "not measured", None)
    bound = 3 * (ort + ping)
    return Target(
        name,
        f"{predict:.2f} ms against {bound:.2f} ms (ORT {ort:.3f} ms from {MODEL_BENCH.name}, "
        f"ping {ping:.2f} ms)",
        predict < bound,
    )


def targets(rows: list[Row]) -> list[Target]:
    def ts(scenario: str, c: int, history: int | None = None) -> float | None:
        row = find(rows, scenario, c, history)
        return None if row is None else row.timesteps_s

    ws = ts("websocket", 64)
    many = [r.timesteps_s for r in rows if r.scenario == "step_many" and r.timesteps_s]
    vs = {v.concurrency: v for v in versus(rows)}
    naive_best = max((v.naive_req_s for v in vs.values()), default=None)
    # the naive server's best HTTP step (1 timestep each): what these are measured against
    naive_note = f" (naive server's best: {naive_best:,.0f})" if naive_best else ""
    checks = []
    for c in (16, 64, 256):
        v = vs.get(c)
        checks.append(
            Target(
                f"HTTP step at {c} >= 2.0x the naive server (median of the rounds' ratios)",
                "not measured"
                if v is None
                else f"{v.ratio:.2f}x ({v.ratio_low:.2f}-{v.ratio_high:.2f}; "
                f"{v.ours_req_s:,.0f} / {v.naive_req_s:,.0f} req/s)",
                None if v is None else v.ratio >= 2.0,
            )
        )
    one = vs.get(1)
    checks.append(
        Target(
            "HTTP step at 1 >= 1.0x the naive server, p50 no higher",
            "not measured"
            if one is None
            else f"{one.ratio:.2f}x, p50 {one.ours_p50_ms:.2f} vs {one.naive_p50_ms:.2f} ms",
            None if one is None else one.ratio >= 1.0 and one.ours_p50_ms <= one.naive_p50_ms,
        )
    )
    p99 = vs[64].ours_p99_ms if 64 in vs else None
    checks.append(
        Target(
            "HTTP step p99 at 64 < 25 ms",
            "not measured" if p99 is None else f"{p99:.1f} ms",
            None if p99 is None else p99 < 25,
        )
    )
    checks.append(
        Target(
            "WebSocket at 64 >= 15,000 timesteps/s",
            "not measured" if ws is None else f"{ws:,.0f} timesteps/s{naive_note}",
            None if ws is None else ws >= 15_000,
        )
    )
    checks.append(
        Target(
            "step_many (best concurrency) >= 50,000 timesteps/s",
            "not measured" if not many else f"{max(many):,.0f} timesteps/s{naive_note}",
            None if not many else max(many) >= 50_000,
        )
    )
    checks.append(predict_target(rows))
    return [
        *checks,
        ratio_target(
            "batched HTTP step at 64 >= 1.3x unbatched",
            ts("http_batched", 64),
            ts("http_unbatched", 64),
            1.3,
        ),
        ratio_target(
            "batched HTTP step at 64 >= 85% of ping's req/s",
            ts("http_batched", 64),
            ts("ping", 64),
            0.85,
        ),
        ratio_target(
            "stateful step >= 10x predict with 256-step history (concurrency 16)",
            ts("http_batched", PREDICT_CONCURRENCY),
            ts("predict", PREDICT_CONCURRENCY, 256),
            10,
        ),
    ]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    for package in ("torch", "bentoml", "aiohttp", "uvloop", "orjson"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    return info


SERIES = {
    "http_batched": "HTTP step, micro-batched",
    "http_naive": "HTTP step, naive server (FastAPI)",
    "http_unbatched": "HTTP step, batching off",
    "websocket": "WebSocket stream",
    "step_many": "step_many (2 requesters)",
    "ping": "ping (req/s: the HTTP floor)",
    "floor_step_replay": "HTTP step replayed (the fast route's floor)",
    "floor_stream_replay": "stream message replayed (the stream's floor)",
    "model in-process": "model in process (no HTTP)",
    "model in-process, 1 thread": "model in process, 1 torch thread",
    "model as served": "model as a CPU round runs it (array path, 1 thread)",
}


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (thr, lat, bars) = plt.subplots(1, 3, figsize=(17, 5.2))
    for scenario, label in SERIES.items():
        first: dict[int, Row] = {}  # the first round of a repeated scenario
        for r in rows:
            if r.scenario == scenario and r.timesteps_s is not None:
                first.setdefault(r.concurrency, r)
        points = sorted(first.values(), key=lambda r: r.concurrency)
        if not points:
            continue
        style = "--" if scenario == "ping" or scenario.startswith("model") else "-"
        xs = [r.concurrency for r in points]
        thr.plot(xs, [r.timesteps_s for r in points], style, marker="o", label=label)
        lat.plot(xs, [r.p99_ms for r in points], style, marker="o", label=label)
    thr.set(xscale="log", yscale="log", xlabel="concurrency (sessions; batch in process)")
    thr.set(ylabel="timesteps/s", title="Throughput")
    lat.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="p99 latency, ms")
    lat.set(title="p99 latency")
    for ax in (thr, lat):
        ax.grid(True, which="both", alpha=0.3)
    thr.legend(fontsize=8)
    names, values = [], []
    for r in rows:
        if r.scenario == "predict" and r.concurrency == PREDICT_CONCURRENCY and r.timesteps_s:
            names.append(f"predict\nhistory {r.extra['history']}")
            values.append(r.timesteps_s)
    step = find(rows, "http_batched", PREDICT_CONCURRENCY)
    if step is not None and step.timesteps_s is not None:
        names.append("stateful step")
        values.append(step.timesteps_s)
    drawn = bars.bar(names, values, color=["tab:gray"] * (len(names) - 1) + ["tab:blue"])
    bars.bar_label(drawn, fmt="{:,.0f}")
    bars.set(yscale="log", ylabel="new values answered per second")
    bars.set(title=f"Stateless predict vs stateful step, concurrency {PREDICT_CONCURRENCY}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------


@dataclass
class Options:
    duration: float
    warmup: float
    concurrencies: tuple[int, ...]
    histories: tuple[int, ...]
    out: Path
    plot: Path
    quick: bool
    server_env: dict[str, str]
    wait_quiet: float
    repeat: int
    versus_only: bool
    journal: bool


def parse_args() -> Options:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per scenario")
    p.add_argument(
        "--record", action="store_true", help="write to bench/results/ instead of runs/bench/"
    )
    p.add_argument("--out", type=Path, help="JSON results (default: load_bench.json there)")
    p.add_argument("--plot", type=Path, help="plot (default: load_bench.png there)")
    p.add_argument("--quick", action="store_true", help="1 s per scenario, fewer points (smoke)")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra environment variable for both servers (repeatable), e.g. OMP_NUM_THREADS=1",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help=f"for a machine shared with other work: before each scenario, wait up to S s for "
        f"its CPU to fall under {QUIET_PCT:g}%%, and rerun (up to {BUSY_RETRIES} times) a "
        f"scenario during which other processes used over {BUSY_OTHER_PCT:g}%% of a core",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of the side-by-side HTTP step, ours vs the naive server (default 3)",
    )
    p.add_argument(
        "--versus-only",
        action="store_true",
        help="only the side-by-side HTTP step (no WebSocket, step_many, predict, floor)",
    )
    p.add_argument(
        "--journal",
        action="store_true",
        help="only the embedded store's journal side by side: LSTM_JOURNAL off, write and "
        "fsync on step_many and the WebSocket (writes journal_bench.json, not load_bench.json)",
    )
    args = p.parse_args()
    server_env = dict(kv.split("=", 1) for kv in args.server_env)
    results = RESULTS if args.record else RUNS
    return Options(
        duration=1.0 if args.quick else args.duration,
        warmup=0.3 if args.quick else 1.0,
        concurrencies=QUICK_CONCURRENCIES if args.quick else CONCURRENCIES,
        histories=QUICK_HISTORIES if args.quick else HISTORIES,
        out=args.out or results / ("journal_bench.json" if args.journal else "load_bench.json"),
        plot=args.plot or results / "load_bench.png",
        quick=args.quick,
        server_env=server_env,
        wait_quiet=args.wait_quiet,
        repeat=1 if args.quick else args.repeat,
        versus_only=args.versus_only,
        journal=args.journal,
    )


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main() -> int:
    opts = parse_args()
    began = time.perf_counter()
    os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="load-bench-bentoml-"))
    log_dir = Path(tempfile.mkdtemp(prefix="load-bench-logs-"))
    print(f"{opts.duration:g} s per scenario after {opts.warmup:g} s warm-up; logs in {log_dir}")
    if opts.journal:
        return main_journal(opts, log_dir, began)
    with asyncio.Runner(loop_factory=new_loop) as runner:
        rows = run_side_by_side(runner, opts, log_dir)
        if not opts.versus_only:
            rows += run_batched_server(runner, opts, log_dir)
            rows += run_unbatched_server(runner, opts, log_dir)
    if not opts.versus_only:
        rows += bench_model(opts.concurrencies, opts.duration, opts.wait_quiet)
    wall = time.perf_counter() - began

    print("\n" + markdown_table(rows))
    side = versus(rows)
    print("\n## HTTP step, ours vs the naive server (bench/naive_server.py)\n")
    print(versus_table(side))
    checks = targets(rows)
    print("\n## targets\n")
    for t in checks:
        print(f"- {t.verdict:4s}  {t.name}: {t.measured}")
    print(f"\nwall time {wall:.0f} s")

    info = {
        "machine": machine(),
        "settings": {
            "duration_s": opts.duration,
            "warmup_s": opts.warmup,
            "quick": opts.quick,
            "wait_quiet_s": opts.wait_quiet,
            "server_env": {**SERVER_ENV, **opts.server_env},
            "unbatched_server_env": {"LSTM_MAX_BATCH": "1"},
            "naive_server": "bench/naive_server.py (FastAPI async def, uvicorn uvloop/httptools)",
            "versus_rounds": opts.repeat,
            "step_many_requesters": MANY_REQUESTERS,
            "cpu_pct": "% of one core over the measured window",
        },
        "wall_s": wall,
        "rows": [asdict(r) for r in rows],
        "versus_naive": [asdict(v) for v in side],
        "targets": [{**asdict(t), "verdict": t.verdict} for t in checks],
        "server_logs": str(log_dir),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(info, indent=2) + "\n")
    plot(rows, opts.plot)
    print(f"wrote {opts.out} and {opts.plot}")
    return 0


def main_journal(opts: Options, log_dir: Path, began: float) -> int:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        rows = run_journal(runner, opts, log_dir)
    wall = time.perf_counter() - began
    print("\n" + markdown_table(rows))
    costs = journal_costs(rows)
    print("\n## The journal's cost (LSTM_JOURNAL), against off\n")
    print(journal_table(costs))
    checks = journal_targets(costs)
    print("\n## targets\n")
    for t in checks:
        print(f"- {t.verdict:4s}  {t.name}: {t.measured}")
    print(f"\nwall time {wall:.0f} s")
    info = {
        "machine": machine(),
        "settings": {
            "duration_s": opts.duration,
            "warmup_s": opts.warmup,
            "rounds": opts.repeat,
            "server_env": {**SERVER_ENV, **opts.server_env},
            "journal_modes": list(JOURNAL_MODES),
            "step_many_requesters": MANY_REQUESTERS,
        },
        "wall_s": wall,
        "rows": [asdict(r) for r in rows],
        "journal_costs": [asdict(k) for k in costs],
        "targets": [{**asdict(t), "verdict": t.verdict} for t in checks],
        "server_logs": str(log_dir),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
