"""Every Prometheus metric of the service, in one place.

Names carry their units; no label ever holds a session id (unbounded cardinality). Under
``bentoml serve`` prometheus_client runs in multiprocess mode, so each gauge says how its
per-process values combine.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

SESSIONS_ACTIVE = Gauge("lstm_sessions_active", "Sessions held now", multiprocess_mode="livesum")
STREAMS_OPEN = Gauge(
    "lstm_streams_open", "Open /v1/stream WebSocket connections", multiprocess_mode="livesum"
)
CONNECTIONS_OPEN = Gauge(
    "lstm_connections_open",
    "Open HTTP and WebSocket connections of the worker, sampled every second",
    multiprocess_mode="livesum",
)
CONNECTIONS_DROPPED = Counter(
    "lstm_connections_dropped_total", "Connections the server closed or refused", ["reason"]
)  # header_timeout, headers_too_large, evicted (to make room at the cap), refused (503)
SESSIONS_CREATED = Counter("lstm_sessions_created_total", "Sessions created")
SESSIONS_EXPIRED = Counter("lstm_sessions_expired_total", "Sessions freed after their TTL")
SESSIONS_EVICTED = Counter(
    "lstm_sessions_evicted_total", "Idle sessions evicted (least recently used) to make room"
)
SESSIONS_DELETED = Counter("lstm_sessions_deleted_total", "Sessions deleted by clients")
TIMESTEPS = Counter("lstm_timesteps_processed_total", "Timesteps run through the model")
STEP_REQUESTS = Counter(
    "lstm_step_requests_total", "Step requests by outcome", ["outcome"]
)  # applied, replayed, or the error code
SEQ_CONFLICTS = Counter("lstm_seq_conflicts_total", "Steps refused for a seq that is not t")
REPLAYS = Counter(
    "lstm_idempotent_replays_total",
    "Retries of the last applied step, answered again without applying it",
)
BATCH_SESSIONS = Histogram(
    "lstm_batch_sessions",
    "Sessions stepped in one batched forward",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
QUEUE_WAIT = Histogram(
    "lstm_batch_queue_wait_seconds",
    "Longest time a job of a round waited for the micro-batcher, one observation per round",
    buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
MODEL_STEP = Histogram(
    "lstm_model_step_seconds",
    "Time of one batched model forward",
    buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
STATE_MEMORY = Gauge(
    "lstm_state_memory_bytes",
    "Bytes of the preallocated session state pool",
    multiprocess_mode="livesum",
)
STORE_UP = Gauge(
    "lstm_store_up",
    "1 while the session store answers (always 1 for the embedded store; Redis pinged)",
    multiprocess_mode="min",
)
MODEL_INFO = Gauge(
    "lstm_model_info",
    "The model served (value 1)",
    ["name", "version", "device"],
    multiprocess_mode="max",
)

MODEL_SESSIONS = Gauge(
    "lstm_model_sessions",
    "Sessions on each loaded model version (active: whether new sessions go to it)",
    ["version", "active"],
    multiprocess_mode="livesum",
)
MIGRATIONS = Counter(
    "lstm_migrations_total",
    "Sessions moved to another model version, by outcome (migrated, or the error code)",
    ["outcome"],
)
MIGRATION_SECONDS = Histogram(
    "lstm_migration_seconds",
    "Time of one session's migration (its replay through the new version included)",
    buckets=(1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)


class PassTally:
    """Counts for one labelled counter, written once per pass of the event loop: a multiprocess
    counter's write (an mmap write and a pid check) cost as much as a stream message's step, and
    a round settles many steps in one pass. Called from the loop's thread; with no loop running
    (a test, a script) a count is written at once."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.counts: dict[str, int] = {}
        self.children: dict[str, Any] = {}  # labels() is a tenth of a write: cached
        self.armed: asyncio.AbstractEventLoop | None = None  # the loop a write is due on

    def add(self, label: str, n: int = 1) -> None:
        self.counts[label] = self.counts.get(label, 0) + n
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: now
            self.flush()
            return
        if self.armed is not loop:  # none due, or due on a loop that is gone
            self.armed = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.armed = None
        counts, self.counts = self.counts, {}
        for label, n in counts.items():
            child = self.children.get(label)
            if child is None:
                child = self.children[label] = self.counter.labels(label)
            child.inc(n)


STEP_OUTCOMES = PassTally(STEP_REQUESTS)  # lstm_step_requests_total, from the event loop
