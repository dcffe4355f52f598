"""The session engine: the product's rules, with no web framework in sight.

Step, step_many, forecast, get, reset, delete, export, import and predict, the ``seq`` and
exactly-once rules, over a ``Backend`` (``service.backends``: the embedded store, or Redis with
this process as a cache) and the micro-batcher.
It returns plain data (a step's reply is JSON-ready; a session is a ``SessionView``) and raises
the typed errors of ``service.errors``; ``service.service`` turns requests into these calls and
errors into responses. It is built with its limits and collaborators, and reads no settings.

Every operation on a session holds that session's lock for its whole length, through one
construct: ``async with engine.locked(session_id) as session``. The only other holder is
step_many's fast lane, which takes free sessions' locks without waiting and frees them in one
``finally`` once the request's block of steps is done (``_submit_free`` / ``_finish_jobs``).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.backends import Backend
from service.batcher import MicroBatcher, StepJob, inputs_digest
from service.errors import (
    BlobCorrupted,
    BlobSignatureInvalid,
    ChunkTooLong,
    HorizonTooLong,
    NoObservations,
    SeqConflict,
    ServiceError,
    StaleSession,
    TooManyItems,
    WrongFeatureCount,
)
from service.results import ForecastOutputs, Outputs, StepDone
from service.schemas import DEFAULT_PATHS, SESSION_ID_PATTERN, VALUE_CEILING, Step
from service.sessions import Session, public_id
from service.state_blob import (
    BlobError,
    SessionState,
    SignatureError,
    check_blob,
    decode,
    encode,
)


@dataclass(frozen=True)
class EngineLimits:
    max_chunk: int  # timesteps per step (LSTM_MAX_CHUNK)
    max_predict_len: int  # timesteps per predict (LSTM_MAX_PREDICT_LEN)
    max_many: int  # items per step_many (LSTM_MAX_MANY)
    max_horizon: int  # forecast steps (LSTM_MAX_HORIZON)
    stale_retries: int = 3  # reload-and-recompute rounds before a contended step gives up


@dataclass
class EngineEvents:
    """Callbacks for metrics; the engine knows nothing of Prometheus."""

    step_outcome: Callable[[str], None] = lambda outcome: None  # one step's: applied, ..., a code
    step_outcomes: Callable[[Counter[str]], None] = lambda tally: None  # step_many's, counted
    replayed: Callable[[], None] = lambda: None
    seq_conflict: Callable[[], None] = lambda: None
    sessions: Callable[[int], None] = lambda held: None  # sessions held, after a change


@dataclass(frozen=True)
class SessionView:
    """A session's public facts, read under its lock."""

    session_id: str
    t: int
    created_at: float
    last_active: float
    expires_at: float
    ttl_s: float
    model: tuple[str, str]  # (name, version) of the model the session is on

    @classmethod
    def of(cls, session: Session, model: tuple[str, str]) -> SessionView:
        return cls(
            session.id,
            session.t,
            session.created_at,
            session.last_active,
            session.expires_at,
            session.ttl_s,
            model,
        )


@dataclass(frozen=True)
class ForecastView:
    session_id: str
    t: int
    means: list[list[float]]  # (horizon, F)
    stds: list[list[float]]
    p10: list[list[float]]
    p50: list[list[float]]
    p90: list[list[float]]
    paths: int
    seed: int


def step_reply(session_id: str, done: StepDone, model_version: str) -> dict[str, Any]:
    """A step's reply as plain JSON-ready data, shaped as the StepResult schema: the one builder
    for every transport (HTTP, step_many, the stream) and for replays."""
    out = done.outputs
    return {
        "session_id": session_id,
        "model_version": model_version,
        "t": done.t,
        "outputs": [
            {"mean": m, "std": s, "anomaly_z": z}
            for m, s, z in zip(out.mean, out.std, out.anomaly_z, strict=True)
        ],
        "gates": out.gates,
    }


@dataclass
class _Tally:
    """Step outcomes of one request, reported once (a metric write per item cost more than the
    item's bookkeeping)."""

    counts: Counter[str] = field(default_factory=Counter)

    def __call__(self, outcome: str) -> None:
        self.counts[outcome] += 1


class Locked:
    """What ``Engine.locked`` returns: a class, not a generator-based context manager, because
    every step enters one (the generator's machinery cost more than the lock)."""

    __slots__ = ("engine", "session", "session_id", "verify")

    def __init__(self, engine: Engine, session_id: str, verify: bool) -> None:
        self.engine, self.session_id, self.verify = engine, session_id, verify

    async def __aenter__(self) -> Session:
        self.session = await self.engine._acquire(self.session_id, self.verify)
        return self.session

    async def __aexit__(self, *exc: object) -> None:
        self.session.release()


class Engine:
    def __init__(
        self,
        backend: Backend,
        batcher: MicroBatcher,
        *,
        model: tuple[str, str],
        n_features: int,
        limits: EngineLimits,
        events: EngineEvents | None = None,
        blob_key: bytes | None = None,
    ) -> None:
        self.backend = backend
        self.blob_key = blob_key  # LSTM_BLOB_KEY: exports are signed with it, imports need it
        self.store = backend.store
        self.batcher = batcher
        self.model = model  # (name, version): what blobs are bound to
        self.n_features = n_features
        self.limits = limits
        self.events = events or EngineEvents()
        # What no forecast of the model goes beyond from inputs the schema accepts (check_blob).
        self.forecast_bounds = batcher.runner.model.forecast_bounds(VALUE_CEILING)

    # --- the one way to hold a session -------------------------------------------------------

    def locked(self, session_id: str, *, verify: bool = False) -> Locked:
        """``async with engine.locked(id) as session``: the session, its lock held (granted in
        arrival order) until the block ends, however it ends. ``verify``: with a backend that
        caches (Redis), check the cached copy is the current one first, reloading it if not."""
        return Locked(self, session_id, verify)

    async def _acquire(self, session_id: str, verify: bool) -> Session:
        # If the copy waited on went away meanwhile (deleted, expired, or dropped as stale in
        # favour of Redis's), look the id up again: that answers 404 or yields the current copy.
        while True:
            session = await self.backend.get(session_id)
            await session.acquire()
            if self.store.peek(session_id) is not session:
                session.release()
                continue
            if not verify or self.backend.authoritative:
                return session
            try:
                fresh = await self.backend.current(session)
            except BaseException:  # Redis down (503) or the request cancelled: never keep it
                session.release()
                raise
            if fresh:
                return session
            # Redis moved on (another replica stepped or reset it): drop the copy while we hold
            # it, so nobody is using it, and load the current one.
            self.store.drop(session)
            session.release()

    # --- sessions ----------------------------------------------------------------------------

    async def create(self, session_id: str | None, ttl_s: float | None) -> SessionView:
        session = await self.backend.create(session_id, ttl_s)
        self.events.sessions(len(self.store))
        return SessionView.of(session, self.model)

    async def check(self, session_id: str) -> None:
        """Raises the store's 404 when the session is gone (a stream's check at connect)."""
        await self.backend.get(session_id)

    async def get(self, session_id: str) -> SessionView:
        async with self.locked(session_id, verify=True) as session:
            return SessionView.of(session, self.model)

    async def reset(self, session_id: str) -> SessionView:
        async with self.locked(session_id) as session:
            await self.backend.reset(session)
            return SessionView.of(session, self.model)

    async def delete(self, session_id: str) -> str:
        async with self.locked(session_id) as session:
            await self.backend.delete(session)
        self.events.sessions(len(self.store))
        return session_id

    async def forecast(
        self, session_id: str, horizon: int, *, paths: int = DEFAULT_PATHS, seed: int = 0
    ) -> ForecastView:
        """``horizon`` future steps from ``paths`` futures sampled with ``seed``; the session
        is unchanged."""
        if horizon > self.limits.max_horizon:
            raise HorizonTooLong(
                f"horizon {horizon} is over the limit of {self.limits.max_horizon} "
                f"(LSTM_MAX_HORIZON)",
                limit=self.limits.max_horizon,
            )
        async with self.locked(session_id, verify=True) as session:
            if session.t == 0:
                raise NoObservations("the session has seen no value yet: step it first", t=0)
            await self.backend.touch(session)
            f: ForecastOutputs = await self.batcher.forecast(
                session, horizon, paths=paths, seed=seed
            )
            return ForecastView(
                session.id, session.t, f.means, f.stds, f.p10, f.p50, f.p90, paths, seed
            )

    async def export(self, session_id: str) -> tuple[SessionView, bytes]:
        """The session and its state as a blob bound to this model version."""
        async with self.locked(session_id, verify=True) as session:
            state = self.store.pool.read(session.slot)
            # The client's id, not the store's: a tenant's blob does not carry its namespace.
            header = {**self.blob_header(session), "session_id": public_id(session.id)}
            blob = encode(state, header, self.blob_key)
            return SessionView.of(session, self.model), blob

    async def import_blob(
        self, blob: bytes, session_id: str | None, ttl_s: float | None, namespace: str = ""
    ) -> SessionView:
        """A session continuing where an exported one was (under ``session_id``, default the
        exported id, in ``namespace``: a tenant's, service/tenants.py); nothing created if the
        blob is not one of this model's (ModelMismatch), is
        damaged (BlobCorrupted), not signed with this deployment's key (BlobSignatureInvalid), or
        holds what no session of this model can (BlobOutOfRange)."""
        try:
            header, state = decode(blob, self.blob_key)
            session_id = session_id or header["session_id"]
            t = header["t"]
            if not (isinstance(session_id, str) and re.fullmatch(SESSION_ID_PATTERN, session_id)):
                raise ValueError(f"session id {session_id!r} does not match {SESSION_ID_PATTERN}")
        except SignatureError as e:
            raise BlobSignatureInvalid(f"the blob was refused: {e}") from None
        except (BlobError, ValueError, KeyError) as e:
            raise BlobCorrupted(f"the blob was refused: {e}") from None
        self.check_blob(header, state)
        session = await self.backend.restore(namespace + session_id, state, t, ttl_s)
        self.events.sessions(len(self.store))
        return SessionView.of(session, self.model)

    def blob_header(self, session: Session) -> dict[str, Any]:
        """What a session's blob says of it (export, snapshot)."""
        return {
            "model": self.model[0],
            "model_version": self.model[1],
            "session_id": session.id,
            "t": session.t,
            "created_at": session.created_at,
            "last_active": session.last_active,
            "ttl_s": session.ttl_s,
        }

    def check_blob(self, header: dict[str, Any], state: SessionState) -> None:
        pool = self.store.pool
        check_blob(
            header,
            state,
            self.model,
            (pool.h.shape[0], pool.h.shape[2]),
            self.n_features,
            pool.stats_width,
            pool.stats_decay,
            bounds=self.forecast_bounds,
        )

    # --- steps -------------------------------------------------------------------------------

    def inputs(self, rows: list[list[float]], limit: int, setting: str) -> np.ndarray:
        """A chunk as a (T, F) float32 array, or the error for a chunk too long or too wide."""
        self.check_inputs(rows, limit, setting)
        return np.array(rows, dtype=np.float32)

    def check_inputs(self, rows: list[list[float]], limit: int, setting: str) -> None:
        """The error for a chunk too long or too wide, if it is."""
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

    async def predict(self, rows: list[list[float]], return_gates: bool) -> Outputs:
        x = self.inputs(rows, self.limits.max_predict_len, "LSTM_MAX_PREDICT_LEN")
        return await self.batcher.predict(torch.from_numpy(x), return_gates=return_gates)

    async def step(self, body: Step) -> dict[str, Any]:
        """One step, as its wire reply: the HTTP route and the stream come here."""
        return await self._step(body, self.events.step_outcome)

    async def _step(self, body: Step, count: Callable[[str], None]) -> dict[str, Any]:
        try:
            x = self.inputs(body.inputs, self.limits.max_chunk, "LSTM_MAX_CHUNK")
            for attempt in range(self.limits.stale_retries):
                async with self.locked(body.session_id) as session:
                    # A cached copy may lag: doubt it once before refusing a seq.
                    fresh = attempt > 0 or self.backend.authoritative
                    try:
                        self.store.touch(session)
                        replay = self._check_seq(session, body, x, fresh, count)
                        if replay is not None:
                            return replay
                        done = await self.batcher.step(session, x, return_gates=body.return_gates)
                    except StaleSession:
                        # Another replica moved this session on: drop the stale copy while we
                        # hold it; the next round reloads it and checks seq against the fresh t.
                        self.store.drop(session)
                        continue
                    self.store.touch(session)
                    count("applied")
                    return step_reply(session.id, done, self.model[1])
            raise StaleSession("the session kept changing under this replica; retry")
        except ServiceError as e:
            count(e.code)
            raise

    def _check_seq(
        self,
        session: Session,
        body: Step,
        x: np.ndarray | None,
        fresh: bool,
        count: Callable[[str], None],
    ) -> dict[str, Any] | None:
        """None when the step may apply; the last step's reply again for a retry of it; or
        SeqConflict (StaleSession when a cached copy may be behind). ``x``: the chunk, or None
        to make it from ``body`` if a retry's inputs are to be compared."""
        if body.seq is None or body.seq == session.t:
            return None
        if not fresh:  # the cached copy may lag (or predate a reset): judge by the truth's
            raise StaleSession("seq differs from a cached t: reload and check again")
        last = session.last_step
        if last is not None and body.seq == last.seq and self._same_inputs(body, x, last.digest):
            self.events.replayed()
            count("replayed")
            reply = step_reply(session.id, last.response, self.model[1])
            if not body.return_gates:  # the retry's own return_gates decides (issue: ignored)
                reply["gates"] = None
            return reply
        self.events.seq_conflict()
        raise SeqConflict(
            f"seq {body.seq} does not match the session's t = {session.t}",
            t=session.t,
            seq=body.seq,
        )

    @staticmethod
    def _same_inputs(body: Step, x: np.ndarray | None, digest: bytes) -> bool:
        return inputs_digest(np.array(body.inputs, np.float32) if x is None else x) == digest

    async def step_many(self, items: list[Step]) -> list[dict[str, Any]]:
        """Steps of many sessions, each ``{"ok": true, "result"}`` or ``{"ok": false, "error"}``,
        in the items' order; items of one session apply in the order given."""
        if len(items) > self.limits.max_many:
            raise TooManyItems(
                f"{len(items)} items is over the limit of {self.limits.max_many} (LSTM_MAX_MANY)",
                limit=self.limits.max_many,
            )
        results: list[dict[str, Any]] = [{}] * len(items)
        by_session: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_session.setdefault(item.session_id, []).append(i)
        tally = _Tally()  # the general path's; the fast lane reports its own when it is done

        async def one_session(indices: list[int]) -> None:
            for i in indices:
                try:
                    results[i] = {"ok": True, "result": await self._step(items[i], tally)}
                except ServiceError as e:
                    results[i] = {"ok": False, "error": e.body()["error"]}

        # The common case, one item for a session nobody else is stepping, skips a coroutine
        # and a task per item: it goes to the batcher straight away (an authoritative store
        # only; with a cache of Redis every item takes the general path, which reconciles stale
        # copies).
        fast: list[int] = []
        general: list[list[int]] = []
        for indices in by_session.values():
            if len(indices) == 1 and self.backend.authoritative:
                fast.append(indices[0])
            else:
                general.append(indices)
        try:
            fast_tally = _Tally()
            order, jobs, future = self._submit_free(items, fast, results, fast_tally, general)
            # Shielded: the fast lane's locks are freed (and its outcomes counted) when its steps
            # are done, even if this request is cancelled first; and not after the general
            # path's, or two requests crossing the same sessions would wait on each other.
            await asyncio.gather(
                asyncio.shield(self._finish_jobs(order, jobs, future, results, fast_tally)),
                *(one_session(ix) for ix in general),
            )
        finally:
            self.events.step_outcomes(tally.counts)
        return results

    def _submit_free(
        self,
        items: list[Step],
        indices: list[int],
        results: list[dict[str, Any]],
        count: Callable[[str], None],
        general: list[list[int]],
    ) -> tuple[list[int], list[StepJob], asyncio.Future[list[Any]] | None]:
        """Hand the items whose sessions are free to the batcher without waiting, as one block,
        each under its session's lock; answer those refused before the model (and all of them
        if the batcher refuses the block: it is stopping); pass busy ones to ``general``. The
        chunks of one length become one array, each step's chunk a row of it. A session is
        touched once, when its step is handed over (it is held until the step is done)."""
        limit = self.limits.max_chunk
        held: list[tuple[int, Session]] = []
        try:
            for i in indices:
                item = items[i]
                try:
                    self.check_inputs(item.inputs, limit, "LSTM_MAX_CHUNK")
                    session = self.store.get(item.session_id)
                    if not session.try_acquire():
                        general.append([i])  # another request holds it: wait in line
                        continue
                    try:
                        self.store.touch(session)
                        replay = self._check_seq(session, item, None, True, count)
                    except BaseException:
                        session.release()
                        raise
                    if replay is not None:
                        session.release()
                        results[i] = {"ok": True, "result": replay}
                        continue
                    held.append((i, session))  # its lock is freed by _finish_jobs
                except ServiceError as e:
                    count(e.code)
                    results[i] = {"ok": False, "error": e.body()["error"]}
            if not held:
                return [], [], None
            order, jobs = self._block_jobs(items, held)
            return order, jobs, self.batcher.submit_steps(jobs)
        except ServiceError as e:  # the batcher refused the block (shutting_down)
            for i, session in held:
                session.release()
                count(e.code)
                results[i] = {"ok": False, "error": e.body()["error"]}
            return [], [], None
        except BaseException:
            for _, session in held:
                session.release()
            raise

    @staticmethod
    def _block_jobs(
        items: list[Step], held: list[tuple[int, Session]]
    ) -> tuple[list[int], list[StepJob]]:
        """The held items' step jobs, chunks of one length made as one array; with the items'
        places in the request, in the jobs' order."""
        by_length: dict[int, list[tuple[int, Session]]] = {}
        for i, session in held:
            by_length.setdefault(len(items[i].inputs), []).append((i, session))
        order, jobs = [], []
        for same in by_length.values():
            chunks = np.array([items[i].inputs for i, _ in same], dtype=np.float32)  # (B, T, F)
            for (i, session), x in zip(same, chunks, strict=True):
                order.append(i)
                jobs.append(StepJob(session, x, inputs_digest(x), items[i].return_gates))
        return order, jobs

    async def _finish_jobs(
        self,
        order: list[int],
        jobs: list[StepJob],
        future: asyncio.Future[list[Any]] | None,
        results: list[dict[str, Any]],
        tally: _Tally,
    ) -> None:
        """Wait for ``_submit_free``'s block, free its sessions, answer its items, report the
        fast lane's outcomes (here: a cancelled request's finally comes before they are known)."""
        outcomes: list[Any] = []
        try:
            if future is not None:
                await asyncio.wait([future])
                outcomes = future.result()
        finally:
            for job in jobs:
                job.session.release()
        try:
            self._answer_jobs(order, jobs, outcomes, results, tally)
        finally:
            self.events.step_outcomes(tally.counts)

    def _answer_jobs(
        self,
        order: list[int],
        jobs: list[StepJob],
        outcomes: list[Any],
        results: list[dict[str, Any]],
        count: Callable[[str], None],
    ) -> None:
        version = self.model[1]
        for i, job, outcome in zip(order, jobs, outcomes, strict=True):
            if isinstance(outcome, ServiceError):
                count(outcome.code)
                results[i] = {"ok": False, "error": outcome.body()["error"]}
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                count("applied")
                results[i] = {"ok": True, "result": step_reply(job.session.id, outcome, version)}
