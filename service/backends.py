"""Where sessions live: in this process only, or in Redis with this process as a cache.

The engine talks to one ``Backend`` either way. ``EmbeddedBackend`` is the embedded store
itself. ``RedisBackend`` keeps Redis as the truth and the device pool as a cache of hot
sessions: a miss loads the session from Redis; every step is persisted with a compare-and-set on
``t`` (``service.redis_state``) before its state enters the pool, and a replica whose cached copy
went stale is told so (``StaleSession``), reloads and recomputes.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from typing import Any, Protocol

from service.batcher import Commit, Persister
from service.errors import (
    ServiceError,
    SessionExists,
    SessionExpired,
    SessionNotFound,
    SessionOnOtherVersion,
    StaleSession,
    StoreCorrupted,
    StoreUnavailable,
)
from service.journal import StoreFiles
from service.redis_state import RedisState, Write
from service.results import StepDone
from service.sessions import AppliedStep, Session, SessionStore, step_from_dict, step_to_dict
from service.state_blob import BlobError, SessionState, decode, encode


class Backend(Protocol):
    store: SessionStore
    persist: Persister | None
    # True: the pool is the only copy, a session's t is the truth (the embedded store). False:
    # the pool caches another store's sessions (Redis), so a cached t may lag: a seq that
    # differs from it is checked against the truth before it is refused, reads verify the
    # copy, and only the authoritative store's sessions are snapshot at shutdown.
    authoritative: bool

    async def get(self, session_id: str) -> Session: ...
    async def create(self, session_id: str | None, ttl_s: float | None) -> Session: ...
    async def delete(self, session: Session) -> None: ...
    async def reset(self, session: Session) -> None: ...
    async def touch(self, session: Session) -> None: ...
    async def ready(self) -> bool: ...
    async def current(self, session: Session) -> bool: ...
    async def restore(
        self,
        session_id: str,
        state: SessionState,
        t: int,
        ttl_s: float | None,
        *,
        created_at: float | None = None,
        last_step: AppliedStep | None = None,
    ) -> Session: ...


class EmbeddedBackend:
    """The embedded store: the pool is the only copy. With ``files`` (``service.journal``)
    every change is journalled beside the snapshot before it is answered: the journal's commit
    is the batcher's persist hook, and creates, imports, resets and deletes write their own
    entries. Without, nothing reaches the disk before a clean stop."""

    authoritative = True

    def __init__(self, store: SessionStore, files: StoreFiles | None = None) -> None:
        self.store = store
        self.files = files if files is not None and files.journalled else None
        self.persist: Persister | None = None if self.files is None else self.files.commit

    async def get(self, session_id: str) -> Session:
        return self.store.get(session_id)

    async def create(self, session_id: str | None, ttl_s: float | None) -> Session:
        return await self._journalled(self.store.create(session_id, ttl_s), None)

    async def _journalled(self, session: Session, state: SessionState | None) -> Session:
        """A session just put in the store, once its entry is journalled."""
        if self.files is not None:
            with being_made(self.store, session):
                await self.files.created(session, state)
        return session

    async def delete(self, session: Session) -> None:
        if self.files is None:
            self.store.delete(session)
        else:
            await self.files.deleted(session, lambda: self.store.delete(session))

    async def reset(self, session: Session) -> None:
        if self.files is None:
            self.store.reset(session)
        else:
            await self.files.reset(session, lambda: self.store.reset(session))

    async def touch(self, session: Session) -> None:
        self.store.touch(session)

    async def ready(self) -> bool:
        return self.files is None or self.files.healthy

    async def current(self, session: Session) -> bool:
        return True

    async def restore(
        self,
        session_id: str,
        state: SessionState,
        t: int,
        ttl_s: float | None,
        *,
        created_at: float | None = None,
        last_step: AppliedStep | None = None,
    ) -> Session:
        """A session holding ``state`` at ``t`` (an import; a migration, which keeps its
        ``created_at`` and ``last_step``: journalled with it, they were set after the entry and
        so lost by a crash before the next base; a review)."""
        session = self.store.restore(session_id, state, t=t, ttl_s=ttl_s, created_at=created_at)
        session.last_step = last_step
        return await self._journalled(session, state)


@contextlib.contextmanager
def being_made(store: SessionStore, session: Session) -> Iterator[None]:
    """Hold a session just put in the store while its creation is written elsewhere (journal,
    Redis); drop it if that fails. A step on the new id waits for the verdict and then finds no
    session, where before it stepped the slot the failure had let go of (a review)."""
    taken = session.try_acquire()
    assert taken, "a session just made is held by nobody"
    try:
        yield
    except BaseException:
        store.drop(session)
        raise
    finally:
        session.release()


def encode_last_step(step: AppliedStep) -> bytes:
    return json.dumps(step_to_dict(step)).encode()


def decode_last_step(raw: bytes | None) -> AppliedStep | None:
    return step_from_dict(json.loads(raw)) if raw else None


class RedisBackend:
    """Redis holds every session; this process caches the hot ones in its pool."""

    authoritative = False

    def __init__(self, store: SessionStore, redis: RedisState, header: dict[str, Any]) -> None:
        self.store = store  # a cache: its "evictions" only drop local copies
        self.redis = redis
        self.header = header  # model name and version, bound into every stored blob
        self.persist: Persister | None = self._persist

    def _blob(self, session_id: str, t: int, state: SessionState) -> bytes:
        return encode(state, {**self.header, "session_id": session_id, "t": t})

    async def get(self, session_id: str) -> Session:
        """The cached copy, or Redis's. A copy may lag Redis: steps find out by their
        compare-and-set; reads check ``current`` under the session's lock (``_lock``)."""
        try:
            return self.store.get(session_id)
        except ServiceError:
            return await self._load(session_id)

    async def current(self, session: Session) -> bool:
        """Whether this copy is Redis's: same incarnation (epoch) and t."""
        return await self.redis.version(session.id) == (session.epoch, session.t)

    async def _load(self, session_id: str) -> Session:
        stored = await self.redis.load(session_id)
        if stored is None:
            if await self.redis.known(session_id):
                raise SessionExpired(
                    f"session {session_id!r} expired after its TTL", session_id=session_id
                )
            raise SessionNotFound(f"no session {session_id!r}", session_id=session_id)
        try:
            header, state = decode(stored.state)
            last_step = decode_last_step(stored.last_step)
        except (BlobError, ValueError, KeyError, TypeError) as e:
            raise StoreCorrupted(f"session {session_id!r} is unreadable in Redis: {e}") from None
        cached = self.store.peek(session_id)
        if cached is not None:  # another request loaded it while this one waited on Redis
            return cached
        theirs = (header.get("model"), header.get("model_version"))
        if theirs != (self.header["model"], self.header["model_version"]):
            raise SessionOnOtherVersion(
                f"no session {session_id!r} on this model version",
                model=(str(theirs[0]), str(theirs[1])),
                session_id=session_id,
            )
        session = self.store.restore(
            session_id, state, t=stored.t, ttl_s=stored.ttl_s, created_at=stored.created_at
        )
        session.last_step = last_step
        session.epoch = stored.epoch
        return session

    async def create(self, session_id: str | None, ttl_s: float | None) -> Session:
        session = self.store.create(session_id, ttl_s)
        with being_made(self.store, session):
            await self._create_in_redis(session)
        return session

    async def _create_in_redis(self, session: Session) -> None:
        """The session just put in the store, created in Redis at t = 0 (under its own epoch)."""
        session.epoch = secrets.token_hex(8)
        created = await self.redis.create(
            session.id,
            self._blob(session.id, 0, self.store.pool.zero_state()),
            session.created_at,
            session.ttl_s,
            session.epoch,
        )
        if not created:
            raise SessionExists(f"session {session.id!r} already exists", session_id=session.id)

    async def delete(self, session: Session) -> None:
        await self.redis.delete(session.id)
        self.store.delete(session)

    async def reset(self, session: Session) -> None:
        epoch = secrets.token_hex(8)
        if not await self.redis.reset(
            session.id,
            self._blob(session.id, 0, self.store.pool.zero_state()),
            session.ttl_s,
            epoch,
        ):
            self.store.drop(session)
            raise SessionExpired(
                f"session {session.id!r} expired after its TTL", session_id=session.id
            )
        self.store.reset(session)
        session.epoch = epoch

    async def touch(self, session: Session) -> None:
        self.store.touch(session)
        await self.redis.touch(session.id, session.ttl_s)

    async def ready(self) -> bool:
        return await self.redis.ping()

    async def restore(
        self,
        session_id: str,
        state: SessionState,
        t: int,
        ttl_s: float | None,
        *,
        created_at: float | None = None,
        last_step: AppliedStep | None = None,
    ) -> Session:
        """A new session holding ``state`` at ``t``: created at 0, then moved to t atomically
        (``last_step`` with it; ``created_at`` is the create's: sessions do not migrate with
        Redis, which is what keeps one). Held throughout: a step on the id between the create
        and the move stepped the zero state, and the import then failed (a review)."""
        session = self.store.create(session_id, ttl_s)
        with being_made(self.store, session):
            await self._create_in_redis(session)
            blob = self._blob(session.id, t, state)
            record = b"" if last_step is None else encode_last_step(last_step)
            write = Write(session.id, session.epoch, 0, t, blob, record, session.ttl_s)
            try:
                [(ok, _)] = await self.redis.commit([write])
            except ServiceError:
                with contextlib.suppress(ServiceError):  # Redis may be down for this too
                    await self.redis.delete(session.id)
                raise
            if ok == -2:  # Redis refused the write: the session it was created as goes too
                with contextlib.suppress(ServiceError):
                    await self.redis.delete(session.id)
                raise StoreUnavailable(
                    f"the session store (Redis) refused the import of {session.id!r}; nothing "
                    "was created, retry"
                )
            if ok != 1:
                raise StaleSession(f"session {session.id!r} changed while it was imported")
            self.store.pool.write(session.slot, state)
            session.t = t
            session.last_step = last_step
        return session

    async def _persist(self, commits: list[Commit]) -> list[BaseException | None]:
        writes = []
        for c in commits:
            last = encode_last_step(AppliedStep(c.seq, c.digest, StepDone(c.t, c.outputs)))
            writes.append(
                Write(
                    c.session.id,
                    c.session.epoch,
                    c.seq,
                    c.t,
                    self._blob(c.session.id, c.t, c.state),
                    last,
                    c.session.ttl_s,
                )
            )
        try:
            replies = await self.redis.commit(writes)
        except ServiceError as e:
            return [e] * len(commits)
        verdicts: list[BaseException | None] = []
        for c, (ok, stored_t) in zip(commits, replies, strict=True):
            if ok == 1:
                verdicts.append(None)
            elif ok == 0:
                verdicts.append(
                    StaleSession(f"session {c.session.id!r} is at t = {stored_t}", t=stored_t)
                )
            elif ok == -2:
                verdicts.append(StoreUnavailable(f"Redis failed the write of {c.session.id!r}"))
            else:
                self.store.drop(c.session)
                verdicts.append(
                    SessionExpired(
                        f"session {c.session.id!r} expired after its TTL", session_id=c.session.id
                    )
                )
        return verdicts
