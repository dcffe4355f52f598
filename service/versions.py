"""Several model versions served at once: one *active* for new sessions, every other session on
the version it was created on until it is migrated.

Each loaded version is a whole ``Engine`` of its own (its model, state pool, session store and
micro-batcher: states of different versions may differ in shape, and a batch mixes no versions).
``Versions`` stands in front of them with the engine's session calls: a call on an existing
session goes to the version whose store holds it (or remembers it: an expired session answers
``session_expired`` from its own version), anything new to the active one. An id is unique across
versions: a create of an id another version holds answers ``session_exists``.

Admin calls (``load``, ``activate``, ``unload``, ``models``) change which versions are held; the
framework's routes for them sit under ``/v1/admin/``, behind the admin role when API keys are on
(service/auth.py). Loading builds a version in a thread (its weights read from BentoML's store),
so traffic on the loop keeps flowing meanwhile. A version with sessions on it cannot be unloaded
(``409 model_version_in_use``), nor can the active one (``409 model_version_active``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from service.engine import Engine, ForecastView, SessionView
from service.errors import (
    BlobOutOfRange,
    MigrationImpossible,
    ModelMismatch,
    ServiceError,
    SessionExists,
    SessionGone,
    SessionOnOtherVersion,
    TooManyItems,
    VersionActive,
    VersionInUse,
    VersionNotLoaded,
)
from service.results import Outputs
from service.schemas import DEFAULT_PATHS, VALUE_CEILING, Step
from service.sessions import public_id
from service.state_blob import BlobError, decode, encode

log = logging.getLogger("lstm_sessions.versions")


@dataclass(eq=False)
class Version:
    """A loaded model version: its tag (``name:version``) and its engine."""

    tag: str
    engine: Engine
    device: str
    loaded_at: float = field(default_factory=time.time)
    close: Callable[[], Awaitable[None]] = field(default=lambda: _nothing())

    @property
    def sessions(self) -> int:
        return len(self.engine.store)


async def _nothing() -> None:
    return None


T = TypeVar("T")
GONE_CODES = {"session_not_found", "session_expired", "session_evicted"}
MIGRATE_BATCH = 64  # sessions migrated at once by activate(..., "now"): one batcher round's worth


@dataclass
class VersionEvents:
    """Callbacks for metrics: a migration's outcome ("migrated" or the error code) and time."""

    migrated: Callable[[str, float], None] = lambda outcome, seconds: None
    sessions: Callable[[], None] = lambda: None  # sessions moved between versions


Loader = Callable[[str], Version]  # a tag -> its version, built (blocking: run in a thread)


class Versions:
    """The session calls of ``Engine``, over every loaded version; and the admin calls."""

    def __init__(self, first: Version, loader: Loader, events: VersionEvents | None = None) -> None:
        self.loader = loader
        self.events = events or VersionEvents()
        self.held: dict[str, Version] = {first.tag: first}
        self.active = first
        self.lazy = False  # activate(..., "on_next_step"): a call migrates its session first
        self.background: asyncio.Task[None] | None = None  # activate(..., "now")'s migrations
        self._changing = asyncio.Lock()  # one load/activate/unload at a time

    # --- which version ------------------------------------------------------------------------

    def of(self, session_id: str) -> Engine:
        """The engine of the version that holds the session (or, gone, remembers it); else the
        active one."""
        active = self.active.engine
        if len(self.held) == 1 or active.store.peek(session_id) is not None:
            return active
        for version in self.held.values():
            if version.engine.store.peek(session_id) is not None:
                return version.engine
        for version in self.held.values():
            if version.engine.store.knows(session_id):
                return version.engine
        return active

    def _live(self, session_id: str) -> Engine | None:
        for version in self.held.values():
            if version.engine.store.peek(session_id) is not None:
                return version.engine
        return None

    @property
    def model(self) -> tuple[str, str]:
        return self.active.engine.model

    def total_sessions(self) -> int:
        return sum(v.sessions for v in self.held.values())

    # --- the session calls --------------------------------------------------------------------

    async def create(self, session_id: str | None, ttl_s: float | None) -> SessionView:
        if session_id is not None and len(self.held) > 1:
            holder = self.of(session_id)
            if holder is not self.active.engine and holder.store.peek(session_id) is not None:
                raise SessionExists(f"session {session_id!r} already exists", session_id=session_id)
        return await self.active.engine.create(session_id, ttl_s)

    async def _on(self, session_id: str, call: Callable[[Engine], Awaitable[T]]) -> T:
        """``call`` on the session's version (after migrating it, when activate asked for
        ``on_next_step``). With Redis a session this replica has not cached is found on the
        version it was stored by (``SessionOnOtherVersion``); a call that waited while its
        session migrated follows it to its new version."""
        engine = self.of(session_id)
        if self.lazy and engine is not self.active.engine and engine.store.peek(session_id):
            try:
                await self._migrate(engine, self.active.engine, session_id, quiet=True)
                engine = self.active.engine
            except MigrationImpossible:
                pass  # it stays where it is, and is served there
        try:
            return await call(engine)
        except SessionOnOtherVersion as e:
            for version in self.held.values():
                if version.engine.model == e.model:
                    return await call(version.engine)
            raise
        except SessionGone:
            moved = self._live(session_id)
            if moved is None or moved is engine:
                raise
            return await call(moved)

    async def check(self, session_id: str) -> None:
        await self._on(session_id, lambda engine: engine.check(session_id))

    async def get(self, session_id: str) -> SessionView:
        return await self._on(session_id, lambda engine: engine.get(session_id))

    async def reset(self, session_id: str) -> SessionView:
        return await self._on(session_id, lambda engine: engine.reset(session_id))

    async def delete(self, session_id: str) -> str:
        return await self._on(session_id, lambda engine: engine.delete(session_id))

    async def forecast(
        self, session_id: str, horizon: int, *, paths: int = DEFAULT_PATHS, seed: int = 0
    ) -> ForecastView:
        return await self._on(
            session_id,
            lambda engine: engine.forecast(session_id, horizon, paths=paths, seed=seed),
        )

    async def export(self, session_id: str) -> tuple[SessionView, bytes]:
        return await self._on(session_id, lambda engine: engine.export(session_id))

    async def import_blob(
        self, blob: bytes, session_id: str | None, ttl_s: float | None, namespace: str = ""
    ) -> SessionView:
        """Into the version the blob belongs to, when it is loaded; a blob of a version not
        loaded migrates into the active one by replaying its window (``migration_impossible``
        when it has none, or other features)."""
        target = self.active.engine
        try:
            header, state = decode(blob, target.blob_key)
        except BlobError:  # the engine's own decode answers the refusal
            return await target.import_blob(blob, session_id, ttl_s, namespace)
        theirs = (header.get("model"), header.get("model_version"))
        own = next((v.engine for v in self.held.values() if v.engine.model == theirs), None)
        # An id is one session across versions: one taken on another version is taken (the
        # version imported into answers for its own, after checking the blob).
        wanted = session_id or header.get("session_id")
        if isinstance(wanted, str):
            live = self._live(namespace + public_id(wanted))
            if live is not None and live is not (own or target):
                raise SessionExists(
                    f"session {public_id(wanted)!r} already exists",
                    session_id=namespace + public_id(wanted),
                )
        if own is not None:
            return await own.import_blob(blob, session_id, ttl_s, namespace)
        if theirs[0] != target.model[0]:  # another model altogether: model_mismatch
            return await target.import_blob(blob, session_id, ttl_s, namespace)
        t = header.get("t")
        if state.next_mean.shape[0] != target.n_features:
            raise MigrationImpossible(
                f"the blob is of {theirs[0]}:{theirs[1]} with {state.next_mean.shape[0]} "
                f"features; {target.model[0]}:{target.model[1]} takes {target.n_features}"
            )
        if not (type(t) is int and t >= 0) or (t > 0 and state.window_rows() == 0):
            raise MigrationImpossible(
                f"the blob is of {theirs[0]}:{theirs[1]}, which is not loaded, and keeps no "
                f"inputs to replay through {target.model[0]}:{target.model[1]}"
            )
        window = state.window
        if window is not None:
            if not (
                bool(torch.isfinite(window).all()) and float(window.abs().max()) <= VALUE_CEILING
            ):
                raise BlobOutOfRange(
                    f"the blob was refused: a window value beyond {VALUE_CEILING:g}"
                )
            keep = target.store.pool.window or window.shape[0]
            if window.shape[0] < min(t, keep):
                raise MigrationImpossible(
                    f"the blob of {theirs[0]}:{theirs[1]} kept {window.shape[0]} of its last "
                    f"{min(t, keep)} inputs: too few to replay through "
                    f"{target.model[0]}:{target.model[1]}"
                )
            window = window[-keep:]  # no more than this deployment keeps
        started = time.perf_counter()
        replayed = (
            await target.batcher.burn_in(window)
            if window is not None
            else target.store.pool.zero_state()
        )
        # Re-encoded as the active version's own blob (signed with this deployment's key, the
        # original having passed it), so every check of an import still runs on the result.
        mine = {**header, "model": target.model[0], "model_version": target.model[1]}
        migrated = encode(replayed, mine, target.blob_key)
        view = await target.import_blob(migrated, session_id, ttl_s, namespace)
        self.events.migrated("migrated", time.perf_counter() - started)
        return view

    async def step(self, body: Step) -> dict[str, Any]:
        if len(self.held) == 1:  # the common case: no closure per step
            return await self.active.engine.step(body)
        return await self._on(body.session_id, lambda engine: engine.step(body))

    async def step_many(self, items: list[Step]) -> list[dict[str, Any]]:
        if len(self.held) == 1:
            return await self.active.engine.step_many(items)
        limit = self.active.engine.limits.max_many
        if len(items) > limit:  # the request's limit, before it is split by version
            raise TooManyItems(
                f"{len(items)} items is over the limit of {limit} (LSTM_MAX_MANY)", limit=limit
            )
        if self.lazy:
            ids = {item.session_id for item in items}
            await asyncio.gather(
                *(self._migrate_if_behind(sid) for sid in ids), return_exceptions=True
            )
        by_engine: dict[int, tuple[Engine, list[int]]] = {}
        sent_to: list[Engine] = []
        for i, item in enumerate(items):
            engine = self.of(item.session_id)
            by_engine.setdefault(id(engine), (engine, []))[1].append(i)
            sent_to.append(engine)
        results: list[dict[str, Any]] = [{}] * len(items)

        async def one(engine: Engine, indices: list[int]) -> None:
            for i, result in zip(
                indices, await engine.step_many([items[i] for i in indices]), strict=True
            ):
                results[i] = result

        await asyncio.gather(*(one(engine, ix) for engine, ix in by_engine.values()))
        # An item that waited on a session while it migrated found it gone from the version it
        # was sent to: it follows the session, as a single step does (in order, per session).
        moved = [
            i
            for i, r in enumerate(results)
            if not r["ok"]
            and r["error"]["code"] in GONE_CODES
            and self._live(items[i].session_id) not in (None, sent_to[i])
        ]
        for i in moved:
            try:
                results[i] = {"ok": True, "result": await self.step(items[i])}
            except ServiceError as e:
                results[i] = {"ok": False, "error": e.body()["error"]}
        return results

    async def predict(self, rows: list[list[float]], return_gates: bool) -> Outputs:
        return await self.active.engine.predict(rows, return_gates)

    # --- migration ------------------------------------------------------------------------------

    async def migrate(self, session_id: str, to: str | None = None) -> SessionView:
        """Move a session to version ``to`` (default: the active one) by replaying its kept
        inputs through it; ``t``, its seq and its replay record carry on unchanged."""
        target = (self._held(to) if to else self.active).engine
        source = self._live(session_id)
        if source is None or source is target:
            return await self._on(session_id, lambda engine: engine.get(session_id))
        return await self._migrate(source, target, session_id)

    async def _migrate_if_behind(self, session_id: str) -> None:
        source = self._live(session_id)
        if source is not None and source is not self.active.engine:
            await self._migrate(source, self.active.engine, session_id, quiet=True)

    async def _migrate(
        self, source: Engine, target: Engine, session_id: str, *, quiet: bool = False
    ) -> SessionView:
        started = time.perf_counter()
        try:
            view = await self._move(source, target, session_id)
        except SessionGone:
            raise  # deleted or expired meanwhile: its own version's answer says which
        except ServiceError as e:
            self.events.migrated(e.code, time.perf_counter() - started)
            raise
        self.events.migrated("migrated", time.perf_counter() - started)
        return view

    async def _move(self, source: Engine, target: Engine, session_id: str) -> SessionView:
        if not source.backend.authoritative:
            raise MigrationImpossible(
                "sessions in Redis cannot migrate yet: they stay on their version (unload it "
                "once they are gone)",
                session_id=session_id,
            )
        if source.n_features != target.n_features:
            raise MigrationImpossible(
                f"model {target.model[0]}:{target.model[1]} takes {target.n_features} features, "
                f"the session's takes {source.n_features}",
                session_id=session_id,
            )
        async with source.locked(session_id) as session:
            if source.store.peek(session_id) is not session:  # pragma: no cover - locked() says
                raise SessionGone(f"no session {session_id!r}", session_id=session_id)
            state = source.store.pool.read(session.slot)
            kept = state.window_rows()
            if session.t > 0 and kept == 0 and not source.store.pool.window:
                # (with a window, none kept is a window restarted, said below: this message
                # blamed the setting after a crash's recovery; an outside test run)
                raise MigrationImpossible(
                    f"session {session_id!r} kept no inputs to replay (LSTM_MIGRATION_WINDOW "
                    f"is 0): it stays on "
                    f"{source.model[0]}:{source.model[1]}",
                    session_id=session_id,
                )
            if kept < min(session.t, source.store.pool.window):
                # Its window restarted (a crash's recovery, or a blob that had fewer): a replay
                # of so few inputs would pass for a migration and forecast badly.
                raise MigrationImpossible(
                    f"session {session_id!r} kept {kept} of its last "
                    f"{min(session.t, source.store.pool.window)} inputs (its window restarted "
                    f"after a crash or an import): it can migrate once it has stepped "
                    f"{min(session.t, source.store.pool.window) - kept} more",
                    session_id=session_id,
                )
            if kept:
                assert state.window is not None
                replayed = await target.batcher.burn_in(state.window)
            else:
                replayed = target.store.pool.zero_state()
            if all(v.engine is not target for v in self.held.values()):
                raise VersionNotLoaded(
                    f"model {target.model[0]}:{target.model[1]} was unloaded during the "
                    f"migration; session {session_id!r} stays where it was",
                    session_id=session_id,
                )
            moved = await target.backend.restore(
                session_id,
                replayed,
                session.t,
                session.ttl_s,
                created_at=session.created_at,
                last_step=session.last_step,  # a retry of the last step is answered again
            )
            try:
                await source.backend.delete(session)
            except ServiceError as e:
                # Moved all the same: one session per id, here whatever the journal could say
                # (left on both versions, it was written twice at the clean stop, and the
                # restart refused the whole snapshot; a review). The journal that failed is
                # mended from the store by its compaction.
                log.warning(
                    "session %r moved to %s:%s; its delete on %s:%s was not journalled (%s)",
                    session_id,
                    *target.model,
                    *source.model,
                    e.code,
                )
                source.store.delete(session)
        self.events.sessions()
        return SessionView.of(moved, target.model)

    async def _migrate_all(self, to: Engine) -> None:
        """Every session of every other version onto ``to``, a batch at a time, through the
        batcher: ``activate(..., migrate="now")``'s background work."""
        for version in list(self.held.values()):
            engine = version.engine
            if engine is to:
                continue
            ids = [s.id for s in engine.store.sessions()]
            for start in range(0, len(ids), MIGRATE_BATCH):
                if self.active.engine is not to:  # another activate since: its rules now
                    return
                batch = ids[start : start + MIGRATE_BATCH]
                await asyncio.gather(
                    *(self._migrate(engine, to, sid, quiet=True) for sid in batch),
                    return_exceptions=True,
                )

    # --- admin ----------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        return [
            {
                "tag": v.tag,
                "name": v.engine.model[0],
                "version": v.engine.model[1],
                "active": v is self.active,
                "sessions": v.sessions,
                "device": v.device,
                "loaded_at": v.loaded_at,
            }
            for v in self.held.values()
        ]

    def require(self, tag: str) -> Version:
        """The loaded version ``tag``, or 404 model_version_not_loaded."""
        return self._held(tag)

    def _held(self, tag: str) -> Version:
        version = self.held.get(tag)
        if version is None:
            raise VersionNotLoaded(
                f"model {tag!r} is not loaded (loaded: {', '.join(self.held)}); load it first",
                tag=tag,
            )
        return version

    async def load(self, tag: str) -> Version:
        """The version ``tag`` of BentoML's store, loaded (already loaded: as it is)."""
        async with self._changing:
            if tag in self.held:
                return self.held[tag]
            version = await asyncio.to_thread(self.loader, tag)
            if version.tag in self.held:  # "name" or "name:latest" resolved to a held version
                await version.close()
                return self.held[version.tag]
            first = self.active.engine
            if version.engine.model[0] != first.model[0]:
                await version.close()
                raise ModelMismatch(
                    f"{version.tag} is another model than {first.model[0]}: load versions of "
                    f"the served model only",
                    model=version.engine.model[0],
                    model_version=version.engine.model[1],
                )
            if version.engine.n_features != first.n_features:
                await version.close()
                raise ModelMismatch(
                    f"model {version.tag} takes {version.engine.n_features} features per "
                    f"timestep; the served ones take {first.n_features}: clients could not "
                    f"send the same inputs to both",
                    model=version.engine.model[0],
                    model_version=version.engine.model[1],
                )
            self.held[version.tag] = version
            return version

    async def activate(self, tag: str, migrate: str = "none") -> Version:
        """``tag`` becomes the version new sessions go to; the others' sessions move to it
        ``now`` (in the background, in batches through the batcher), on their next call
        (``on_next_step``), or not at all (``none``: until ``migrate`` is called for one)."""
        async with self._changing:
            self.active = self._held(tag)
            self.lazy = migrate == "on_next_step"
            if migrate == "now":
                self.background = asyncio.get_running_loop().create_task(
                    self._migrate_all(self.active.engine), name="migrate-all"
                )
            return self.active

    async def unload(self, tag: str) -> None:
        async with self._changing:
            version = self._held(tag)
            if version is self.active:
                raise VersionActive(
                    f"model {tag} is the active version: activate another one first", tag=tag
                )
            if version.sessions:
                raise VersionInUse(
                    f"{version.sessions} sessions are on model {tag}: migrate or delete them first",
                    tag=tag,
                    sessions=version.sessions,
                )
            del self.held[tag]
        await version.close()
