"""The BentoML service: wiring. The rules live in the engine (service.engine), the edge in
service.http and service.openapi, start and stop in service.startup.

    bentoml serve service.service:LSTMSessions      (make serve)

Request path: schema (pydantic, at BentoML's edge) -> handler here (a line: the engine's call,
its answer as the reply schema) -> engine (limits, seq, the session's lock) -> micro-batcher (one
batched forward) -> the reply.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import bentoml
import orjson
import torch
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

import service.model_registry  # noqa: F401  first: it fixes BENTOML_HOME before anyone reads it
from model import Checkpoint, pick_device
from service import connections, metrics
from service.auth import ApiKeyGate, admit, caller, websocket_authorization
from service.backends import Backend, EmbeddedBackend, RedisBackend
from service.batcher import BatchObserver, MicroBatcher
from service.cors import Cors, check_ws_origin
from service.engine import Engine, EngineEvents, EngineLimits, SessionView
from service.errors import ApiKeyMissing, BlobCorrupted, ServiceError, VersionNotFound
from service.fast_routes import FastRoutes
from service.http import ErrorContract, RefusalTracebacks, RequestDeadline
from service.journal import StoreFiles
from service.openapi import ALLOWED, Deployment, openapi_document
from service.redis_state import RedisState
from service.results import Outputs
from service.rounds import replay
from service.schemas import (
    SEQ_CEILING,
    VALUE_CEILING,
    ActivateModel,
    CreateSession,
    Deleted,
    Exported,
    Forecast,
    ForecastResult,
    ForecastStep,
    Gates,
    ImportSession,
    Limits,
    LoadedModel,
    LoadedModels,
    Migrate,
    ModelCard,
    ModelRef,
    Predict,
    PredictResult,
    SessionInfo,
    SessionRef,
    Step,
    StepMany,
    StepManyResult,
    StepOutput,
    StepResult,
    Unloaded,
)
from service.sessions import SessionStore, StatePool, StoreEvents, StoreLimits
from service.settings import Settings, cors_origin_list, load_settings
from service.snapshot import SnapshotInUse, SnapshotRefused, hold_snapshot, set_aside
from service.startup import (
    enforce_single_worker,
    in_arbiter,
    load_api_keys,
    load_model,
    model_engine,
    package_version,
    prepare_arbiter,
    refuse_to_start,
    server_identity,
    serving_host,
    tune_gc,
    warn_if_open,
    warn_if_redis_is_down,
)
from service.state_blob import SessionState
from service.stream import StreamEndpoint, StreamLimits
from service.tenants import KeyedStream, TenantSessions
from service.versions import Version, VersionEvents, Versions

settings = load_settings()  # at import: a bad LSTM_* variable stops the start, named
api_keys = load_api_keys(settings.api_keys)
if in_arbiter():
    prepare_arbiter()  # its own metrics directory; a refused start exits non-zero
    warn_if_open(serving_host(sys.argv), api_keys)
log = logging.getLogger("lstm_sessions")

P = ParamSpec("P")
R = TypeVar("R")


def answers_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn a ServiceError into its JSON answer; BentoML would wrap it in an array or hide it."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except ServiceError as e:
            return JSONResponse(e.body(), status_code=e.status)  # type: ignore[return-value]

    return wrapper


def route(path: str, body: type[BaseModel], **options: Any) -> Callable[[Any], Any]:
    """A BentoML API whose body is ``body``'s fields at the top level, handed to the handler as
    one ``body`` instance (or given one, called in process), with ServiceErrors answered as JSON.

    The fields are declared as the API's inputs (not one positional model) so that BentoML's own
    client can call a route with keyword arguments, ``client.step(session_id=..., inputs=...)``;
    the wire body is the same. BentoML has validated the fields already: they are assembled
    without validating again.
    """

    def wrap(fn: Callable[[Any, Any], Awaitable[Any]]) -> Any:
        @functools.wraps(fn)
        async def handler(self: Any, *given: Any, **fields: Any) -> Any:
            # Called in process with the model itself (``svc.step(Step(...))``), or by BentoML
            # with its fields.
            return await fn(self, given[0] if given else body.model_construct(**fields))

        return bentoml.api(route=path, input_spec=body, **options)(answers_errors(handler))

    return wrap


def fast_json(body: Any) -> Any:
    """A JSON response serialised by orjson, bypassing pydantic models on the hot routes; typed
    Any so a handler keeps its declared (OpenAPI) return type."""
    return Response(orjson.dumps(body), media_type="application/json")


def _iso(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def count_outcomes(tally: Counter[str]) -> None:
    """A request's step outcomes, one metric write per outcome (not per item)."""
    for outcome, n in tally.items():
        metrics.STEP_OUTCOMES.add(outcome, n)


def count_migration(outcome: str, seconds: float) -> None:
    metrics.MIGRATIONS.labels(outcome).inc()
    if outcome == "migrated":
        metrics.MIGRATION_SECONDS.observe(seconds)


def count_refused_step(path: str, code: str) -> None:
    """Steps refused before the handler ran (schema, body limit) count by their code too."""
    if path == "/v1/sessions/step":
        metrics.STEP_OUTCOMES.add(code)


def store_limits(config: Settings, authoritative: bool) -> StoreLimits:
    # A cache of Redis drops cold copies as it needs room: no eviction, no tombstones.
    return StoreLimits(
        config.max_sessions,
        config.session_ttl_s,
        config.max_session_ttl_s,
        evict_when_full=config.evict_when_full or not authoritative,
        tombstones=config.tombstones if authoritative else 0,
        replay_window_s=config.replay_window_s,
    )


def store_events(authoritative: bool) -> StoreEvents:
    # Redis expires sessions itself: a cache's drops are no expiry and no eviction.
    return StoreEvents(
        created=metrics.SESSIONS_CREATED.inc,
        expired=metrics.SESSIONS_EXPIRED.inc if authoritative else (lambda n: None),
        evicted=metrics.SESSIONS_EVICTED.inc if authoritative else (lambda: None),
        deleted=metrics.SESSIONS_DELETED.inc,
    )


def limits(config: Settings) -> Limits:
    """The configured limits, as the model card states them."""
    return Limits(
        max_chunk=config.max_chunk,
        max_horizon=config.max_horizon,
        max_predict_len=config.max_predict_len,
        max_many=config.max_many,
        max_sessions=config.max_sessions,
        max_body_bytes=config.max_body_bytes,
        session_ttl_s=config.session_ttl_s,
        max_session_ttl_s=config.max_session_ttl_s,
        max_abs_value=VALUE_CEILING,
        max_seq=SEQ_CEILING,
    )


def deployment(config: Settings, n_features: int) -> Deployment:
    """What the OpenAPI document narrows the schemas to."""
    return Deployment(
        n_features=n_features,
        max_chunk=config.max_chunk,
        max_predict_len=config.max_predict_len,
        max_many=config.max_many,
        max_horizon=config.max_horizon,
        max_session_ttl_s=config.max_session_ttl_s,
        max_body_bytes=config.max_body_bytes,
        api_keys=config.api_keys is not None,
    )


PING_BODY = b'{"ok":true}'

UI_DIR = Path(__file__).resolve().parent / "ui"
# The live page: static files only; it talks to the public API like any client.
ui_app = Starlette(routes=[Mount("/", StaticFiles(directory=UI_DIR, html=True))])


# Bound once: ``bentoml.get_current_service`` goes through bentoml's lazy module __getattr__,
# 3% of a request's samples on the fast routes at one client.
_get_current_service = bentoml.get_current_service


def _current() -> LSTMSessions:
    return cast(LSTMSessions, _get_current_service())


async def _stream(ws: WebSocket) -> None:
    await _current().streams.serve(ws)


async def _model_get(request: Request) -> Response:
    return Response(_current().card().model_dump_json(), media_type="application/json")


async def _ping_get(request: Request) -> Response:
    return Response(PING_BODY, media_type="application/json")


async def _admin_models_get(request: Request) -> Response:
    return Response(_current()._loaded().model_dump_json(), media_type="application/json")


# /v1/stream, and GET (and HEAD) for the read-only routes whose POST BentoML serves. BentoML mounts
# this passively: it claims only these paths and methods, so a POST still reaches BentoML's route.
v1_app = Starlette(
    routes=[
        WebSocketRoute("/stream", _stream),
        Route("/model", _model_get, methods=["GET"]),
        Route("/ping", _ping_get, methods=["GET"]),
        Route("/admin/models", _admin_models_get, methods=["GET"]),
    ]
)

SERVICE_NAME = "lstm_sessions"
TRAFFIC_TIMEOUT_S = 60  # BentoML's traffic timeout: a request's deadline (RequestDeadline)


@bentoml.asgi_app(ui_app, path="/ui")
@bentoml.asgi_app(v1_app, path="/v1")
@bentoml.service(
    name=SERVICE_NAME,
    workers=1,
    traffic={"timeout": TRAFFIC_TIMEOUT_S},
    logging={"access": {"enabled": settings.access_log}},
    # A span per WebSocket message cost more than the step it traced; the connection is still
    # counted by lstm_streams_open and its steps by lstm_step_requests_total.
    tracing={"excluded_urls": ["/v1/stream"]},
)
class LSTMSessions:
    def __init__(self) -> None:
        enforce_single_worker(SERVICE_NAME)
        self.device = pick_device(settings.device)
        if torch.device(self.device).type == "cpu" and settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self._model_labels: set[tuple[str, str]] = set()  # lstm_model_sessions' label values
        self._unfollowed: str | None = None  # an active tag of Redis's this replica cannot load
        self.checkpoint = load_model(settings.model_tag, settings.model_dir, self.device)
        config = self.checkpoint.model.config
        self.n_features = config.n_features
        self.redis: RedisState | None = None
        self.files: StoreFiles | None = None  # the embedded store's snapshot and journal
        if settings.redis_url is not None:
            warn_if_redis_is_down(settings.redis_url)
            self.redis = RedisState(
                settings.redis_url,
                timeout_s=settings.redis_timeout_s,
                wait_replicas=settings.redis_wait_replicas,
                wait_timeout_ms=settings.redis_wait_timeout_ms,
            )
        first = self._build_version(self.checkpoint, durable=True)
        # The version started with: its store is the one the snapshot holds.
        self.engine = first.engine
        self.backend, self.store, self.batcher = (
            first.engine.backend,
            first.engine.store,
            first.engine.batcher,
        )
        self.versions = Versions(
            first,
            loader=self._load_version,
            events=VersionEvents(migrated=count_migration, sessions=self._count_sessions),
        )
        pool = self.store.pool
        self.streams = StreamEndpoint(
            StreamLimits(settings.max_streams, settings.stream_idle_s, settings.max_body_bytes),
            admit=self._stream_sessions,
            opened=metrics.STREAMS_OPEN.set,
            refused=metrics.STEP_OUTCOMES.add,
        )
        self._sweeper: asyncio.Task[None] | None = None
        metrics.STATE_MEMORY.set(pool.nbytes)
        metrics.STORE_UP.set(1)
        metrics.MODEL_INFO.labels(
            self.checkpoint.name, self.checkpoint.version, str(self.device)
        ).set(1)
        if self.files is not None:
            self._recover(self.files)
        self._count_sessions()
        log.info("serving %s:%s on %s", self.checkpoint.name, self.checkpoint.version, self.device)
        tune_gc()

    def _build_version(self, checkpoint: Checkpoint, durable: bool = False) -> Version:
        """A model version's engine: its pool, store, backend and micro-batcher; ``durable``:
        with the snapshot and journal (the version the server started with)."""
        model = checkpoint.model
        pool = StatePool.for_model(
            model, settings.max_sessions, self.device, window=settings.migration_window
        )
        authoritative = self.redis is None
        store = SessionStore(
            pool, store_limits(settings, authoritative), events=store_events(authoritative)
        )
        backend: Backend
        if self.redis is None:
            files = None
            if durable and settings.snapshot_path is not None:
                # The version started with keeps the snapshot and the journal (its store is the
                # one a restart restores), this process alone.
                try:
                    held = hold_snapshot(settings.snapshot_path, server_identity())
                except SnapshotInUse as e:
                    refuse_to_start(
                        f"{e}: give each server its own LSTM_SNAPSHOT_PATH (empty: none), or "
                        "stop the other"
                    )
                except OSError as e:
                    refuse_to_start(
                        f"cannot lock {settings.snapshot_path} for this server ({e}); choose "
                        "another LSTM_SNAPSHOT_PATH (empty: none)"
                    )
                if not held:
                    log.warning(
                        "%s: its filesystem has no locks; nothing stops a second server on it",
                        settings.snapshot_path,
                    )
                files = self.files = StoreFiles(
                    settings.snapshot_path,
                    settings.journal,
                    settings.journal_max_bytes,
                    model=(checkpoint.name, checkpoint.version),
                    header_of=lambda session: engine.blob_header(session),
                )
            backend = EmbeddedBackend(store, files)
        else:
            header = {"model": checkpoint.name, "model_version": checkpoint.version}
            backend = RedisBackend(store, self.redis, header)
        batcher = MicroBatcher(
            model,
            pool,
            max_batch=settings.max_batch,
            wait_s=settings.batch_wait_ms / 1000,
            persist=backend.persist,
            inline_work=settings.inline_work,
            stack_engine=model_engine(
                settings.model_engine, model, settings.native_cache_dir, settings.max_batch
            ),
            observer=BatchObserver(
                batch=metrics.BATCH_SESSIONS.observe,
                queue_wait=metrics.QUEUE_WAIT.observe,
                model_time=metrics.MODEL_STEP.observe,
                timesteps=metrics.TIMESTEPS.inc,
            ),
        )
        engine = Engine(
            backend,
            batcher,
            model=(checkpoint.name, checkpoint.version),
            n_features=model.config.n_features,
            blob_key=settings.blob_key.get_secret_value().encode() if settings.blob_key else None,
            limits=EngineLimits(
                max_chunk=settings.max_chunk,
                max_predict_len=settings.max_predict_len,
                max_many=settings.max_many,
                max_horizon=settings.max_horizon,
            ),
            events=EngineEvents(
                step_outcome=metrics.STEP_OUTCOMES.add,
                step_outcomes=count_outcomes,
                replayed=metrics.REPLAYS.inc,
                seq_conflict=metrics.SEQ_CONFLICTS.inc,
                sessions=lambda _: self._count_sessions(),
            ),
        )
        return Version(
            f"{checkpoint.name}:{checkpoint.version}",
            engine,
            str(self.device),
            close=batcher.close,
        )

    def _load_version(self, tag: str) -> Version:
        """A version from BentoML's store (in a thread: ``Versions.load``)."""
        from bentoml.exceptions import BentoMLException

        from model import CheckpointError
        from service.model_registry import load_from_store

        try:
            checkpoint = load_from_store(tag, device=str(self.device))
        except (BentoMLException, CheckpointError, OSError) as e:
            raise VersionNotFound(
                f"model {tag!r} cannot be loaded from the model store ({e}); import it with "
                f"`python -m service.model_registry import DIR`",
                tag=tag,
            ) from None
        version = self._build_version(checkpoint)
        log.info("loaded %s beside %s", version.tag, ", ".join(self.versions.held))
        return version

    def _count_sessions(self) -> None:
        versions: Versions | None = getattr(self, "versions", None)
        if versions is None:  # the first version, being built
            metrics.SESSIONS_ACTIVE.set(len(self.store))
            return
        metrics.SESSIONS_ACTIVE.set(versions.total_sessions())
        shown = {
            (v.tag, "true" if v is versions.active else "false"): v.sessions
            for v in versions.held.values()
        }
        # A multiprocess gauge cannot drop a label: one no longer true reads 0.
        for labels in self._model_labels - shown.keys():
            metrics.MODEL_SESSIONS.labels(*labels).set(0)
        for labels, sessions in shown.items():
            metrics.MODEL_SESSIONS.labels(*labels).set(sessions)
        self._model_labels |= shown.keys()

    async def __is_ready__(self) -> bool:
        self._start_sweeper()
        ready = await self.backend.ready()
        metrics.STORE_UP.set(1 if ready else 0)
        return ready

    # --- sessions ----------------------------------------------------------------------------

    @route("/v1/sessions/create", CreateSession)
    async def create(self, body: CreateSession, /) -> SessionInfo:
        """Open a session at t = 0, with a client-chosen or random id."""
        self._start_sweeper()
        return self._info(await self._sessions().create(body.session_id, body.ttl_s))

    @route("/v1/sessions/step", Step)
    async def step(self, body: Step, /) -> StepResult:
        """Feed a chunk of T timesteps; get the forecast and anomaly score after each."""
        return StepResult.model_validate(await self._sessions().step(body))

    @route("/v1/sessions/step_many", StepMany)
    async def step_many(self, body: StepMany, /) -> StepManyResult:
        """Steps for many sessions in one request, each succeeding or failing on its own.

        Items of one session apply in the order given; different sessions go to the batcher
        together. Results come back in the order of the items. The reply is serialised straight
        from plain data: building a pydantic model per item cost more than the step itself.
        """
        return fast_json({"results": await self._sessions().step_many(body.items)})

    @route("/v1/sessions/forecast", Forecast)
    async def forecast(self, body: Forecast, /) -> ForecastResult:
        """Forecast ``horizon`` future steps from the current state, without changing it."""
        f = await self._sessions().forecast(
            body.session_id, body.horizon, paths=body.paths, seed=body.seed
        )
        steps = [
            ForecastStep(mean=m, std=s, p10=lo, p50=mid, p90=hi)
            for m, s, lo, mid, hi in zip(f.means, f.stds, f.p10, f.p50, f.p90, strict=True)
        ]
        return ForecastResult(
            session_id=f.session_id, t=f.t, forecast=steps, paths=f.paths, seed=f.seed
        )

    @route("/v1/sessions/get", SessionRef)
    async def get(self, body: SessionRef, /) -> SessionInfo:
        """A session's t and times."""
        return self._info(await self._sessions().get(body.session_id))

    @route("/v1/sessions/reset", SessionRef)
    async def reset(self, body: SessionRef, /) -> SessionInfo:
        """Back to a zero state at t = 0."""
        return self._info(await self._sessions().reset(body.session_id))

    @route("/v1/sessions/delete", SessionRef)
    async def delete(self, body: SessionRef, /) -> Deleted:
        """Free a session and its state."""
        return Deleted(session_id=await self._sessions().delete(body.session_id), deleted=True)

    @route("/v1/sessions/export", SessionRef)
    async def export(self, body: SessionRef, /) -> Exported:
        """The session's state as a blob another deployment of the same model can import."""
        view, blob = await self._sessions().export(body.session_id)
        name, version = view.model
        blob64 = base64.b64encode(blob).decode()
        return Exported(
            session_id=view.session_id, t=view.t, model=name, model_version=version, blob=blob64
        )

    @route("/v1/sessions/import", ImportSession, name="import")
    async def import_(self, body: ImportSession, /) -> SessionInfo:
        """A session restored from an exported blob, continuing where it was."""
        try:
            blob = base64.b64decode(body.blob, validate=True)
        except ValueError as e:  # binascii.Error, or a character outside ASCII
            raise BlobCorrupted(f"the blob was refused: {e}") from None
        return self._info(await self._sessions().import_blob(blob, body.session_id, body.ttl_s))

    @route("/v1/sessions/migrate", Migrate)
    async def migrate(self, body: Migrate, /) -> SessionInfo:
        """Move a session to another loaded model version (default: the active one) by
        replaying its kept inputs; t and seq carry on."""
        to = await self._resolve(body.to) if body.to else None
        return self._info(await self._sessions().migrate(body.session_id, to))

    # --- admin: model versions (behind the admin role with API keys: service/auth.py) ---------

    @bentoml.api(route="/v1/admin/models")
    async def admin_models(self) -> LoadedModels:
        """The loaded model versions: which is active, how many sessions are on each."""
        return self._loaded()

    @route("/v1/admin/models/load", ModelRef)
    async def admin_load(self, body: ModelRef, /) -> LoadedModels:
        """Load a version from BentoML's model store beside the others (not active yet)."""
        await self.versions.load(body.tag)
        self._count_sessions()
        return self._loaded()

    @route("/v1/admin/models/activate", ActivateModel)
    async def admin_activate(self, body: ActivateModel, /) -> LoadedModels:
        """Make a loaded version the one new sessions are created on; migrate the others'."""
        tag = await self._resolve(body.tag)
        self.versions.require(tag)  # 404 model_version_not_loaded before anything is written
        if self.redis is not None:  # first: the other replicas follow it (_follow_active), and
            await self.redis.set_active_model(tag)  # this one's sweeper never undoes the call
        version = await self.versions.activate(tag, body.migrate)
        log.info("model %s is active (migrate: %s)", version.tag, body.migrate)
        self._count_sessions()
        return self._loaded()

    @route("/v1/admin/models/unload", ModelRef)
    async def admin_unload(self, body: ModelRef, /) -> Unloaded:
        """Unload a version no session is on (and that is not active)."""
        tag = await self._resolve(body.tag)
        await self.versions.unload(tag)
        log.info("model %s unloaded", tag)
        return Unloaded(tag=tag, unloaded=True)

    async def _resolve(self, tag: str) -> str:
        """A tag as the versions hold it: ``name`` (or ``name:latest``) is the store's latest."""
        if tag in self.versions.held or (":" in tag and not tag.endswith(":latest")):
            return tag
        from bentoml.exceptions import BentoMLException

        try:
            return str(await asyncio.to_thread(lambda: bentoml.models.get(tag).tag))
        except BentoMLException:
            return tag  # not in the store: the versions answer model_version_not_loaded

    def _loaded(self) -> LoadedModels:
        return LoadedModels(
            models=[
                LoadedModel(**{**m, "loaded_at": _iso(m["loaded_at"])})
                for m in self.versions.models()
            ]
        )

    # --- stateless ----------------------------------------------------------------------------

    @route("/v1/predict", Predict)
    async def predict(self, body: Predict, /) -> PredictResult:
        """A whole sequence in, the outputs after every timestep out; no session involved."""
        out = await self.versions.predict(body.inputs, body.return_gates)
        return PredictResult(
            outputs=self._outputs(out), gates=Gates(**out.gates) if out.gates else None
        )

    @bentoml.api(route="/v1/model")
    def model(self) -> ModelCard:
        """The model card: what is served, how it was trained, how it compares with baselines."""
        return self.card()

    @bentoml.api(route="/v1/ping")
    async def ping(self) -> dict[str, bool]:
        """Does nothing: BentoML's own cost per request, the floor the benchmarks compare with.

        Answers a starlette response (a new one each time: BentoML adds headers to it), so it
        measures the request path alone: a returned dict would add BentoML's output
        serialisation, which the step route does not pay.
        """
        return cast(dict[str, bool], Response(PING_BODY, media_type="application/json"))

    # --- start and stop ----------------------------------------------------------------------

    @bentoml.on_shutdown
    def _write_snapshot(self) -> None:
        """At a clean stop, the embedded store's sessions go to its snapshot (and its journal
        goes), to be restored at start."""
        if self.files is None:
            return
        # Sessions on versions loaded since the start go in too: the next start (on whichever
        # version) restores its own and migrates the others' by replay.
        others = [
            (v.engine.store, v.engine.blob_header)
            for v in self.versions.held.values()
            if v.engine is not self.engine
        ]
        n = self.files.close(others)
        log.info("snapshot of %d sessions written to %s", n, self.files.snapshot)

    def _migrate_snapshot(
        self, entries: list[tuple[dict[str, Any], SessionState]]
    ) -> list[tuple[dict[str, Any], SessionState]]:
        """A restart with a new model: the snapshot's sessions of another version of this model
        move to it by replaying their windows (one batched forward per window length); one with
        no window and t > 0 cannot, and answers ``migration_impossible`` from then on."""
        name, version = self.engine.model
        moving = [
            i
            for i, (header, state) in enumerate(entries)
            if header.get("model") == name and header.get("model_version") != version
        ]
        if not moving:
            return entries
        staying = set(range(len(entries))) - set(moving)
        kept = [entries[i] for i in sorted(staying)]
        replayable: list[int] = []
        lost: list[int] = []
        for i in moving:
            header, state = entries[i]
            t = int(header.get("t", 0))
            # a window shorter than what this version keeps (it restarted) is not replayed
            complete = state.window_rows() >= min(t, self.store.pool.window or t)
            (replayable if t == 0 or (state.window_rows() and complete) else lost).append(i)
        with_window = [i for i in replayable if entries[i][1].window_rows()]
        windows = [entries[i][1].window for i in with_window]
        states = replay(
            self.checkpoint.model, [w for w in windows if w is not None], torch.device(self.device)
        )
        moved = dict(zip(with_window, states, strict=True))
        for i in replayable:
            header, _ = entries[i]
            state = moved.get(i) or self.store.pool.zero_state()
            kept.append(({**header, "model_version": version}, state))
        for i in lost:
            self.store.remember_gone(str(entries[i][0]["session_id"]), "unmigratable")
        metrics.MIGRATIONS.labels("migrated").inc(len(replayable))
        log.warning(
            "the snapshot's %d sessions of %s (other versions) moved to %s:%s by replaying their "
            "windows",
            len(replayable),
            name,
            name,
            version,
        )
        if lost:
            # Kept as they were, a snapshot of their own: the version they are on can serve them
            # again (before, they were gone for good at the next compaction; an outside run).
            assert self.files is not None
            aside = set_aside(self.files.snapshot, ".unmigrated", [entries[i] for i in lost])
            metrics.MIGRATIONS.labels("migration_impossible").inc(len(lost))
            versions = sorted({str(entries[i][0].get("model_version")) for i in lost})
            log.warning(
                "%d sessions could not move (no window, or one shorter than t since a crash's "
                "recovery): they answer migration_impossible here, and are kept in %s; to serve "
                "them, start %s:%s on it (LSTM_MODEL_TAG, LSTM_SNAPSHOT_PATH=%s)",
                len(lost),
                aside,
                name,
                "/".join(versions),
                aside,
            )
        return kept

    def _recover(self, files: StoreFiles) -> None:
        """The snapshot and the journal after it (a crash's), restored all or nothing; then
        the journal starts afresh from what was restored."""
        try:
            done = files.recover(
                self.store, self.engine.check_blob, now=time.time(), migrate=self._migrate_snapshot
            )
        except SnapshotRefused as e:
            log.error(
                "snapshot %s and its journal not restored, none of it (%s); kept as %s",
                files.snapshot,
                e,
                ", ".join(p.name for p in files.rejected),  # (named the snapshot's, whatever
            )  # was there; an outside test run)
            done = None
        if done is not None:
            log.info(
                "restored %d sessions from %s and %d journal records after it",
                done.restored.sessions,
                files.snapshot,
                done.groups,
            )
            if done.restored.expired:
                log.info("%d sessions of it had expired meanwhile", done.restored.expired)
            if done.restored.evicted:
                log.warning(
                    "%d oldest sessions of it not restored: no room (LSTM_MAX_SESSIONS; "
                    "LSTM_EVICT_WHEN_FULL is on)",
                    done.restored.evicted,
                )
        files.open(self.store)

    # --- helpers -------------------------------------------------------------------------------

    @functools.cached_property
    def openapi_json(self) -> bytes:
        """The OpenAPI document of this deployment: its model's width, its limits."""
        document = openapi_document(package_version(), deployment(settings, self.n_features))
        return orjson.dumps(document)

    def card(self) -> ModelCard:
        card = self.checkpoint.card
        return ModelCard(
            name=self.checkpoint.name,
            version=self.checkpoint.version,
            device=str(self.device),
            features=list(card["config"]["feature_names"]),
            config=card["config"],
            normalisation=card["normalisation"],
            metrics=card.get("metrics", {}),
            limits=limits(settings),
        )

    def _sessions(self) -> Versions | TenantSessions:
        """The sessions as this request's caller sees them: with API keys, the key's namespace
        (never the whole store: a request the gate did not admit reaches nothing)."""
        principal = caller.get()
        if principal is not None:
            return TenantSessions(self.versions, principal.name)
        if api_keys is not None:
            raise ApiKeyMissing("this service needs an API key (the request was not admitted)")
        return self.versions

    def _stream_sessions(self, ws: WebSocket) -> Versions | KeyedStream:
        """A WebSocket's caller (its key checked as an HTTP request's is, and again at every
        message) and what it steps. A page of another origin is refused (browsers apply no CORS
        to WebSockets): an ``Origin`` must be the service's own or in LSTM_CORS_ORIGINS."""
        check_ws_origin(ws.scope, cors_origin_list(settings.cors_origins))
        if api_keys is None:
            return self.versions
        authorization = websocket_authorization(ws.scope)
        principal = admit(api_keys, "/v1/stream", authorization)
        return KeyedStream(
            TenantSessions(self.versions, principal.name),
            recheck=lambda: admit(api_keys, "/v1/stream", authorization),
        )

    def _info(self, view: SessionView) -> SessionInfo:
        name, version = view.model
        return SessionInfo(
            session_id=view.session_id,
            model=name,
            model_version=version,
            t=view.t,
            created_at=_iso(view.created_at),
            last_active_at=_iso(view.last_active),
            expires_at=_iso(view.expires_at),
            ttl_s=view.ttl_s,
        )

    @staticmethod
    def _outputs(out: Outputs) -> list[StepOutput]:
        return [
            StepOutput(mean=m, std=s, anomaly_z=z)
            for m, s, z in zip(out.mean, out.std, out.anomaly_z, strict=True)
        ]

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(settings.sweep_interval_s)
            swept = [v.engine.store.sweep() for v in list(self.versions.held.values())]
            if any(swept):
                self._count_sessions()
            metrics.STORE_UP.set(1 if await self.backend.ready() else 0)
            if self.redis is not None:
                with contextlib.suppress(ServiceError):  # Redis down: /readyz says so already
                    await self._follow_active(self.redis)

    async def _follow_active(self, redis: RedisState) -> None:
        """With Redis, the version another replica activated (``lstm:active-model``) becomes
        this one's active too, loaded first if this replica does not hold it: one admin call
        rolls a version out to every replica within LSTM_SWEEP_INTERVAL_S."""
        tag = await redis.active_model()
        if tag is None or tag == self.versions.active.tag:
            return
        try:
            if tag not in self.versions.held:
                await self.versions.load(tag)
            await self.versions.activate(tag)
        except ServiceError as e:
            if self._unfollowed != tag:
                log.error("cannot follow the active model %s another replica chose: %s", tag, e)
                self._unfollowed = tag
            return
        self._count_sessions()
        log.info("model %s is active (activated by another replica)", tag)


cast(Any, LSTMSessions).add_asgi_middleware(
    ErrorContract,
    max_body_bytes=settings.max_body_bytes,
    openapi=lambda: _current().openapi_json,
    allowed=ALLOWED,
    refused_at_edge=count_refused_step,
)
RequestDeadline.install()
RefusalTracebacks.install()


async def _fast_step(body: Step) -> Any:
    return await _current()._sessions().step(body)


async def _fast_step_many(body: StepMany) -> Any:
    return {"results": await _current()._sessions().step_many(body.items)}


async def _fast_predict(body: Predict) -> Any:
    """``LSTMSessions.predict``'s answer (PredictResult's shape) as plain data: a long history's
    reply is hundreds of outputs, each a pydantic model on BentoML's path."""
    out = await _current().versions.predict(body.inputs, body.return_gates)
    outputs = [
        {"mean": m, "std": s, "anomaly_z": z}
        for m, s, z in zip(out.mean, out.std, out.anomaly_z, strict=True)
    ]
    return {"outputs": outputs, "gates": out.gates}


def fast_routes(app: Any) -> FastRoutes:
    """The hot routes in front of BentoML's stack (service/fast_routes.py): the same bodies,
    errors and metrics as the handlers above, without BentoML's per-request layers."""
    return FastRoutes(
        app,
        {
            "/v1/sessions/step": (Step, _fast_step),
            "/v1/sessions/step_many": (StepMany, _fast_step_many),
            "/v1/predict": (Predict, _fast_predict),
        },
        max_body_bytes=settings.max_body_bytes,
        timeout_s=TRAFFIC_TIMEOUT_S,
        refused_at_edge=count_refused_step,
        streams={"/v1/stream": _stream},
    )


def front(app: Any) -> Any:
    """What every HTTP request meets first, outermost first: CORS (a preflight is answered
    before any key is asked for), the API-key gate, the fast routes, then BentoML's stack."""
    if settings.fast_routes:
        app = fast_routes(app)
    if api_keys is not None:
        app = ApiKeyGate(app, api_keys, refused=count_refused_step)
    return Cors(app, cors_origin_list(settings.cors_origins))


connections.install(
    connections.fit_to_fd_limit(
        settings.max_connections,
        settings.header_timeout_s,
        settings.max_header_bytes,
        settings.keep_alive_s,
    ),
    front=front,
)
