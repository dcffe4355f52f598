"""The BentoML service: wiring only. The rules live in sessions, batcher, errors and schemas.

    bentoml serve service.service:LSTMSessions      (make serve)

Request path: schema (pydantic, at BentoML's edge) -> handler here (limits, seq) -> session store
(the session and its lock) -> micro-batcher (one batched forward) -> response schema.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import gc
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TypeVar, cast

import bentoml
import numpy as np
import orjson
import torch
from bentoml.exceptions import NotFound
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from model import Checkpoint, CheckpointError, pick_device
from service import connections, metrics
from service.batcher import BatchObserver, MicroBatcher, inputs_digest
from service.directory import LocalSessions, RedisSessions, Sessions
from service.errors import (
    BlobCorrupted,
    ChunkTooLong,
    HorizonTooLong,
    ModelMismatch,
    NoObservations,
    SeqConflict,
    ServiceError,
    StaleSession,
    TooManyItems,
    WrongFeatureCount,
)
from service.http import ErrorContract, RefusalTracebacks, RequestDeadline
from service.model_registry import import_checkpoint, load_from_store, model_store
from service.openapi import ALLOWED, Deployment, openapi_document
from service.redis_state import RedisState
from service.results import StepDone
from service.schemas import (
    SEQ_CEILING,
    SESSION_ID_PATTERN,
    VALUE_CEILING,
    CreateSession,
    Deleted,
    Exported,
    Forecast,
    ForecastResult,
    ForecastStep,
    Gates,
    ImportSession,
    Limits,
    ModelCard,
    Predict,
    PredictResult,
    SessionInfo,
    SessionRef,
    Step,
    StepMany,
    StepManyResult,
    StepOutput,
    StepResult,
)
from service.sessions import Session, SessionStore, StatePool, StoreEvents, StoreLimits
from service.settings import load_settings
from service.snapshot import read_snapshot, step_from_json, step_to_json, write_snapshot
from service.startup import in_arbiter, prepare_arbiter, refuse_in_worker
from service.state_blob import BlobError, SessionState, decode, encode
from service.stream import StreamEndpoint, StreamLimits

settings = load_settings()  # at import: a bad LSTM_* variable stops the start, named
if in_arbiter():
    prepare_arbiter()  # its own metrics directory; a refused start exits non-zero
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


def count_outcome(outcome: str, tally: Counter[str] | None) -> None:
    """A step's outcome, into the metric or, for step_many, into the request's tally: a write to
    a multiprocess-mode metric costs more than a step's bookkeeping."""
    if tally is None:
        metrics.STEP_REQUESTS.labels(outcome).inc()
    else:
        tally[outcome] += 1


def step_reply(session_id: str, done: StepDone) -> dict[str, Any]:
    """A step's reply as plain JSON-ready data, shaped as the StepResult schema."""
    out = done.outputs
    return {
        "session_id": session_id,
        "t": done.t,
        "outputs": [
            {"mean": m, "std": s, "anomaly_z": z}
            for m, s, z in zip(out.mean, out.std, out.anomaly_z, strict=True)
        ],
        "gates": out.gates,
    }


def _iso(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def enforce_single_worker() -> None:
    """The session store lives in this process: a second worker would see none of its sessions.

    BentoML starts workers from one arbiter process and restarts a worker that fails, so raising
    alone would leave worker 1 serving beside a crash loop. A worker that finds the invariant
    broken stops the arbiter, so the whole server refuses to run.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer

    try:
        workers = BentoMLContainer.config.services[SERVICE_NAME].workers.get()
    except (KeyError, AttributeError):
        workers = 1
    index = bentoml.server_context.worker_index
    if workers == 1 and (index is None or index == 1):
        return
    refuse_to_start(
        f"LSTMSessions keeps sessions in process memory and must run with exactly one "
        f"worker (configured: {workers}, this is worker {index}); scale with replicas"
    )


def refuse_to_start(message: str) -> NoReturn:
    """Stop the whole server with ``message``: under bentoml serve, the worker stops its arbiter
    and exits, and the arbiter exits non-zero (service.startup); in process, it raises."""
    log.critical(message)
    if bentoml.server_context.worker_index is not None:
        refuse_in_worker()
    raise RuntimeError(message)


def load_model(device: str) -> Checkpoint:
    """The model to serve, or a start-up failure that says what to do."""
    if settings.model_tag is None:
        try:
            tag = import_checkpoint(settings.model_dir)
        except (CheckpointError, OSError) as e:
            refuse_to_start(
                f"cannot import the model in {settings.model_dir} ({e}); set "
                f"LSTM_MODEL_DIR to a checkpoint directory, or run `make train`"
            )
    else:
        tag = settings.model_tag
    try:
        return load_from_store(tag, device=device)
    except NotFound:
        refuse_to_start(
            f"no model {tag!r} in the model store {model_store()} (BENTOML_HOME); import a "
            f"checkpoint there with `python -m service.model_registry import DIR` (it prints "
            f"the tag), or unset LSTM_MODEL_TAG to serve the shipped model"
        )
    except CheckpointError as e:
        refuse_to_start(f"the stored model {tag!r} is unusable: {e}")


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the hot path.

    torch and BentoML leave a few hundred thousand objects behind at start-up, and every
    collection walked them: freezing them (they live as long as the process) and collecting the
    youngest generation every 10,000 allocations instead of 700 took step_many from ~10k to ~21k
    items/s in process on 2 cores. Garbage without cycles is freed by reference counting as ever.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(10_000, middle, old)


def warn_if_redis_is_down(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
    except (redis.RedisError, OSError) as e:
        log.warning(
            "Redis at %s does not answer (%s): steps answer 503 store_unavailable and "
            "/readyz 503 until it does; check that Redis runs and LSTM_REDIS_URL",
            url,
            e,
        )


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lstm-sessions")
    except PackageNotFoundError:
        return "0+unknown"


def fast_json(body: Any) -> Any:
    """A JSON response serialised by orjson, bypassing pydantic models on the hot routes; typed
    Any so a handler keeps its declared (OpenAPI) return type."""
    return Response(orjson.dumps(body), media_type="application/json")


PING_BODY = b'{"ok":true}'

UI_DIR = Path(__file__).resolve().parent / "ui"
# The live page: static files only; it talks to the public API like any client.
ui_app = Starlette(routes=[Mount("/", StaticFiles(directory=UI_DIR, html=True))])


async def _stream(ws: WebSocket) -> None:
    service = cast(LSTMSessions, bentoml.get_current_service())
    await service.streams.serve(ws)


async def _model_get(request: Request) -> Response:
    service = cast(LSTMSessions, bentoml.get_current_service())
    return Response(service.card().model_dump_json(), media_type="application/json")


async def _ping_get(request: Request) -> Response:
    return Response(PING_BODY, media_type="application/json")


# /v1/stream, and GET (and HEAD) for the read-only routes whose POST BentoML serves. BentoML mounts
# this passively: it claims only these paths and methods, so a POST still reaches BentoML's route.
v1_app = Starlette(
    routes=[
        WebSocketRoute("/stream", _stream),
        Route("/model", _model_get, methods=["GET"]),
        Route("/ping", _ping_get, methods=["GET"]),
    ]
)

SERVICE_NAME = "lstm_sessions"
STALE_RETRIES = 3  # reload-and-recompute rounds before a step gives up on a contended session


@bentoml.asgi_app(ui_app, path="/ui")
@bentoml.asgi_app(v1_app, path="/v1")
@bentoml.service(
    name=SERVICE_NAME,
    workers=1,
    traffic={"timeout": 60},
    logging={"access": {"enabled": settings.access_log}},
    # A span per WebSocket message cost more than the step it traced; the connection is still
    # counted by lstm_streams_open and its steps by lstm_step_requests_total.
    tracing={"excluded_urls": ["/v1/stream"]},
)
class LSTMSessions:
    def __init__(self) -> None:
        enforce_single_worker()
        self.device = pick_device(settings.device)
        if torch.device(self.device).type == "cpu" and settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.checkpoint = load_model(self.device)
        model = self.checkpoint.model
        config = model.config
        self.n_features = config.n_features
        pool = StatePool(
            config.num_layers,
            config.hidden_size,
            config.n_features,
            settings.max_sessions,
            self.device,
        )
        durable = settings.redis_url is not None
        # With Redis the pool is a cache: dropping a cold copy is no eviction and no expiry.
        self.store = SessionStore(
            pool,
            StoreLimits(
                settings.max_sessions,
                settings.session_ttl_s,
                settings.max_session_ttl_s,
                evict_when_full=settings.evict_when_full or durable,
                tombstones=0 if durable else settings.tombstones,
                replay_window_s=settings.replay_window_s,
            ),
            events=StoreEvents(
                created=metrics.SESSIONS_CREATED.inc,
                expired=(lambda n: None) if durable else metrics.SESSIONS_EXPIRED.inc,
                evicted=(lambda: None) if durable else metrics.SESSIONS_EVICTED.inc,
                deleted=metrics.SESSIONS_DELETED.inc,
            ),
        )
        self.sessions: Sessions
        if settings.redis_url is not None:
            warn_if_redis_is_down(settings.redis_url)
            redis = RedisState(settings.redis_url, timeout_s=settings.redis_timeout_s)
            header = {"model": self.checkpoint.name, "model_version": self.checkpoint.version}
            self.sessions = RedisSessions(self.store, redis, header)
        else:
            self.sessions = LocalSessions(self.store)
        self.batcher = MicroBatcher(
            model,
            pool,
            max_batch=settings.max_batch,
            wait_s=settings.batch_wait_ms / 1000,
            persist=self.sessions.persist,
            inline_work=settings.inline_work,
            observer=BatchObserver(
                batch=metrics.BATCH_SESSIONS.observe,
                queue_wait=metrics.QUEUE_WAIT.observe,
                model_time=metrics.MODEL_STEP.observe,
                timesteps=metrics.TIMESTEPS.inc,
            ),
        )
        self.streams = StreamEndpoint(
            StreamLimits(settings.max_streams, settings.stream_idle_s, settings.max_body_bytes),
            step=self._step,
            check_session=self._check_session,
            opened=metrics.STREAMS_OPEN.set,
            refused=lambda code: metrics.STEP_REQUESTS.labels(code).inc(),
        )
        self._sweeper: asyncio.Task[None] | None = None
        metrics.STATE_MEMORY.set(pool.nbytes)
        metrics.SESSIONS_ACTIVE.set(0)
        metrics.STORE_UP.set(1)
        metrics.MODEL_INFO.labels(
            self.checkpoint.name, self.checkpoint.version, str(self.device)
        ).set(1)
        if settings.snapshot_path is not None and not durable:
            self._restore_snapshot(settings.snapshot_path)
        log.info("serving %s:%s on %s", self.checkpoint.name, self.checkpoint.version, self.device)
        tune_gc()

    async def __is_ready__(self) -> bool:
        self._start_sweeper()
        ready = await self.sessions.ready()
        metrics.STORE_UP.set(1 if ready else 0)
        return ready

    # --- sessions ----------------------------------------------------------------------------

    @route("/v1/sessions/create", CreateSession)
    async def create(self, body: CreateSession, /) -> SessionInfo:
        """Open a session at t = 0, with a client-chosen or random id."""
        self._start_sweeper()
        session = await self.sessions.create(body.session_id, body.ttl_s)
        self._count_sessions()
        return self._info(session)

    @route("/v1/sessions/step", Step)
    async def step(self, body: Step, /) -> StepResult:
        """Feed a chunk of T timesteps; get the forecast and anomaly score after each."""
        return StepResult.model_validate(await self._step(body))

    @route("/v1/sessions/step_many", StepMany)
    async def step_many(self, body: StepMany, /) -> StepManyResult:
        """Steps for many sessions in one request, each succeeding or failing on its own.

        Items of one session apply in the order given; different sessions go to the batcher
        together. Results come back in the order of the items. The reply is serialised straight
        from plain data: building a pydantic model per item cost more than the step itself.
        """
        if len(body.items) > settings.max_many:
            raise TooManyItems(
                f"{len(body.items)} items is over the limit of {settings.max_many} (LSTM_MAX_MANY)",
                limit=settings.max_many,
            )
        results: list[dict[str, Any]] = [{}] * len(body.items)
        by_session: dict[str, list[int]] = {}
        for i, item in enumerate(body.items):
            by_session.setdefault(item.session_id, []).append(i)

        tally: Counter[str] = Counter()  # one metrics write per outcome, not per item

        async def one_session(indices: list[int]) -> None:
            for i in indices:
                try:
                    results[i] = {"ok": True, "result": await self._step(body.items[i], tally)}
                except ServiceError as e:
                    results[i] = {"ok": False, "error": e.body()["error"]}

        # The common case, one item for a session nobody else is stepping, skips a coroutine
        # and a task per item: it goes to the batcher straight away (embedded store only; with
        # Redis every item takes the general path, which reconciles stale copies).
        fast: list[int] = []
        general: list[list[int]] = []
        for indices in by_session.values():
            if len(indices) == 1 and settings.redis_url is None:
                fast.append(indices[0])
            else:
                general.append(indices)
        try:
            jobs = self._submit_free(body.items, fast, results, tally, general)
            # Shielded: the fast lane's locks are freed when its steps are done, even if this
            # request is cancelled first; and not after the general path's, or two requests
            # crossing the same sessions would wait on each other.
            await asyncio.gather(
                asyncio.shield(self._finish_jobs(jobs, results, tally)),
                *(one_session(ix) for ix in general),
            )
        finally:
            for outcome, n in tally.items():
                metrics.STEP_REQUESTS.labels(outcome).inc(n)
        return fast_json({"results": results})

    @bentoml.api(route="/v1/ping")
    async def ping(self) -> dict[str, bool]:
        """Does nothing: BentoML's own cost per request, the floor the benchmarks compare with.

        Answers a starlette response (a new one each time: BentoML adds headers to it), so it
        measures the request path alone: a returned dict would add BentoML's output
        serialisation, which the step route does not pay.
        """
        return cast(dict[str, bool], Response(PING_BODY, media_type="application/json"))

    async def _check_session(self, session_id: str) -> None:
        await self.sessions.get(session_id)

    async def _step(self, body: Step, tally: Counter[str] | None = None) -> dict[str, Any]:
        """One step, as its wire reply: the route, step_many and /v1/stream all come here."""
        try:
            x = self._tensor(body.inputs, settings.max_chunk, "LSTM_MAX_CHUNK")
            for attempt in range(STALE_RETRIES):
                session = await self._lock(body.session_id)
                try:
                    # With Redis, a cached copy may lag: doubt it once before refusing a seq.
                    fresh = attempt > 0 or settings.redis_url is None
                    return await self._step_locked(session, body, x, fresh, tally)
                except StaleSession:
                    # Another replica moved this session on: drop the stale copy; the next
                    # round reloads it and checks seq against the fresh t.
                    self.store.drop(session)
                finally:
                    session.release()
            raise StaleSession("the session kept changing under this replica; retry")
        except ServiceError as e:
            count_outcome(e.code, tally)
            raise

    async def _step_locked(
        self,
        session: Session,
        body: Step,
        x: torch.Tensor,
        fresh: bool,
        tally: Counter[str] | None,
    ) -> dict[str, Any]:
        self.store.touch(session)
        replay = self._check_seq(session, body, x, fresh, tally)
        if replay is not None:
            return replay
        done = await self.batcher.step(session, x, return_gates=body.return_gates)
        self.store.touch(session)
        count_outcome("applied", tally)
        return step_reply(session.id, done)

    def _check_seq(
        self,
        session: Session,
        body: Step,
        x: torch.Tensor,
        fresh: bool,
        tally: Counter[str] | None,
    ) -> dict[str, Any] | None:
        """None when the step may apply; the last step's reply again for a retry of it; or
        SeqConflict (StaleSession when a cached copy may be behind)."""
        if body.seq is None or body.seq == session.t:
            return None
        if not fresh:  # the cached copy may lag (or predate a reset): judge by Redis's
            raise StaleSession("seq differs from a cached t: reload and check again")
        last = session.last_step
        if last is not None and body.seq == last.seq and inputs_digest(x) == last.digest:
            metrics.REPLAYS.inc()
            count_outcome("replayed", tally)
            return step_reply(session.id, last.response)
        metrics.SEQ_CONFLICTS.inc()
        raise SeqConflict(
            f"seq {body.seq} does not match the session's t = {session.t}",
            t=session.t,
            seq=body.seq,
        )

    def _submit_free(
        self,
        items: list[Step],
        indices: list[int],
        results: list[dict[str, Any]],
        tally: Counter[str],
        general: list[list[int]],
    ) -> list[tuple[int, Session, asyncio.Future[StepDone]]]:
        """Hand the items whose sessions are free to the batcher without waiting, each under its
        session's lock; answer those refused before the model; pass busy ones to ``general``."""
        jobs = []
        for i in indices:
            item = items[i]
            try:
                x = self._tensor(item.inputs, settings.max_chunk, "LSTM_MAX_CHUNK")  # as _step
                session = self.store.get(item.session_id)
                if not session.try_acquire():
                    general.append([i])  # another request holds it: wait in line
                    continue
                try:
                    self.store.touch(session)
                    replay = self._check_seq(session, item, x, True, tally)
                except BaseException:
                    session.release()
                    raise
                if replay is not None:
                    session.release()
                    results[i] = {"ok": True, "result": replay}
                    continue
                future = self.batcher.submit_step(session, x, return_gates=item.return_gates)
                jobs.append((i, session, future))
            except ServiceError as e:
                count_outcome(e.code, tally)
                results[i] = {"ok": False, "error": e.body()["error"]}
        return jobs

    async def _finish_jobs(
        self,
        jobs: list[tuple[int, Session, asyncio.Future[StepDone]]],
        results: list[dict[str, Any]],
        tally: Counter[str],
    ) -> None:
        """Wait for ``_submit_free``'s jobs, free their sessions, answer them."""
        try:
            if jobs:
                await asyncio.wait([future for _, _, future in jobs])
        finally:
            for _, session, _ in jobs:
                session.release()
        for i, session, future in jobs:
            error = future.exception()
            if isinstance(error, ServiceError):
                count_outcome(error.code, tally)
                results[i] = {"ok": False, "error": error.body()["error"]}
            elif error is not None:
                raise error
            else:
                self.store.touch(session)
                count_outcome("applied", tally)
                results[i] = {"ok": True, "result": step_reply(session.id, future.result())}

    @route("/v1/sessions/forecast", Forecast)
    async def forecast(self, body: Forecast, /) -> ForecastResult:
        """Forecast ``horizon`` future steps from the current state, without changing it."""
        if body.horizon > settings.max_horizon:
            raise HorizonTooLong(
                f"horizon {body.horizon} is over the limit of "
                f"{settings.max_horizon} (LSTM_MAX_HORIZON)",
                limit=settings.max_horizon,
            )
        session = await self._lock(body.session_id, verify=True)
        try:
            if session.t == 0:
                raise NoObservations("the session has seen no value yet: step it first", t=0)
            await self.sessions.touch(session)
            means, stds = await self.batcher.forecast(session, body.horizon)
        finally:
            session.release()
        steps = [ForecastStep(mean=m, std=s) for m, s in zip(means, stds, strict=True)]
        return ForecastResult(session_id=session.id, t=session.t, forecast=steps)

    @route("/v1/sessions/get", SessionRef)
    async def get(self, body: SessionRef, /) -> SessionInfo:
        """A session's t and times."""
        session = await self._lock(body.session_id, verify=True)
        session.release()
        return self._info(session)

    @route("/v1/sessions/reset", SessionRef)
    async def reset(self, body: SessionRef, /) -> SessionInfo:
        """Back to a zero state at t = 0."""
        session = await self._lock(body.session_id)
        try:
            await self.sessions.reset(session)
        finally:
            session.release()
        return self._info(session)

    @route("/v1/sessions/delete", SessionRef)
    async def delete(self, body: SessionRef, /) -> Deleted:
        """Free a session and its state."""
        session = await self._lock(body.session_id)
        try:
            await self.sessions.delete(session)
        finally:
            session.release()
        self._count_sessions()
        return Deleted(session_id=session.id, deleted=True)

    @route("/v1/sessions/export", SessionRef)
    async def export(self, body: SessionRef, /) -> Exported:
        """The session's state as a blob another deployment of the same model can import."""
        session = await self._lock(body.session_id, verify=True)
        try:
            blob = encode(self.store.pool.read(session.slot), self._blob_header(session))
        finally:
            session.release()
        return Exported(
            session_id=session.id,
            t=session.t,
            model=self.checkpoint.name,
            model_version=self.checkpoint.version,
            blob=base64.b64encode(blob).decode(),
        )

    @route("/v1/sessions/import", ImportSession, name="import")
    async def import_(self, body: ImportSession, /) -> SessionInfo:
        """A session restored from an exported blob, continuing where it was."""
        try:
            header, state = decode(base64.b64decode(body.blob, validate=True))
            session_id = body.session_id or header["session_id"]
            t = header["t"]
            if not (isinstance(session_id, str) and re.fullmatch(SESSION_ID_PATTERN, session_id)):
                raise ValueError(f"session id {session_id!r} does not match {SESSION_ID_PATTERN}")
            if not (isinstance(t, int) and t >= 0):
                raise ValueError(f"t must be a non-negative integer, not {t!r}")
            if not all(
                bool(torch.isfinite(a).all())
                for a in (state.h, state.c, state.next_mean, state.next_std)
            ):
                raise ValueError("the state holds NaN or infinite values")
        except (BlobError, binascii.Error, ValueError, KeyError) as e:
            raise BlobCorrupted(f"the blob was refused: {e}") from None
        self._check_blob(header, state)
        session = await self.sessions.restore(session_id, state, t, body.ttl_s)
        self._count_sessions()
        return self._info(session)

    @bentoml.on_shutdown
    def _write_snapshot(self) -> None:
        """At a clean stop, the embedded store's sessions go to disk, to be restored at start."""
        if settings.snapshot_path is None or settings.redis_url is not None:
            return
        sessions = []
        for session in self.store.sessions():
            header = self._blob_header(session)
            recorded = session.recorded_step()
            if recorded is not None:  # a retry right after the restart is answered from it
                header["last_step"] = step_to_json(*recorded)
            sessions.append((header, self.store.pool.read(session.slot)))
        write_snapshot(settings.snapshot_path, sessions)
        log.info("snapshot of %d sessions written to %s", len(sessions), settings.snapshot_path)

    # --- stateless ----------------------------------------------------------------------------

    @route("/v1/predict", Predict)
    async def predict(self, body: Predict, /) -> PredictResult:
        """A whole sequence in, the outputs after every timestep out; no session involved."""
        x = self._tensor(body.inputs, settings.max_predict_len, "LSTM_MAX_PREDICT_LEN")
        out = await self.batcher.predict(x, return_gates=body.return_gates)
        return PredictResult(
            outputs=self._outputs(out.mean, out.std, out.anomaly_z),
            gates=Gates(**out.gates) if out.gates else None,
        )

    @bentoml.api(route="/v1/model")
    def model(self) -> ModelCard:
        """The model card: what is served, how it was trained, how it compares with baselines."""
        return self.card()

    @functools.cached_property
    def openapi_json(self) -> bytes:
        """The OpenAPI document of this deployment: its model's width, its limits."""
        deployment = Deployment(
            n_features=self.n_features,
            max_chunk=settings.max_chunk,
            max_predict_len=settings.max_predict_len,
            max_many=settings.max_many,
            max_horizon=settings.max_horizon,
            max_session_ttl_s=settings.max_session_ttl_s,
            max_body_bytes=settings.max_body_bytes,
        )
        return orjson.dumps(openapi_document(package_version(), deployment))

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
            limits=Limits(
                max_chunk=settings.max_chunk,
                max_horizon=settings.max_horizon,
                max_predict_len=settings.max_predict_len,
                max_many=settings.max_many,
                max_sessions=settings.max_sessions,
                max_body_bytes=settings.max_body_bytes,
                session_ttl_s=settings.session_ttl_s,
                max_session_ttl_s=settings.max_session_ttl_s,
                max_abs_value=VALUE_CEILING,
                max_seq=SEQ_CEILING,
            ),
        )

    # --- helpers -------------------------------------------------------------------------------

    def _blob_header(self, session: Session) -> dict[str, Any]:
        return {
            "model": self.checkpoint.name,
            "model_version": self.checkpoint.version,
            "session_id": session.id,
            "t": session.t,
            "created_at": session.created_at,
            "last_active": session.last_active,
            "ttl_s": session.ttl_s,
        }

    def _check_blob(self, header: dict[str, Any], state: SessionState) -> None:
        ours = (self.checkpoint.name, self.checkpoint.version)
        theirs = (header.get("model"), header.get("model_version"))
        if theirs != ours:
            raise ModelMismatch(
                f"the blob belongs to {theirs[0]}:{theirs[1]}; this service "
                f"runs {ours[0]}:{ours[1]}",
                model=ours[0],
                model_version=ours[1],
            )
        pool = self.store.pool
        expected = (tuple(pool.h.shape[::2]), pool.next_mean.shape[1])
        if (tuple(state.h.shape), state.next_mean.shape[0]) != expected:
            raise BlobCorrupted("the blob's shapes do not match the model's")

    def _restore_snapshot(self, path: Path) -> None:
        if not path.exists():
            return
        try:
            # Oldest first: the store keeps sessions in order of activity.
            entries = sorted(read_snapshot(path), key=lambda e: float(e[0]["last_active"]))
            now = time.time()
            restored = 0
            for header, state in entries:
                self._check_blob(header, state)
                if header["last_active"] + header["ttl_s"] <= now:
                    continue  # expired while the service was down
                session = self.store.restore(
                    header["session_id"],
                    state,
                    t=int(header["t"]),
                    ttl_s=header["ttl_s"],
                    created_at=header["created_at"],
                )
                session.last_active = header["last_active"]
                if header.get("last_step") is not None:
                    step, at = step_from_json(header["last_step"])
                    if at + settings.replay_window_s > now:  # else the sweep would drop it
                        session.restore_step(step, at)
                restored += 1
            log.info("restored %d of %d sessions from %s", restored, len(entries), path)
        except (BlobError, ServiceError, KeyError, TypeError, ValueError) as e:
            rejected = path.with_name(path.name + ".rejected")
            path.replace(rejected)
            log.error("snapshot %s not restored (%s); kept as %s", path, e, rejected)
            return
        path.unlink()  # restored: a later crash must not roll sessions back to it
        self._count_sessions()

    async def _lock(self, session_id: str, *, verify: bool = False) -> Session:
        """The session with its lock acquired, in arrival order.

        If the copy waited on went away meanwhile (deleted, expired, or dropped as stale in favour
        of Redis's), look the id up again: that answers 404 or yields the current copy.
        """
        while True:
            session = await self.sessions.get(session_id)
            await session.acquire()
            if self.store.peek(session_id) is not session:
                session.release()
                continue
            if not verify:
                return session
            try:
                fresh = await self.sessions.current(session)
            except BaseException:  # Redis down (503) or the request cancelled: never keep it
                session.release()
                raise
            if fresh:
                return session
            # Redis moved on (another replica stepped or reset it): drop the copy while we hold
            # it, so nobody is using it, and load the current one.
            self.store.drop(session)
            session.release()

    def _tensor(self, rows: list[list[float]], limit: int, setting: str) -> torch.Tensor:
        if len(rows) > limit:
            raise ChunkTooLong(
                f"{len(rows)} timesteps is over the limit of {limit} ({setting})", limit=limit
            )
        for k, row in enumerate(rows):
            if len(row) != self.n_features:
                raise WrongFeatureCount(
                    f"inputs[{k}] has {len(row)} values; the model takes {self.n_features} "
                    f"features per timestep",
                    expected=self.n_features,
                    got=len(row),
                )
        return torch.from_numpy(np.array(rows, dtype=np.float32))

    def _info(self, session: Session) -> SessionInfo:
        return SessionInfo(
            session_id=session.id,
            model=self.checkpoint.name,
            model_version=self.checkpoint.version,
            t=session.t,
            created_at=_iso(session.created_at),
            last_active_at=_iso(session.last_active),
            expires_at=_iso(session.expires_at),
            ttl_s=session.ttl_s,
        )

    @staticmethod
    def _outputs(
        mean: list[list[float]], std: list[list[float]], anomaly: list[list[float] | None]
    ) -> list[StepOutput]:
        return [
            StepOutput(mean=m, std=s, anomaly_z=z)
            for m, s, z in zip(mean, std, anomaly, strict=True)
        ]

    def _count_sessions(self) -> None:
        metrics.SESSIONS_ACTIVE.set(len(self.store))

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(settings.sweep_interval_s)
            if self.store.sweep():
                self._count_sessions()
            metrics.STORE_UP.set(1 if await self.sessions.ready() else 0)


def count_refused_step(path: str, code: str) -> None:
    """Steps refused before the handler ran (schema, body limit) count by their code too."""
    if path == "/v1/sessions/step":
        metrics.STEP_REQUESTS.labels(code).inc()


cast(Any, LSTMSessions).add_asgi_middleware(
    ErrorContract,
    max_body_bytes=settings.max_body_bytes,
    openapi=lambda: cast(LSTMSessions, bentoml.get_current_service()).openapi_json,
    allowed=ALLOWED,
    refused_at_edge=count_refused_step,
)
RequestDeadline.install()
RefusalTracebacks.install()
connections.install(
    connections.fit_to_fd_limit(
        settings.max_connections,
        settings.header_timeout_s,
        settings.max_header_bytes,
        settings.keep_alive_s,
    )
)
