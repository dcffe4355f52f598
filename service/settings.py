"""Every setting of the service, read once at start-up from ``LSTM_*`` environment variables.

A bad value stops the start with a message naming the variable (pydantic-settings does the
naming: ``LSTM_MAX_SESSIONS``, say). Only ``service.service`` reads this; the engine, the store
and the batcher get plain values. A limit's ceiling is the schema's (``service.schemas``): one
definition, so no setting can allow what the wire schema refuses.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal, NoReturn

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.schemas import (
    CHUNK_CEILING,
    HORIZON_CEILING,
    MANY_CEILING,
    PREDICT_CEILING,
    TTL_CEILING,
)
from service.state_blob import WINDOW_CEILING

ROOT = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LSTM_", extra="forbid", frozen=True)

    model_tag: str | None = Field(
        None,
        description="BentoML model tag to serve; default: the shipped model, imported "
        "into the store on first start",
    )
    model_dir: Path = Field(
        ROOT / "models" / "acsf1-forecaster",
        description="checkpoint imported when model_tag is unset",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto: CUDA when available, else CPU",
    )
    max_sessions: int = Field(10_000, ge=1, le=10_000_000)
    session_ttl_s: float = Field(3600.0, gt=0, description="idle time before a session expires")
    max_session_ttl_s: float = Field(
        86_400.0, gt=0, le=TTL_CEILING, description="largest ttl_s a client may ask"
    )
    evict_when_full: bool = Field(
        False, description="evict the least recently used idle session instead of answering 429"
    )
    max_chunk: int = Field(512, ge=1, le=CHUNK_CEILING, description="timesteps per step request")
    max_predict_len: int = Field(
        4096, ge=1, le=PREDICT_CEILING, description="timesteps per /v1/predict"
    )
    max_many: int = Field(1024, ge=1, le=MANY_CEILING, description="items per step_many request")
    max_horizon: int = Field(256, ge=1, le=HORIZON_CEILING)
    max_streams: int = Field(10_000, ge=1, description="open /v1/stream WebSocket connections")
    stream_idle_s: float = Field(
        300.0, gt=0, description="a /v1/stream connection with no message this long is closed"
    )
    max_connections: int = Field(
        16_384,
        ge=1,
        description="open HTTP + WebSocket connections of the worker; lowered at start to fit "
        "its file-descriptor limit (the soft limit is raised to the hard one first)",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="a connection must complete a request's line and headers this long after "
        "it opens (or after that request's first byte), or it is closed",
    )
    max_header_bytes: int = Field(
        65_536, ge=1024, le=16_777_216, description="a request's line and headers"
    )
    keep_alive_s: float = Field(
        5.0, gt=0, le=3600, description="an idle connection between requests is closed after this"
    )
    access_log: bool = Field(
        False,
        description="BentoML's per-request access log; off: it costs CPU on every step",
    )
    max_body_bytes: int = Field(2_000_000, ge=1024)
    fast_routes: bool = Field(
        True,
        description="serve POST /v1/sessions/step and step_many in front of BentoML's "
        "per-request stack (service/fast_routes.py); false: through it, as every other route",
    )
    max_batch: int = Field(256, ge=1, le=65_536, description="sessions stepped in one batch")
    model_engine: Literal["auto", "eager", "native", "graphed"] = Field(
        "auto",
        description="what runs the LSTM stack's forward: native (model/native.py, one C++ call "
        "per chunk, built at start with the machine's C++ compiler and cached; CPU, float32), "
        "graphed (model/graphed.py, the stack replayed from CUDA graphs captured at bucketed "
        "batch sizes; CUDA, float32), eager (the reference StackedLSTM), or auto: native on a "
        "CPU, graphed on a GPU, where it can run, else eager",
    )
    native_cache_dir: Path | None = Field(
        None,
        description="where the native engine's compiled kernel is kept between starts; unset: "
        "$XDG_CACHE_HOME/lstm-sessions, else ~/.cache/lstm-sessions",
    )
    torch_threads: int = Field(
        1,
        ge=0,
        description="torch's CPU threads; 1: a server's small batches gain nothing from more and "
        "stalled when another process held a core; 0: torch's default",
    )
    inline_work: int = Field(
        256,
        ge=0,
        description="on a CPU, a batch of at most this many session-timesteps runs on the event "
        "loop (no thread hop, no GIL hand-offs), larger ones in a worker thread; 0: always a "
        "thread",
    )
    batch_wait_ms: float = Field(0.0, ge=0, le=100, description="extra wait for a fuller batch")
    sweep_interval_s: float = Field(
        1.0, gt=0, description="how often expired sessions and old replay records are freed"
    )
    replay_window_s: float = Field(
        60.0,
        gt=0,
        description="a step's reply is kept at least this long, to answer a retry of it again",
    )
    tombstones: int = Field(100_000, ge=0, description="expired/evicted ids remembered for 404s")
    redis_url: str | None = Field(
        None,
        pattern=r"^(redis|rediss|unix|redis\+cluster|rediss\+cluster)://",
        description="durable sessions in Redis, shared by replicas; "
        "redis+cluster://host:port,host:port for a Redis Cluster; unset: the embedded store",
    )
    redis_timeout_s: float = Field(1.0, gt=0, le=30, description="per Redis command")
    redis_wait_replicas: int = Field(
        0,
        ge=0,
        le=16,
        description="a write is answered only once this many Redis replicas have it (WAIT): 1 "
        "with a replica per master, so a failover loses no acknowledged step; 0: no wait",
    )
    redis_wait_timeout_ms: int = Field(
        500, ge=1, le=60_000, description="how long a write waits for its replicas (503 after)"
    )
    snapshot_path: Path | None = Field(
        Path("state/sessions.snapshot"),
        description="where the embedded store writes its sessions at shutdown and reads them at "
        "start, its journal beside it; empty: no snapshot and no journal",
    )
    journal: Literal["fsync", "write", "off"] = Field(
        "write",
        description="the embedded store's write-ahead journal beside the snapshot, each change "
        "in it before it is answered: fsync, on the disk (survives a power loss); write, in the "
        "kernel (survives a crash or kill -9 of the process); off, none (a kill -9 loses every "
        "session since the last start)",
    )
    journal_max_bytes: int = Field(
        64 * 2**20,
        ge=2**16,
        description="the journal is compacted (a new base of every session, a new journal) once "
        "it is this large and larger than the last base",
    )

    blob_key: SecretStr | None = Field(
        None,
        min_length=32,
        description="signs exported session blobs (HMAC-SHA256) and is required to import one: "
        "a blob made or altered by anyone without the key is refused; at least 32 characters, "
        "the same on every deployment that exchanges blobs; unset: blobs carry a checksum only",
    )

    migration_window: int = Field(
        128,  # 64 already matched a full replay on ACSF1 (bench/migration_bench.py): 2x margin
        ge=0,
        le=WINDOW_CEILING,
        description="each session keeps its last this many inputs (with its state: the pool, "
        "snapshots, Redis, blobs), so it can move to another model version by replaying them; "
        "0: none kept, sessions cannot migrate",
    )
    api_keys: Path | None = Field(
        None,
        description="a file of named API keys, stored hashed (`lstm-serve keys add`): every "
        "route but health, metrics and the docs then needs `Authorization: Bearer <key>`, and "
        "each key sees only the sessions it created; re-read when it changes (a key removed is "
        "revoked within a second); unset: no keys (a warning at start off loopback)",
    )
    cors_origins: str = Field(
        "",
        description="comma-separated origins a browser page may call the API from "
        "(https://app.example.com); empty: none (same-origin pages only)",
    )

    @field_validator("redis_url")
    @classmethod
    def _cluster_url_names_nodes(cls, value: str | None) -> str | None:
        from service.redis_state import cluster_nodes

        if value is not None:
            cluster_nodes(value)  # ValueError naming the part that is not host:port
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins_are_origins(cls, value: str) -> str:
        for origin in cors_origin_list(value):
            if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:\d+)?|\*", origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port]) or '*'")
        return value

    @field_validator("snapshot_path", "blob_key", "api_keys", "native_cache_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _ttl_within_max(self) -> Settings:
        if self.session_ttl_s > self.max_session_ttl_s:
            raise ValueError("LSTM_SESSION_TTL_S must not exceed LSTM_MAX_SESSION_TTL_S")
        return self


def cors_origin_list(value: str) -> list[str]:
    return [o.strip().rstrip("/") for o in value.split(",") if o.strip()]


def load_settings() -> Settings:
    """The settings, or SystemExit with one line per bad variable."""
    try:
        return Settings()
    except ValidationError as e:
        lines = []
        for err in e.errors():
            name = "LSTM_" + "_".join(str(p) for p in err["loc"]).upper() if err["loc"] else ""
            lines.append(f"  {name or 'settings'}: {err['msg']}")
        refuse_settings("invalid service settings:\n" + "\n".join(lines))


def refuse_settings(message: str) -> NoReturn:
    """Stop the start with ``message`` on standard error and exit status 2, as every other
    refusal to start (a bad setting exited 1; an outside test run)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)
