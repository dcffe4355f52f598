"""Sessions resident vs memory and step latency: 1k, 100k and 1M sessions in one process.

    python bench/scale_bench.py [--record]        (make bench runs it)

Each size runs in a fresh child process, so one size's memory never counts in another's:
1. load the service (``LSTMSessions``, the class BentoML serves, constructed directly) with
   ``LSTM_MAX_SESSIONS`` = N, so its state pool is preallocated for exactly N sessions;
2. create N sessions and step each once through the micro-batcher (so each holds a real state, a
   forecast and, for ``LSTM_REPLAY_WINDOW_S`` = 1 s, a replay record); wait out the window and
   sweep, as a server would while the sessions sit idle;
3. memory per session = (the pool's bytes + what RSS grew by in step 2) / N, right after the
   sessions were created and again once all were stepped and idle, against the raw
   state bytes (h and c of every layer and the pending forecast: what the pool holds per
   session); the pool is resident from its allocation (zeroed), so RSS counts it up front;
4. step latency: 64 concurrent callers, each stepping a random session through the service's step
   path (lookup, lock, seq check, micro-batcher, bookkeeping; no HTTP), three windows of
   ``--seconds`` after a warm-up, reported from the window with the median p50;
5. the time of one sweep with nothing to free (what the sweeper costs the event loop every
   ``LSTM_SWEEP_INTERVAL_S``).
Prints a table and writes runs/bench/scale_bench.json and .png; with ``--record``, the committed
bench/results/scale_bench.json and .png that the README quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# git-ignored: a run that is not a recording never rewrites the figures the README quotes
RUNS = ROOT / "runs" / "bench"
CONCURRENCY = 64


def measure(n: int, seconds: float) -> dict[str, Any]:
    """One size, in this process (called in a child)."""
    import gc
    import tempfile

    import psutil

    os.environ.update(
        {
            "LSTM_MAX_SESSIONS": str(n),
            "LSTM_SNAPSHOT_PATH": "",
            "LSTM_REPLAY_WINDOW_S": "1",
            "LSTM_DEVICE": "cpu",
            "BENTOML_DO_NOT_TRACK": "true",
            "BENTOML_HOME": os.environ.get("BENTOML_HOME", tempfile.mkdtemp(prefix="bench-home-")),
            "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="bench-prom-"),
        }
    )
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    from service.schemas import Step
    from service.sessions import StatePool

    proc = psutil.Process()
    gc.collect()
    # Everything but the pool and the sessions: import, model, a 1-slot pool's worth of code.
    import service.service as svc_module

    gc.collect()
    rss_start = proc.memory_info().rss
    svc = svc_module.LSTMSessions()
    pool: StatePool = svc.store.pool
    raw = pool.nbytes / n
    gc.collect()
    rss_empty = proc.memory_info().rss  # the model and the preallocated (zeroed) pool

    created: list[int] = []

    async def fill() -> None:
        ids = [f"meter-{i:07d}" for i in range(n)]
        for sid in ids:
            svc.store.create(sid)
        gc.collect()
        created.append(proc.memory_info().rss)
        started = time.perf_counter()
        chunk = torch.zeros(1, 1)
        for first in range(0, n, 256):
            await asyncio.gather(
                *(
                    svc.batcher.step(svc.store.get(sid), chunk + random.random())
                    for sid in ids[first : first + 256]
                )
            )
        print(f"  {n}: created and stepped in {time.perf_counter() - started:.1f} s", flush=True)
        await asyncio.sleep(1.2)  # the replay window passes; the sessions are idle
        svc.store.sweep()

    async def load() -> tuple[list[float], int, float]:
        latencies: list[float] = []
        stop = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < stop:
                body = Step.model_construct(
                    session_id=f"meter-{random.randrange(n):07d}",
                    inputs=[[random.random()]],
                    seq=None,
                    return_gates=False,
                )
                started = time.perf_counter()
                await svc.engine.step(body)
                latencies.append(time.perf_counter() - started)

        begun = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
        return latencies, len(latencies), time.perf_counter() - begun

    async def main() -> dict[str, Any]:
        await fill()
        gc.collect()
        rss_after = proc.memory_info().rss
        sweeps = []
        for _ in range(20):
            started = time.perf_counter()
            svc.store.sweep()
            sweeps.append(time.perf_counter() - started)
        await load()  # warm-up, same length
        # Three windows, the median's: one window on a shared machine is at the mercy of others.
        windows = [await load() for _ in range(3)]
        windows.sort(key=lambda w: statistics.median(w[0]))
        latencies, steps, elapsed = windows[1]
        await svc.batcher.close()
        latencies.sort()
        # The pool is resident from the start (zeroed when allocated): count its bytes, and what
        # the process grew by while the sessions were created, stepped and left idle.
        per_session = (pool.nbytes + rss_after - rss_empty) / n
        fresh = (pool.nbytes + created[0] - rss_empty) / n
        return {
            "sessions": n,
            "resident": len(svc.store),
            "raw_state_bytes_per_session": raw,
            "memory_bytes_per_session": per_session,
            "memory_ratio_to_raw": per_session / raw,
            "memory_bytes_per_session_fresh": fresh,
            "memory_ratio_to_raw_fresh": fresh / raw,
            "rss_mib": rss_after / 2**20,
            "fixed_mib": (rss_empty - rss_start - pool.nbytes) / 2**20,
            "step_p50_ms": 1000 * statistics.median(latencies),
            "step_p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "timesteps_per_s": steps / elapsed,
            "sweep_ms": 1000 * statistics.median(sweeps),
        }

    return asyncio.run(main())


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["sessions"] for r in rows]
    fig, (mem, lat) = plt.subplots(1, 2, figsize=(10, 4))
    mem.plot(n, [r["memory_bytes_per_session_fresh"] for r in rows], "o-", label="created")
    mem.plot(n, [r["memory_bytes_per_session"] for r in rows], "s-", label="stepped, then idle")
    mem.plot(n, [r["raw_state_bytes_per_session"] for r in rows], "--", label="raw state")
    mem.plot(n, [1.3 * r["raw_state_bytes_per_session"] for r in rows], ":", label="1.3 x raw")
    # Log y: at 1k sessions the allocator's granularity alone is kilobytes per session.
    mem.set(xscale="log", yscale="log", xlabel="sessions resident", ylabel="bytes per session")
    mem.set_title("memory per session")
    mem.legend()
    lat.plot(n, [r["step_p50_ms"] for r in rows], "o-", label="p50")
    lat.plot(n, [r["step_p99_ms"] for r in rows], "s-", label="p99")
    lat.set(xscale="log", xlabel="sessions resident", ylabel="ms", ylim=(0, None))
    lat.set_title(f"step latency, {CONCURRENCY} concurrent callers (in process)")
    lat.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="1000,100000,1000000")
    parser.add_argument("--seconds", type=float, default=3.0, help="step load per size")
    parser.add_argument(
        "--record", action="store_true", help="write to bench/results/ instead of runs/bench/"
    )
    parser.add_argument("--out", type=Path, help="JSON results (default: scale_bench.json there)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out_path: Path = args.out or (RESULTS if args.record else RUNS) / "scale_bench.json"
    if args.child:
        print(json.dumps(measure(args.child, args.seconds)))
        return
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--seconds", str(args.seconds)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(
        "| sessions | raw state B | B/session created | ratio | B/session stepped, idle | ratio "
        "| RSS MiB | step p50 ms | p99 ms | timesteps/s | p50 vs first | sweep ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["p50_vs_smallest"] = r["step_p50_ms"] / base["step_p50_ms"]
        print(
            f"| {r['sessions']:,} | {r['raw_state_bytes_per_session']:.0f} "
            f"| {r['memory_bytes_per_session_fresh']:.0f} | {r['memory_ratio_to_raw_fresh']:.2f} "
            f"| {r['memory_bytes_per_session']:.0f} | {r['memory_ratio_to_raw']:.2f} "
            f"| {r['rss_mib']:.0f} | {r['step_p50_ms']:.2f} | {r['step_p99_ms']:.2f} "
            f"| {r['timesteps_per_s']:,.0f} | {r['p50_vs_smallest']:.2f} | {r['sweep_ms']:.3f} |"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "concurrency": CONCURRENCY,
        "rows": rows,
    }
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, out_path.with_suffix(".png"))
    print(f"wrote {out_path} and {out_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
