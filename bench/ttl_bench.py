"""Client-chosen TTLs: sweep time and bookkeeping memory with many distinct ``ttl_s`` values.

    python bench/ttl_bench.py [--ttls 100000] [--deleted 200000]

1. ``--ttls`` sessions, each with its own TTL, a few of which are past it: the median time of a
   sweep (what the sweeper costs the event loop every ``LSTM_SWEEP_INTERVAL_S``);
2. ``--deleted`` sessions with distinct TTLs created and deleted, three rounds: what the store's
   memory (tracemalloc) grew by per round after the first (whose tables later rounds reuse), with
   no session left.
The store alone (no model, no HTTP), on a fake clock; prints one line per figure.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc

from service.sessions import SessionStore, StatePool, StoreLimits


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def store_for(n: int, clock: Clock) -> SessionStore:
    limits = StoreLimits(
        n, default_ttl_s=3600, max_ttl_s=86400, evict_when_full=False, tombstones=0
    )
    return SessionStore(StatePool(1, 1, 1, n, "cpu"), limits, clock=clock)


def sweep_ms(ttls: int, expiring: int) -> float:
    """Median sweep time over 20 sweeps, each freeing about ``expiring`` sessions."""
    clock = Clock()
    store = store_for(ttls + 1, clock)
    for i in range(ttls):
        store.create(f"s{i}", ttl_s=100.0 + i * 0.001)  # s{i} expires 100 s + i ms from now
    if expiring:
        clock.now += 100.0
    times = []
    for _ in range(20):
        started = time.perf_counter()
        freed = store.sweep()
        times.append(time.perf_counter() - started)
        assert freed <= expiring + 1, freed
        clock.now += 0.001 * expiring
    return 1000 * statistics.median(times)


def growth_per_round(n: int, rounds: int = 3) -> float:
    """Bytes the store keeps per round of ``n`` distinct-TTL sessions created then deleted, once
    its tables have grown to their size in the first round (a dict never shrinks)."""
    tracemalloc.start()
    clock = Clock()
    store = store_for(n, clock)
    held = []
    for r in range(rounds):
        sessions = [store.create(f"s{i}", ttl_s=100.0 * (r + 1) + i * 0.001) for i in range(n)]
        for session in sessions:
            store.delete(session)
        del sessions
        gc.collect()
        held.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    assert len(store) == 0
    return (held[-1] - held[0]) / (rounds - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ttls", type=int, default=100_000)
    parser.add_argument("--deleted", type=int, default=200_000)
    args = parser.parse_args()
    for expiring in (0, 5):
        ms = sweep_ms(args.ttls, expiring)
        print(f"sweep, {args.ttls:,} distinct TTLs, {expiring} expiring: {ms:.4f} ms")
    kept = growth_per_round(args.deleted)
    print(f"kept per round of {args.deleted:,} distinct-TTL sessions deleted: {kept:,.0f} bytes")


if __name__ == "__main__":
    main()
