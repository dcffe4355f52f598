"""The in-process session store: each session's (h, c) in a preallocated pool on the model's device.

The pool holds, per slot, the recurrent state of every layer, the model's statistics when it keeps
some (a running-scaled model's, float64), and the forecast already made for the session's next
value (for anomaly scores and ``forecast``). Sessions are bookkeeping around a slot:
``t``, times, the last applied step (for exactly-once retries) and an ``asyncio.Lock`` that orders
a session's operations in arrival order (asyncio locks are FIFO) and never lets two run at once.

Expired and evicted ids are remembered (bounded) so a client learns why its session is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import math
import secrets
import struct
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import torch
from torch import Tensor

from model import LSTMState
from service.errors import (
    MigrationImpossible,
    SessionEvicted,
    SessionExists,
    SessionExpired,
    SessionNotFound,
    TooManySessions,
    TTLTooLong,
)
from service.results import Outputs, StepDone
from service.state_blob import SessionState

if TYPE_CHECKING:
    from model.checkpoint import AnyForecaster


def new_session_id() -> str:
    """A random id every route accepts: 32 hex digits always match ``SESSION_ID_PATTERN``
    (``token_urlsafe`` did not: about 3% of its ids began with '-' or '_', which it refuses)."""
    return secrets.token_hex(16)


TENANT_SEPARATOR = "/"  # outside SESSION_ID_PATTERN: a scoped id never equals a client's id


def scoped_id(tenant: str, session_id: str) -> str:
    """The store's id of a tenant's session (service/tenants.py)."""
    return f"{tenant}{TENANT_SEPARATOR}{session_id}"


def public_id(session_id: str) -> str:
    """The client's id of a store id: the id itself when it is not scoped."""
    return session_id.rpartition(TENANT_SEPARATOR)[2]


class StatePool:
    """Preallocated tensors, one row (slot) per session: (layers, capacity, hidden) and more."""

    def __init__(
        self,
        layers: int,
        hidden: int,
        features: int,
        capacity: int,
        device: torch.device | str,
        window: int = 0,
        stats_width: int = 0,
        stats_decay: float = 1.0,
    ) -> None:
        self.capacity = capacity
        self.h = torch.zeros(layers, capacity, hidden, device=device)
        self.c = torch.zeros(layers, capacity, hidden, device=device)
        # The model's state beyond (h, c), float64 (``stats_width`` of the model: a running-scaled
        # one's statistics, model/scaling.py); (capacity, 0) for the global model.
        self.stats = torch.zeros(capacity, stats_width, dtype=torch.float64, device=device)
        # Their weights' decay per value (the model's scale_decay): what bounds a blob's weight.
        self.stats_decay = stats_decay
        self.next_mean = torch.zeros(capacity, features, device=device)
        self.next_std = torch.ones(capacity, features, device=device)
        # Each session's last ``window`` inputs, a ring: input number n (0-based, counted by
        # ``recorded``) sits at row n % window. What a migration to another version replays.
        self.window = window
        self.inputs = torch.zeros(capacity, window, features, device=device)
        self.recorded = torch.zeros(capacity, dtype=torch.long, device=device)
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first
        # On a CPU, numpy views of the same memory: a round gathers, scatters and records a few
        # sessions' rows, and each torch op's dispatch cost more than its copy (the tensors are
        # never replaced, only written in place, so the views stay theirs).
        self.arrays = PoolArrays.of(self) if self.h.device.type == "cpu" else None

    @staticmethod
    def for_model(
        model: AnyForecaster, capacity: int, device: torch.device | str, window: int = 0
    ) -> StatePool:
        """A pool of ``capacity`` sessions of ``model``: its state's shapes, its statistics."""
        config = model.config
        return StatePool(
            config.num_layers,
            config.hidden_size,
            config.n_features,
            capacity,
            device,
            window=window,
            stats_width=model.stats_width,
            stats_decay=config.scale_decay,
        )

    @property
    def nbytes(self) -> int:
        tensors = (
            self.h,
            self.c,
            self.stats,
            self.next_mean,
            self.next_std,
            self.inputs,
            self.recorded,
        )
        return sum(t.element_size() * t.nelement() for t in tensors)

    def allocate(self) -> int:
        slot = self._free.pop()
        self.zero(slot)
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def zero_state(self) -> SessionState:
        """A new session's state: h = c = 0, and for its first value a forecast of mean 0 and
        std 1 (no value is scored against it: anomaly_z is null at t = 0)."""
        layers, _, hidden = self.h.shape
        features = self.next_mean.shape[1]
        return SessionState(
            torch.zeros(layers, hidden),
            torch.zeros(layers, hidden),
            torch.zeros(features),
            torch.ones(features),
            stats=self.zero_stats(),
        )

    @property
    def stats_width(self) -> int:
        return self.stats.shape[1]

    def zero_stats(self) -> Tensor | None:
        """A new session's statistics (none seen), None when the model keeps none."""
        return torch.zeros(self.stats_width, dtype=torch.float64) if self.stats_width else None

    def zero(self, slot: int) -> None:
        """``zero_state()`` into a slot, in place: every create and reset does this."""
        self.h[:, slot].zero_()
        self.c[:, slot].zero_()
        self.stats[slot].zero_()
        self.next_mean[slot].zero_()
        self.next_std[slot].fill_(1.0)
        self.recorded[slot] = 0

    def read(self, slot: int) -> SessionState:
        """A copy of one slot's state, on the CPU (its window oldest first)."""
        return SessionState(
            self.h[:, slot].cpu().clone(),
            self.c[:, slot].cpu().clone(),
            self.next_mean[slot].cpu().clone(),
            self.next_std[slot].cpu().clone(),
            self.window_of(slot),
            self.stats[slot].cpu().clone() if self.stats_width else None,
        )

    def window_of(self, slot: int, then: Tensor | None = None) -> Tensor | None:
        """The slot's kept inputs, oldest first, on the CPU; with ``then`` (T, F) appended, as
        they will be once a step of ``then`` is recorded. None when no window is kept."""
        if not self.window:
            return None
        n = int(self.recorded[slot])
        k = min(n, self.window)
        rows = torch.arange(n - k, n, device=self.inputs.device) % self.window
        kept = self.inputs[slot].index_select(0, rows).cpu()
        if then is not None:
            kept = torch.cat([kept, then.to("cpu", torch.float32)])[-self.window :]
        return kept

    def write(self, slot: int, state: SessionState) -> None:
        self.h[:, slot] = state.h.to(self.h.device)
        self.c[:, slot] = state.c.to(self.c.device)
        if self.stats_width:
            if state.stats is None or state.stats.shape != (self.stats_width,):
                raise ValueError("the state's statistics do not match the model's")
            self.stats[slot] = state.stats.to(self.stats.device, torch.float64)
        self.next_mean[slot] = state.next_mean.to(self.next_mean.device)
        self.next_std[slot] = state.next_std.to(self.next_std.device)
        kept = 0
        if self.window and state.window is not None:
            rows = state.window[-self.window :]
            kept = rows.shape[0]
            self.inputs[slot, :kept] = rows.to(self.inputs.device)
        self.recorded[slot] = kept

    def record(self, slots: Tensor, x: Tensor) -> None:
        """Append each slot's chunk (B, T, F) to its window: one write for the batch (``slots``
        distinct, as a round's are)."""
        if not self.window:
            return
        if self.arrays is not None:
            self.arrays.record(slots.numpy(), x.numpy(), self.window)
            return
        steps = x.shape[1]
        if steps > self.window:  # only the last ``window`` of a long chunk are kept
            x = x[:, -self.window :]
        offset = torch.arange(steps - x.shape[1], steps, device=self.inputs.device)
        rows = (self.recorded.index_select(0, slots).unsqueeze(1) + offset) % self.window
        self.inputs[slots.unsqueeze(1), rows] = x.to(self.inputs.device)  # rows distinct per slot
        self.recorded.index_add_(0, slots, torch.full_like(slots, steps))

    def gather(self, slots: Tensor) -> LSTMState:
        return LSTMState(self.h.index_select(1, slots), self.c.index_select(1, slots))

    def gather_stats(self, slots: Tensor) -> Tensor | None:
        """The slots' statistics (B, stats_width) float64, None when the model keeps none."""
        return self.stats.index_select(0, slots) if self.stats_width else None

    def scatter(
        self,
        slots: Tensor,
        state: LSTMState,
        next_mean: Tensor,
        next_std: Tensor,
        stats: Tensor | None = None,
    ) -> None:
        if self.arrays is not None:
            self.arrays.scatter(slots.numpy(), state, next_mean, next_std, stats)
            return
        if stats is not None:
            self.stats.index_copy_(0, slots, stats.to(self.stats.device))
        self.h.index_copy_(1, slots, state.h)
        self.c.index_copy_(1, slots, state.c)
        self.next_mean.index_copy_(0, slots, next_mean)
        self.next_std.index_copy_(0, slots, next_std)


@dataclass(frozen=True)
class PoolArrays:
    """A CPU pool's tensors as numpy arrays sharing their memory: what a round indexes."""

    h: np.ndarray  # (layers, capacity, hidden)
    c: np.ndarray
    next_mean: np.ndarray  # (capacity, F)
    next_std: np.ndarray
    inputs: np.ndarray  # (capacity, window, F)
    recorded: np.ndarray  # (capacity,) int64
    stats: np.ndarray  # (capacity, stats_width) float64

    @staticmethod
    def of(pool: StatePool) -> PoolArrays:
        return PoolArrays(
            pool.h.numpy(),
            pool.c.numpy(),
            pool.next_mean.numpy(),
            pool.next_std.numpy(),
            pool.inputs.numpy(),
            pool.recorded.numpy(),
            pool.stats.numpy(),
        )

    def gather(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the slots' h, c (layers, B, hidden), next mean and std (B, F)."""
        return self.h[:, slots], self.c[:, slots], self.next_mean[slots], self.next_std[slots]

    def scatter(
        self,
        slots: np.ndarray,
        state: LSTMState,
        next_mean: Tensor,
        next_std: Tensor,
        stats: Tensor | None = None,
    ) -> None:
        if stats is not None:
            self.stats[slots] = stats.numpy()
        self.h[:, slots] = state.h.numpy()
        self.c[:, slots] = state.c.numpy()
        self.next_mean[slots] = next_mean.numpy()
        self.next_std[slots] = next_std.numpy()

    def record(self, slots: np.ndarray, x: np.ndarray, window: int) -> None:
        steps = x.shape[1]
        if steps > window:  # only the last ``window`` of a long chunk are kept
            x = x[:, -window:]
        offset = np.arange(steps - x.shape[1], steps)
        rows = (self.recorded[slots][:, None] + offset) % window
        self.inputs[slots[:, None], rows] = x  # rows distinct per slot
        self.recorded[slots] += steps  # slots distinct: a round holds one job per session


@dataclass(slots=True)
class AppliedStep:
    """The last step a session applied, kept so a retry gets the same answer, not a second step."""

    seq: int  # t before the step
    digest: bytes  # of the inputs (16 bytes)
    response: StepDone


def step_to_dict(step: AppliedStep) -> dict[str, Any]:
    """A last applied step as JSON-ready data: how Redis and snapshots keep it (JSON writes the
    outputs' doubles as the shortest repr that reads back equal: exact)."""
    return {
        "seq": step.seq,
        "digest": step.digest.hex(),
        "t": step.response.t,
        "outputs": dataclasses.asdict(step.response.outputs),
    }


def step_from_dict(d: dict[str, Any]) -> AppliedStep:
    """``step_to_dict``'s value back; KeyError, TypeError or ValueError if it is not one."""
    outputs = Outputs(**d["outputs"])
    if not (len(outputs.mean) == len(outputs.std) == len(outputs.anomaly_z) > 0):
        raise ValueError("a last step's outputs differ in length")
    digest = bytes.fromhex(d["digest"])
    if len(digest) != 16:
        raise ValueError("a last step's digest is not 16 bytes")
    return AppliedStep(int(d["seq"]), digest, StepDone(int(d["t"]), outputs))


# seq, when recorded, digest, t after, T, F; then mean, std and z as doubles (T x F each; a NaN
# row of z stands for None), then the gates' JSON when the step returned them.
_RECORD = struct.Struct("<qd16sqII")


def pack_step(step: AppliedStep, at: float) -> bytes:
    """One bytes object per kept step, with the outputs as raw doubles (exact, and half the size
    of their JSON): a dozen small objects per session would fragment memory that a million idle
    sessions then cannot give back."""
    done, out = step.response, step.response.outputs
    steps, features = len(out.mean), len(out.mean[0])
    values = array("d")
    for rows in (out.mean, out.std):
        for row in rows:
            values.extend(row)
    for z in out.anomaly_z:
        values.extend([math.nan] * features if z is None else z)
    gates = orjson.dumps(out.gates) if out.gates else b""
    header = _RECORD.pack(step.seq, at, step.digest, done.t, steps, features)
    return header + values.tobytes() + gates


def unpack_step(record: bytes) -> tuple[AppliedStep, float]:
    seq, at, digest, t, steps, features = _RECORD.unpack_from(record)
    n = steps * features
    values = array("d")
    values.frombytes(record[_RECORD.size : _RECORD.size + 24 * n])
    flat = values.tolist()

    def rows(k: int) -> list[list[float]]:
        return [flat[k * n + i * features : k * n + (i + 1) * features] for i in range(steps)]

    anomaly: list[list[float] | None] = [
        None if all(math.isnan(v) for v in row) else row for row in rows(2)
    ]
    rest = record[_RECORD.size + 24 * n :]
    gates = orjson.loads(rest) if rest else None
    return AppliedStep(seq, digest, StepDone(t, Outputs(rows(0), rows(1), anomaly, gates))), at


QUEUED_WITHOUT_RECORD = b""


class _Guard:
    """A session's lock: it exists while an operation holds the session, with the futures of
    those waiting for it, first come first served."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: deque[asyncio.Future[None]] = deque()


class ReplayQueue:
    """Sessions in the order they got a replay record: times in an array beside a list, 16 bytes
    an entry where a deque of (time, session) tuples cost 80 (a million sessions stepped within
    the replay window hold a million entries)."""

    __slots__ = ("head", "sessions", "times")

    def __init__(self) -> None:
        self.times = array("d")
        self.sessions: list[Session | None] = []
        self.head = 0

    def __len__(self) -> int:
        return len(self.sessions) - self.head

    def append(self, at: float, session: Session) -> None:
        self.times.append(at)
        self.sessions.append(session)

    def first_time(self) -> float:
        return self.times[self.head]

    def popleft(self) -> Session:
        session = self.sessions[self.head]
        assert session is not None
        self.sessions[self.head] = None
        self.head += 1
        if self.head >= 4096 and 2 * self.head >= len(self.sessions):  # drop the consumed half
            del self.times[: self.head]
            del self.sessions[: self.head]
            self.head = 0
        return session


class Lane:
    """The sessions of one TTL: a doubly linked list through the slots (``Slots.prev``/``next``),
    least recently active first, and the keys of its one entry in each of ``Slots``' heaps (None
    while it has none). ``ttl`` is the one float object its sessions share."""

    __slots__ = ("due", "head", "since", "tail", "ttl")

    def __init__(self, ttl: float, slot: int) -> None:
        self.ttl = ttl
        self.head = self.tail = slot
        self.due: float | None = None  # key in Slots.expiry: when the head expires, or earlier
        self.since: float | None = (
            None  # key in Slots.recency: the head's last activity, or earlier
        )


class Slots:
    """Per-slot bookkeeping in flat arrays, so an idle session costs bytes, not Python objects.

    ``t``, ``last_active`` and ``created_at`` of the session in each slot; the owner of each slot;
    and one ``Lane`` per distinct TTL, its sessions least recently active first: a lane's head
    expires first, and the oldest of the heads is the least recently used session.

    Clients choose their TTL, so lanes can be as many as sessions. Two heaps order the lanes: by
    when their head expires (``expiry``) and by their head's last activity (``recency``), one
    entry per lane in each, keyed by a lower bound of the true value, corrected lazily: touching
    or removing a head only makes the lane's next head later, so nothing is done then; a popped
    entry whose head turns out later is pushed again with the true key. A sweep thus looks at the
    lanes whose key has come (what expires, plus at most one look per lane changed since), not at
    every lane; an empty lane is dropped with its TTL, and the heaps are rebuilt from the lanes
    when entries of dropped lanes outnumber them, so memory follows the live sessions.

    Measured on a 2-core dev machine (``bench/ttl_bench.py``): at 100k sessions of distinct TTLs
    a sweep took 44 ms looking at every TTL's head, now 0.0005 ms with nothing due and 0.026 ms
    freeing five; each round of 200k distinct-TTL sessions created and deleted kept 7.6 MiB of
    interned TTLs for good, now 76 bytes.
    """

    def __init__(self, capacity: int, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.t = array("q", bytes(8 * capacity))
        self.last_active = array("d", bytes(8 * capacity))
        self.created_at = array("d", bytes(8 * capacity))
        self.owner: list[Session | None] = [None] * capacity
        self.prev = array("i", [-1]) * capacity
        self.next = array("i", [-1]) * capacity
        self.lanes: dict[float, Lane] = {}
        self.expiry: list[tuple[float, float]] = []  # heap of (Lane.due, ttl)
        self.recency: list[tuple[float, float]] = []  # heap of (Lane.since, ttl)
        # Sessions holding a replay record, by when they got it; see SessionStore.sweep.
        self.replays = ReplayQueue()

    def append(self, ttl: float, slot: int) -> None:
        """Put the slot at the tail of its TTL's lane; its ``last_active`` must be set already."""
        lane = self.lanes.get(ttl)
        self.next[slot] = -1
        if lane is None:
            self.prev[slot] = -1
            lane = self.lanes[ttl] = Lane(ttl, slot)
            self._schedule(lane)
            return
        self.prev[slot] = lane.tail
        self.next[lane.tail] = slot
        lane.tail = slot

    def unlink(self, ttl: float, slot: int) -> None:
        lane = self.lanes[ttl]
        before, after = self.prev[slot], self.next[slot]
        if before == -1:
            lane.head = after
        else:
            self.next[before] = after
        if after == -1:
            lane.tail = before
        else:
            self.prev[after] = before
        if lane.head == -1:
            del self.lanes[ttl]  # and its TTL: its heap entries are stale from now on
            self._compact()

    def set_active(self, slot: int, ttl: float, value: float) -> None:
        """Set a slot's last activity. Moving it back (a snapshot's time) is for a lane's newest
        session only, restored oldest first; a head moved back gets keys that bound it again."""
        earlier = value < self.last_active[slot]
        self.last_active[slot] = value
        if earlier:
            lane = self.lanes.get(ttl)
            if lane is not None and lane.head == slot:
                self._schedule(lane)

    def oldest(self, ttl: float) -> Iterator[Session]:
        """The sessions of one TTL, least recently active first."""
        lane = self.lanes.get(ttl)
        slot = -1 if lane is None else lane.head
        while slot != -1:
            following = self.next[slot]  # read first: the caller may unlink this one
            owner = self.owner[slot]
            assert owner is not None
            yield owner
            slot = following

    def expired(self, now: float) -> tuple[list[Session], list[Lane]]:
        """The idle sessions past their TTL at ``now``, and the lanes they were found in; those
        lanes have no expiry entry until ``reschedule`` (after the caller freed the sessions)."""
        heap, found, walked = self.expiry, [], []
        while heap and heap[0][0] <= now:
            due, ttl = heapq.heappop(heap)
            lane = self.lanes.get(ttl)
            if lane is None or lane.due != due:
                continue  # the entry of a dropped lane, or one superseded
            active = self.last_active[lane.head]
            if active + ttl > now:  # its head was touched or freed since: not due yet
                lane.due = active + ttl
                heapq.heappush(heap, (lane.due, ttl))
                continue
            lane.due = None
            walked.append(lane)
            for session in self.oldest(ttl):
                if session.last_active + ttl > now:
                    break
                if not session.busy:  # a busy one expires once idle (next sweep, or on access)
                    found.append(session)
        return found, walked

    def reschedule(self, lanes: list[Lane]) -> None:
        """Give the lanes ``expired`` walked their expiry entry back, from their head now."""
        for lane in lanes:
            if self.lanes.get(lane.ttl) is lane:
                lane.due = self.last_active[lane.head] + lane.ttl
                heapq.heappush(self.expiry, (lane.due, lane.ttl))

    def least_recent_idle(self) -> Session | None:
        """The idle session active longest ago, whatever its TTL: the lanes are taken from the
        recency heap oldest head first until no head left is older than the best found (behind
        a busy head, a lane's first idle session can be younger than another lane's head)."""
        heap = self.recency
        best: Session | None = None
        best_active = math.inf
        taken: list[Lane] = []
        while heap and heap[0][0] < best_active:
            since, ttl = heapq.heappop(heap)
            lane = self.lanes.get(ttl)
            if lane is None or lane.since != since:
                continue
            active = self.last_active[lane.head]
            if active > since:  # a later head than the key says: put it back where it belongs
                lane.since = active
                heapq.heappush(heap, (active, ttl))
                continue
            lane.since = None
            taken.append(lane)
            for session in self.oldest(ttl):
                if not session.busy:
                    if session.last_active < best_active:
                        best, best_active = session, session.last_active
                    break
        for lane in taken:  # the victim's lane too: its key bounds the next head as well
            lane.since = self.last_active[lane.head]
            heapq.heappush(heap, (lane.since, lane.ttl))
        return best

    def _schedule(self, lane: Lane) -> None:
        """New entries for the lane's head in both heaps; any older ones become stale."""
        active = self.last_active[lane.head]
        lane.due, lane.since = active + lane.ttl, active
        heapq.heappush(self.expiry, (lane.due, lane.ttl))
        heapq.heappush(self.recency, (lane.since, lane.ttl))
        self._compact()

    def _compact(self) -> None:
        """Rebuild the heaps from the lanes once stale entries outnumber the live ones: O(lanes),
        after at least as many changes, so O(1) each."""
        limit = 2 * len(self.lanes) + 64
        if len(self.expiry) > limit:
            self.expiry = [(x.due, x.ttl) for x in self.lanes.values() if x.due is not None]
            heapq.heapify(self.expiry)
        if len(self.recency) > limit:
            self.recency = [(x.since, x.ttl) for x in self.lanes.values() if x.since is not None]
            heapq.heapify(self.recency)


@dataclass(eq=False, slots=True)
class Session:
    """A session: its id and slot; ``t`` and times live in the store's arrays (``Slots``).

    Operations on a session take its lock (``acquire``/``release``, or ``async with session``),
    which grants them in arrival order. A session the store has let go of (deleted, expired,
    evicted, dropped) has slot -1: reading its ``t`` or times then raises rather than reading the
    slot's next owner.
    """

    id: str
    slot: int
    ttl_s: float
    _meta: Slots = field(repr=False)
    epoch: str = ""  # with Redis: the stored incarnation this copy belongs to (new at reset)
    # pack_step's record; QUEUED_WITHOUT_RECORD: none, but an entry in the replay queue; None:
    # neither
    _last_step: bytes | None = field(default=None, repr=False)
    _guard: _Guard | None = field(default=None, repr=False)

    @property
    def t(self) -> int:
        return self._meta.t[self._live_slot()]

    @t.setter
    def t(self, value: int) -> None:
        self._meta.t[self._live_slot()] = value

    @property
    def last_active(self) -> float:
        return self._meta.last_active[self._live_slot()]

    @last_active.setter
    def last_active(self, value: float) -> None:
        self._meta.set_active(self._live_slot(), self.ttl_s, value)

    @property
    def created_at(self) -> float:
        return self._meta.created_at[self._live_slot()]

    @created_at.setter
    def created_at(self, value: float) -> None:
        self._meta.created_at[self._live_slot()] = value

    @property
    def expires_at(self) -> float:
        return self.last_active + self.ttl_s

    @property
    def last_step(self) -> AppliedStep | None:
        return unpack_step(self._last_step)[0] if self._last_step else None

    @last_step.setter
    def last_step(self, step: AppliedStep | None) -> None:
        if step is None:
            # A session in the replay queue stays there (the sweep drops it): say so, or its
            # next step would queue it again, once per reset (1,800 entries in 30 min).
            if self._last_step is not None:
                self._last_step = QUEUED_WITHOUT_RECORD
            return
        now = self._meta.clock()
        if self._last_step is None:
            self._meta.replays.append(now, self)
        self._last_step = pack_step(step, now)

    def recorded_step(self) -> tuple[AppliedStep, float] | None:
        """The last applied step and when it was recorded (for a snapshot), or None."""
        return unpack_step(self._last_step) if self._last_step else None

    def step_record(self) -> bytes | None:
        """``recorded_step`` still packed (``unpack_step`` reads it), or None: a compaction
        copies it on the event loop and reads it in a thread."""
        return self._last_step or None

    def restore_step(self, step: AppliedStep, at: float) -> None:
        """Keep a step recorded at ``at`` (read from a snapshot): the sweep frees it at ``at`` plus
        the replay window, as if the server had never stopped."""
        if self._last_step is None:
            self._meta.replays.append(at, self)
        self._last_step = pack_step(step, at)

    def _live_slot(self) -> int:
        if self.slot < 0:
            raise RuntimeError(f"session {self.id!r} was let go of; look it up again")
        return self.slot

    @property
    def busy(self) -> bool:
        """An operation holds the session or waits for it."""
        return self._guard is not None

    def try_acquire(self) -> bool:
        """Take the session's lock if nobody holds it, without waiting."""
        if self._guard is not None:
            return False
        self._guard = _Guard()
        return True

    async def acquire(self) -> None:
        """Take the session's lock, after those who asked before."""
        guard = self._guard
        if guard is None:
            self._guard = _Guard()
            return
        turn = asyncio.get_running_loop().create_future()
        guard.waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # handed to us just as we were cancelled: hand it on
            else:
                with contextlib.suppress(ValueError):  # a release may have dropped it already
                    guard.waiters.remove(turn)
            raise

    def release(self) -> None:
        """Hand the lock to the next waiter still waiting, or free it."""
        guard = self._guard
        assert guard is not None, "release() without acquire()"
        while guard.waiters:
            turn = guard.waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._guard = None

    async def __aenter__(self) -> Session:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class StoreLimits:
    max_sessions: int
    default_ttl_s: float
    max_ttl_s: float
    evict_when_full: bool
    tombstones: int
    replay_window_s: float = 60.0  # a step's reply is kept at least this long for retries


@dataclass
class StoreEvents:
    """Callbacks the service points at its metrics; the store itself knows nothing of Prometheus."""

    created: Callable[[], None] = lambda: None
    expired: Callable[[int], None] = lambda n: None
    evicted: Callable[[], None] = lambda: None
    deleted: Callable[[], None] = lambda: None


class SessionStore:
    """Sessions by id, each owning a pool slot; expiry, LRU eviction and tombstones.

    Every operation costs the same at a thousand sessions as at millions, and whatever TTLs the
    clients chose: lookups are a dict, recency lives in per-TTL lanes through the slots, and the
    sweep and eviction take lanes from heaps (see ``Slots``), never all of them.
    """

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
        self.slots = Slots(pool.capacity, clock)
        self._sessions: dict[str, Session] = {}
        self._gone: OrderedDict[str, str] = OrderedDict()  # id -> "expired" | "evicted"

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, session_id: str | None = None, ttl_s: float | None = None) -> Session:
        ttl = self.limits.default_ttl_s if ttl_s is None else float(ttl_s)
        if ttl > self.limits.max_ttl_s:
            raise TTLTooLong(
                f"ttl_s {ttl} is over the limit of {self.limits.max_ttl_s} s",
                limit=self.limits.max_ttl_s,
            )
        now = self.clock()
        if session_id is None:
            session_id = new_session_id()
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
        slot = self.pool.allocate()
        meta = self.slots
        meta.t[slot] = 0
        meta.last_active[slot] = meta.created_at[slot] = now
        session = Session(session_id, slot, self._shared(ttl), meta)
        meta.owner[slot] = session
        meta.append(session.ttl_s, slot)
        self._sessions[session_id] = session
        self._gone.pop(session_id, None)
        self.events.created()
        return session

    def _shared(self, ttl: float) -> float:
        """One float object per TTL value, so a million sessions share it: its lane's, and gone
        with the lane (a cache of every TTL ever asked for grew without bound)."""
        lane = self.slots.lanes.get(ttl)
        return ttl if lane is None else lane.ttl

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
            if reason == "unmigratable":
                raise MigrationImpossible(
                    f"session {session_id!r} was on another model version, kept no inputs to "
                    f"replay through this one, and could not be restored after the restart",
                    session_id=session_id,
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

    def remember_gone(self, session_id: str, reason: str) -> None:
        """A session that is not here, and why (``get`` answers with it)."""
        self._gone[session_id] = reason
        while len(self._gone) > self.limits.tombstones:
            self._gone.popitem(last=False)

    def knows(self, session_id: str) -> bool:
        """Whether the id is held here, or was (expired or evicted, and still remembered)."""
        return session_id in self._sessions or session_id in self._gone

    def drop(self, session: Session) -> None:
        """Forget a cached session without counting it anywhere (durable mode: Redis has it)."""
        if self._sessions.get(session.id) is session:
            self._release(session)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def touch(self, session: Session) -> None:
        session.last_active = self.clock()
        if self._sessions.get(session.id) is session:
            meta = self.slots
            if meta.lanes[session.ttl_s].tail != session.slot:
                meta.unlink(session.ttl_s, session.slot)
                meta.append(session.ttl_s, session.slot)

    def reset(self, session: Session) -> None:
        """Back to zeros and t = 0; call with the session's lock held."""
        self.pool.zero(session.slot)
        session.t = 0
        session.last_step = None
        self.touch(session)

    def delete(self, session: Session) -> None:
        """Free the session; call with its lock held, so no step still uses the slot."""
        if self._sessions.get(session.id) is session:
            self._release(session)
            self.events.deleted()

    def sweep(self) -> int:
        """Free every idle session past its TTL, return how many; and drop replay records older
        than the replay window. Work is proportional to what is freed (plus busy sessions at
        the head of a lane, and one look at a lane whose head changed since), not to the sessions
        held or their distinct TTLs."""
        now = self.clock()
        expired, walked = self.slots.expired(now)
        for session in expired:
            self._expire(session, count=False)
        self.slots.reschedule(walked)
        if expired:
            self.events.expired(len(expired))
        replays = self.slots.replays
        horizon = now - self.limits.replay_window_s
        while replays and replays.first_time() <= horizon:
            session = replays.popleft()
            record = session._last_step
            if not record:  # reset (or let go of) since it was queued
                session._last_step = None
                continue
            _, at, *_ = _RECORD.unpack_from(record)
            if at > horizon:  # stepped again since: keep the newer record
                replays.append(at, session)
            else:
                session._last_step = None  # a retry this late is answered seq_conflict with t
        return len(expired)

    def _expire(self, session: Session, count: bool = True) -> None:
        self._forget(session, "expired")
        if count:
            self.events.expired(1)

    def _evict_one(self) -> bool:
        """Evict the least recently used idle session, whatever its TTL."""
        victim = self.slots.least_recent_idle()
        if victim is None:
            return False
        self._forget(victim, "evicted")
        self.events.evicted()
        return True

    def _forget(self, session: Session, reason: str) -> None:
        self._release(session)
        if self.limits.tombstones:
            self._gone[session.id] = reason
            while len(self._gone) > self.limits.tombstones:
                self._gone.popitem(last=False)

    def _release(self, session: Session) -> None:
        del self._sessions[session.id]
        meta = self.slots
        meta.unlink(session.ttl_s, session.slot)
        meta.owner[session.slot] = None
        self.pool.release(session.slot)
        session.slot = -1
        session._last_step = None
