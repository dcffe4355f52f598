"""The in-process session store: each session's (h, c) in a preallocated pool on the model's device.

The pool holds, per slot, the recurrent state of every layer and the forecast already made for the
session's next value (for anomaly scores and ``forecast``). Sessions are bookkeeping around a slot:
``t``, times, the last applied step (for exactly-once retries) and an ``asyncio.Lock`` that orders
a session's operations in arrival order (asyncio locks are FIFO) and never lets two run at once.

Expired and evicted ids are remembered (bounded) so a client learns why its session is gone.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from model import LSTMState
from service.errors import (
    SessionEvicted,
    SessionExists,
    SessionExpired,
    SessionNotFound,
    TooManySessions,
    TTLTooLong,
)
from service.state_blob import SessionState


class StatePool:
    """Preallocated tensors, one row (slot) per session: (layers, capacity, hidden) and more."""

    def __init__(
        self,
        layers: int,
        hidden: int,
        features: int,
        capacity: int,
        device: torch.device | str,
    ) -> None:
        self.capacity = capacity
        self.h = torch.zeros(layers, capacity, hidden, device=device)
        self.c = torch.zeros(layers, capacity, hidden, device=device)
        self.next_mean = torch.zeros(capacity, features, device=device)
        self.next_std = torch.ones(capacity, features, device=device)
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def nbytes(self) -> int:
        return sum(
            t.element_size() * t.nelement() for t in (self.h, self.c, self.next_mean, self.next_std)
        )

    def allocate(self) -> int:
        slot = self._free.pop()
        self.zero(slot)
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def zero(self, slot: int) -> None:
        self.h[:, slot].zero_()
        self.c[:, slot].zero_()
        self.next_mean[slot].zero_()
        self.next_std[slot].fill_(1.0)

    def read(self, slot: int) -> SessionState:
        """A copy of one slot's state, on the CPU."""
        return SessionState(
            self.h[:, slot].cpu().clone(),
            self.c[:, slot].cpu().clone(),
            self.next_mean[slot].cpu().clone(),
            self.next_std[slot].cpu().clone(),
        )

    def write(self, slot: int, state: SessionState) -> None:
        self.h[:, slot] = state.h.to(self.h.device)
        self.c[:, slot] = state.c.to(self.c.device)
        self.next_mean[slot] = state.next_mean.to(self.next_mean.device)
        self.next_std[slot] = state.next_std.to(self.next_std.device)

    def gather(self, slots: Tensor) -> LSTMState:
        return LSTMState(self.h.index_select(1, slots), self.c.index_select(1, slots))

    def scatter(self, slots: Tensor, state: LSTMState, next_mean: Tensor, next_std: Tensor) -> None:
        self.h.index_copy_(1, slots, state.h)
        self.c.index_copy_(1, slots, state.c)
        self.next_mean.index_copy_(0, slots, next_mean)
        self.next_std.index_copy_(0, slots, next_std)


@dataclass
class AppliedStep:
    """The last step a session applied, kept so a retry gets the same answer, not a second step."""

    seq: int  # t before the step
    digest: bytes  # of the inputs
    response: Any


@dataclass(eq=False)
class Session:
    id: str
    slot: int
    ttl_s: float
    created_at: float
    last_active: float
    t: int = 0
    last_step: AppliedStep | None = None
    epoch: str = ""  # with Redis: the stored incarnation this copy belongs to (new at reset)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def expires_at(self) -> float:
        return self.last_active + self.ttl_s

    @property
    def busy(self) -> bool:
        return self.lock.locked()


@dataclass(frozen=True)
class StoreLimits:
    max_sessions: int
    default_ttl_s: float
    max_ttl_s: float
    evict_when_full: bool
    tombstones: int


@dataclass
class StoreEvents:
    """Callbacks the service points at its metrics; the store itself knows nothing of Prometheus."""

    created: Callable[[], None] = lambda: None
    expired: Callable[[int], None] = lambda n: None
    evicted: Callable[[], None] = lambda: None
    deleted: Callable[[], None] = lambda: None


class SessionStore:
    def __init__(
        self,
        pool: StatePool,
        limits: StoreLimits,
        *,
        events: StoreEvents | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if pool.capacity < limits.max_sessions:
            raise ValueError("the pool must have a slot for every session")
        self.pool = pool
        self.limits = limits
        self.events = events or StoreEvents()
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._gone: OrderedDict[str, str] = OrderedDict()  # id -> "expired" | "evicted"

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, session_id: str | None = None, ttl_s: float | None = None) -> Session:
        ttl = self.limits.default_ttl_s if ttl_s is None else ttl_s
        if ttl > self.limits.max_ttl_s:
            raise TTLTooLong(
                f"ttl_s {ttl} is over the limit of {self.limits.max_ttl_s} s",
                limit=self.limits.max_ttl_s,
            )
        now = self.clock()
        if session_id is None:
            session_id = secrets.token_urlsafe(16)
        else:
            existing = self._sessions.get(session_id)
            if existing is not None and existing.expires_at <= now and not existing.busy:
                self._expire(existing)
            elif existing is not None:
                raise SessionExists(f"session {session_id!r} already exists", session_id=session_id)
        if len(self._sessions) >= self.limits.max_sessions:
            self.sweep()
        full = len(self._sessions) >= self.limits.max_sessions
        if full and not (self.limits.evict_when_full and self._evict_one()):
            raise TooManySessions(
                f"the service holds its maximum of {self.limits.max_sessions} sessions",
                limit=self.limits.max_sessions,
            )
        session = Session(session_id, self.pool.allocate(), ttl, created_at=now, last_active=now)
        self._sessions[session_id] = session
        self._gone.pop(session_id, None)
        self.events.created()
        return session

    def get(self, session_id: str) -> Session:
        """The live session, or a 404 saying whether it never existed, expired or was evicted."""
        session = self._sessions.get(session_id)
        if session is not None and session.expires_at <= self.clock() and not session.busy:
            self._expire(session)
            session = None
        if session is None:
            reason = self._gone.get(session_id)
            if reason == "expired":
                raise SessionExpired(
                    f"session {session_id!r} expired after its TTL", session_id=session_id
                )
            if reason == "evicted":
                raise SessionEvicted(
                    f"session {session_id!r} was evicted to make room", session_id=session_id
                )
            raise SessionNotFound(f"no session {session_id!r}", session_id=session_id)
        return session

    def restore(
        self,
        session_id: str,
        state: SessionState,
        *,
        t: int,
        ttl_s: float | None = None,
        created_at: float | None = None,
    ) -> Session:
        """A session holding ``state`` at step ``t``: for imports and snapshots."""
        session = self.create(session_id, ttl_s)
        self.pool.write(session.slot, state)
        session.t = t
        if created_at is not None:
            session.created_at = created_at
        return session

    def peek(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def drop(self, session: Session) -> None:
        """Forget a cached session without counting it anywhere (durable mode: Redis has it)."""
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
            self.pool.release(session.slot)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def touch(self, session: Session) -> None:
        session.last_active = self.clock()
        if self._sessions.get(session.id) is session:
            self._sessions.move_to_end(session.id)

    def reset(self, session: Session) -> None:
        """Back to zeros and t = 0; call with the session's lock held."""
        self.pool.zero(session.slot)
        session.t = 0
        session.last_step = None
        self.touch(session)

    def delete(self, session: Session) -> None:
        """Free the session; call with its lock held, so no step still uses the slot."""
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
            self.pool.release(session.slot)
            self.events.deleted()

    def sweep(self) -> int:
        """Free every idle session past its TTL; return how many."""
        now = self.clock()
        expired = [s for s in self._sessions.values() if s.expires_at <= now and not s.busy]
        for s in expired:
            self._expire(s, count=False)
        if expired:
            self.events.expired(len(expired))
        return len(expired)

    def _expire(self, session: Session, count: bool = True) -> None:
        self._forget(session, "expired")
        if count:
            self.events.expired(1)

    def _evict_one(self) -> bool:
        for session in self._sessions.values():  # least recently used first
            if not session.busy:
                self._forget(session, "evicted")
                self.events.evicted()
                return True
        return False

    def _forget(self, session: Session, reason: str) -> None:
        del self._sessions[session.id]
        self.pool.release(session.slot)
        if self.limits.tombstones:
            self._gone[session.id] = reason
            while len(self._gone) > self.limits.tombstones:
                self._gone.popitem(last=False)
