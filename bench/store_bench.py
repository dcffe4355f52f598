"""What durability costs a batch's commit: single Redis vs Redis Cluster, with and without WAIT.

    python bench/store_bench.py [--batch 64] [--rounds 300] [--runs 3] [--record]

Each store gets the same batches of ``--batch`` compare-and-set step writes (the service's
commit of one batch round: ``RedisState.commit``, 2.5 KB of state each), ``--rounds`` batches a
run, ``--runs`` runs alternating between the stores, all on this machine's loopback:

- ``redis everysec`` / ``redis always``: one redis-server, appendfsync everysec or always;
- ``cluster``: three masters and three replicas (appendfsync everysec), no WAIT;
- ``cluster + WAIT 1``: the same, each write answered once its replica has it
  (``LSTM_REDIS_WAIT_REPLICAS=1``, what a master failover needs to lose nothing).

Prints median and p99 milliseconds per commit and writes per second, the median over the runs and
their spread; writes runs/bench/store_bench.json (``--record``: bench/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.redis_state import RedisState, Write  # noqa: E402
from tests.servers import RedisClusterServers, RedisServer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "runs" / "bench"
STATE = b"\x00" * 2560  # about one served session's blob


async def one_run(state: RedisState, batch: int, rounds: int, prefix: str) -> list[float]:
    ids = [f"{prefix}-{i}" for i in range(batch)]
    for sid in ids:
        await state.create(sid, STATE, time.time(), 3600, "e")
    times = []
    for t in range(rounds):
        writes = [Write(sid, "e", t, t + 1, STATE, b"{}", 3600) for sid in ids]
        started = time.perf_counter()
        replies = await state.commit(writes)
        times.append(time.perf_counter() - started)
        assert all(r == (1, t + 1) for r in replies), replies[:3]
    for sid in ids:
        await state.delete(sid)
    return times


def summary(times: list[float], batch: int) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
        "writes_per_s": batch * len(times) / sum(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="store-bench-"))
    servers: list[RedisServer] = []
    cluster = RedisClusterServers(tmp / "cluster")
    (tmp / "cluster").mkdir()
    try:
        urls: dict[str, tuple[str, int]] = {}
        for fsync in ("everysec", "always"):
            (tmp / fsync).mkdir()
            server = RedisServer(tmp / fsync, appendfsync=fsync)
            server.start()
            servers.append(server)
            urls[f"redis {fsync}"] = (server.url, 0)
        cluster.start()
        urls["cluster"] = (cluster.url, 0)
        urls["cluster + WAIT 1"] = (cluster.url, 1)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in urls}

        async def go() -> None:
            states = {n: RedisState(u, wait_replicas=w) for n, (u, w) in urls.items()}
            for run in range(args.runs):
                for name, state in states.items():  # alternating: the machine's noise is shared
                    times = await one_run(state, args.batch, args.rounds, f"r{run}")
                    runs[name].append(summary(times, args.batch))

        asyncio.run(go())
    finally:
        cluster.stop()
        for server in servers:
            server.stop()

    table: dict[str, Any] = {}
    base = statistics.median(r["writes_per_s"] for r in runs["redis everysec"])
    print(f"commit of {args.batch} step writes, {args.rounds} batches x {args.runs} runs")
    print(
        f"{'store':<18} {'p50 ms':>8} {'p99 ms':>8} {'writes/s':>10} {'spread':>14} {'vs redis':>9}"
    )
    for name, results in runs.items():
        rates = [r["writes_per_s"] for r in results]
        row = {
            "p50_ms": statistics.median(r["p50_ms"] for r in results),
            "p99_ms": statistics.median(r["p99_ms"] for r in results),
            "writes_per_s": statistics.median(rates),
            "spread_writes_per_s": [min(rates), max(rates)],
            "ratio_vs_redis_everysec": statistics.median(rates) / base,
            "runs": results,
        }
        table[name] = row
        print(
            f"{name:<18} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} {row['writes_per_s']:>10,.0f} "
            f"{min(rates):>6,.0f}-{max(rates):<7,.0f} {row['ratio_vs_redis_everysec']:>8.2f}x"
        )
    out = args.out or (RESULTS if args.record else RUNS) / "store_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"batch": args.batch, "rounds": args.rounds, "stores": table}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
