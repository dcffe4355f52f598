"""The embedded store's write-ahead journal: what a kill -9 of the worker would otherwise lose.

Without Redis the pool is the only copy of every session. A base (or, after a clean stop, the
snapshot, ``service.snapshot``) holds them as of its writing; the journal of the same number
holds every change since, appended before anyone is told of it:

    state/sessions.snapshot             the sessions at the last clean stop (per-session blobs)
    state/sessions.snapshot.base.7      the sessions when journal 7 began (one columnar record)
    state/sessions.snapshot.journal.7   every change since, in order

A start reads the newest base (else the snapshot) and replays the journals from its number on.

A journal file is a sequence of records, each ``u32 length | u32 CRC-32 | payload``, the CRC over
the length's four bytes and the payload. The first record is the file's header (JSON: the model
and the state's shapes). Every other record is one commit group, written by one ``write(2)``:
a batch round's steps, or one create, import, reset or delete. Each entry in a group is::

    b"R" | u32 n | u32 T | u32 F | f64 at | n x u16 id length | ids | n x i64 seq | n x i64 t
         | n x 16 digest | n x state | n x T x F f32 mean | same, std | same, anomaly z
    b"P" | u16 id length | id | i64 t | f64 ttl_s | f64 created_at | f64 last_active | state
    b"S" | u16 id length | id | i64 t | f64 last_active | u32 n | state | n bytes of last step
    b"D" | u16 id length | id

``R`` is the steps of one batched forward, column by column, each column one conversion of the
batch's tensors (per-step entries cost a quarter of a ``step_many`` item's server time); ``P``
(put) a session created or imported, whole; ``S`` a step that returned its gates (its last step
is ``sessions.pack_step``'s record, gates included) or a reset (t 0, the zero state, no last
step); ``D`` a delete. ``state`` is h, c, the next value's mean and std as little-endian float32
(the layout of a state blob's payload, ``service.state_blob``). A step's seq, digest and outputs
are its replay record: a retry after a restart is answered from it, once. The outputs are the
model's float32 values, which is what the answer's doubles were (exact), and a step from t 0 has
no anomaly score for its first value, as its answer had none.

Reading stops at the first record that is short or whose CRC does not match: a crash mid-append
leaves a torn last record, which is dropped whole (the round it held was never answered), never
half applied. Every entry sets what it names (nothing is a delta), so replaying a journal twice
gives what replaying it once gives: a crash between writing the snapshot at a clean stop and
removing the journals it holds loses nothing and doubles nothing.

Compaction: once a journal outgrows ``LSTM_JOURNAL_MAX_BYTES`` (and the base), the sessions are
captured on the event loop (their bookkeeping by whole arrays, their states by one copy of their
pool rows), a new journal is opened for what follows, and the capture is written as that
journal's base in a thread (written aside, renamed in); only then are older bases, journals and
the snapshot removed. A start writes a base of what it restored the same way. At a clean stop the
snapshot is written, then the bases and journals removed (bases first).

Modes (``LSTM_JOURNAL``): ``fsync``, each group is on the disk (fdatasync, in a thread, shared by
the groups that wait on it) before anyone is answered: survives a power loss. ``write``, each
group is in the kernel (one write) before anyone is answered: survives a kill of the process, not
of the machine. ``off``: no journal; the snapshot is written at a clean stop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from service.errors import ServiceError, ShuttingDown, StoreUnavailable
from service.results import Outputs, StepDone
from service.sessions import AppliedStep, Session, SessionStore, pack_step, unpack_step
from service.snapshot import (
    Restored,
    SnapshotRefused,
    fsync_dir,
    read_snapshot,
    restore_entries,
    save_sessions,
    step_to_json,
)
from service.state_blob import BlobError, SessionState

if TYPE_CHECKING:
    from service.batcher import Commit
    from service.rounds import Group

log = logging.getLogger("lstm_sessions.journal")

FORMAT = "lstm-journal-1"
_FRAME = struct.Struct("<II")  # length, CRC-32 of (length, payload)
_LENGTH = struct.Struct("<I")
_ID = struct.Struct("<cH")
_PUT = struct.Struct("<qddd")  # t, ttl_s, created_at, last_active
_STEP = struct.Struct("<qdI")  # t, last_active, length of the last step's record
_ROUND = struct.Struct("<cIIId")  # kind, steps, T, F, when
ROUND, PUT, STEP, DELETE, BASE = b"R", b"P", b"S", b"D", b"B"


# A snapshot's entries, those of another version moved to this one (a restart with a new model).
Migrator = Callable[
    [list[tuple[dict[str, Any], SessionState]]], list[tuple[dict[str, Any], SessionState]]
]


class JournalMode(StrEnum):
    FSYNC = "fsync"  # on the disk before an answer: survives a power loss
    WRITE = "write"  # in the kernel before an answer: survives a crash of the process
    OFF = "off"  # the snapshot at a clean stop only


# --- the format ---------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    """One record: its length, its checksum, its payload."""
    length = _LENGTH.pack(len(payload))
    return _FRAME.pack(len(payload), zlib.crc32(payload, zlib.crc32(length))) + payload


def read_records(data: bytes) -> tuple[list[bytes], int]:
    """The intact records of a journal file, and how many bytes after them were dropped: a
    torn last record (a crash mid-append) or a damaged one, and everything after it."""
    records, offset = [], 0
    view = memoryview(data)
    while offset + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, offset)
        end = offset + _FRAME.size + length
        if end > len(data):
            break
        payload = view[offset + _FRAME.size : end]
        if zlib.crc32(payload, zlib.crc32(_LENGTH.pack(length))) != crc:
            break
        records.append(bytes(payload))
        offset = end
    return records, len(data) - offset


@dataclass(frozen=True)
class StateLayout:
    """The shapes of a state, and so the size of its bytes in an entry."""

    layers: int
    hidden: int
    features: int
    stats: int = 0  # the model's float64 statistics per session (a running-scaled model's)

    @property
    def nbytes(self) -> int:
        return 4 * (2 * self.layers * self.hidden + 2 * self.features) + 8 * self.stats

    def to_bytes(self, state: SessionState) -> bytes:
        # h, c, mean, std (float32), then the statistics (float64): no window (a blob's fifth)
        floats = b"".join(a.astype("<f4").tobytes() for a in state.arrays()[:4])
        return floats + state.stats_array().tobytes()

    def from_bytes(self, raw: bytes) -> SessionState:
        lh, f = self.layers * self.hidden, self.features
        values = np.frombuffer(raw, dtype="<f4", count=2 * lh + 2 * f).astype(np.float32)
        h, c, mean, std = np.split(values, [lh, 2 * lh, 2 * lh + f])
        shape = (self.layers, self.hidden)
        stats = np.frombuffer(raw, dtype="<f8", count=self.stats, offset=4 * (2 * lh + 2 * f))
        return SessionState(
            torch.from_numpy(h.reshape(shape).copy()),
            torch.from_numpy(c.reshape(shape).copy()),
            torch.from_numpy(mean.copy()),
            torch.from_numpy(std.copy()),
            stats=torch.from_numpy(stats.astype(np.float64)) if self.stats else None,
        )


def _head(kind: bytes, session_id: str) -> tuple[bytes, bytes]:
    raw = session_id.encode()
    return _ID.pack(kind, len(raw)), raw


def put_entry(session: Session, state: bytes) -> bytes:
    head, raw = _head(PUT, session.id)
    fields = _PUT.pack(session.t, session.ttl_s, session.created_at, session.last_active)
    return head + raw + fields + state


def step_entry(session_id: str, t: int, at: float, state: bytes, record: bytes) -> bytes:
    head, raw = _head(STEP, session_id)
    return head + raw + _STEP.pack(t, at, len(record)) + state + record


def round_entry(group: Group, commits: list[Commit], at: float) -> bytes:
    """The steps of one batched forward (all of ``group``'s rows that are committed), as one
    columnar entry."""
    assert group.mean is not None and group.std is not None and group.z is not None
    rows = [c.computed.row for c in commits]
    ids = [c.session.id.encode() for c in commits]
    batch, steps, features = group.mean.shape
    whole = len(rows) == batch and rows == list(range(batch))  # else refused ones, or reordered
    states = _state_rows(group)

    def column(x: torch.Tensor) -> bytes:
        a = _array(x) if whole else _array(x)[rows]
        return np.ascontiguousarray(a, dtype="<f4").tobytes()

    return b"".join(
        [
            _ROUND.pack(ROUND, len(commits), steps, features, at),
            np.array([len(i) for i in ids], dtype="<u2").tobytes(),
            *ids,
            np.array([c.seq for c in commits], dtype="<i8").tobytes(),
            np.array([c.t for c in commits], dtype="<i8").tobytes(),
            *[c.digest for c in commits],
            (states if whole else states[rows]).tobytes(),
            column(group.mean),
            column(group.std),
            column(group.z),
        ]
    )


def _read_ids(payload: bytes, offset: int, n: int) -> tuple[list[str], int]:
    """``n`` session ids written as n u16 lengths then the ids; the offset after them."""
    lengths = np.frombuffer(payload, "<u2", n, offset).tolist()
    offset += 2 * n
    ids = []
    for length in lengths:
        ids.append(payload[offset : offset + length].decode())
        offset += length
    return ids, offset


def _apply_round(
    payload: bytes, offset: int, sessions: dict[str, Replayed], layout: StateLayout
) -> int:
    """A ``round_entry`` onto ``sessions``; the offset after it."""
    _, n, steps, features, at = _ROUND.unpack_from(payload, offset)
    offset += _ROUND.size
    ids, offset = _read_ids(payload, offset, n)
    seqs = np.frombuffer(payload, "<i8", n, offset).tolist()
    ts = np.frombuffer(payload, "<i8", n, offset + 8 * n).tolist()
    offset += 16 * n
    digests = payload[offset : offset + 16 * n]
    offset += 16 * n
    states = payload[offset : offset + n * layout.nbytes]
    offset += n * layout.nbytes
    cells = n * steps * features
    columns = []
    for _ in range(3):
        values = np.frombuffer(payload, "<f4", cells, offset).reshape(n, steps, features)
        columns.append(values.tolist())
        offset += 4 * cells
    means, stds, zs = columns
    for i, session_id in enumerate(ids):
        entry = sessions.get(session_id)
        if entry is None:
            continue  # see apply_group
        # What its answer said: no score for the values before the model's first scored one
        # (NaN rows; a journal from before them wrote the first value's z, refused at seq 0).
        anomaly: list[list[float] | None] = [None if row[0] != row[0] else row for row in zs[i]]
        if seqs[i] == 0:
            anomaly[0] = None
        done = StepDone(ts[i], Outputs(means[i], stds[i], anomaly, None))
        digest = digests[16 * i : 16 * (i + 1)]
        entry.header["t"], entry.header["last_active"] = ts[i], at
        entry.header.pop("last_step", None)
        entry.state = states[i * layout.nbytes : (i + 1) * layout.nbytes]
        entry.record = pack_step(AppliedStep(seqs[i], digest, done), at)
    return offset


def delete_entry(session_id: str) -> bytes:
    head, raw = _head(DELETE, session_id)
    return head + raw


@dataclass
class Replayed:
    """A session as the snapshot and the journal records so far leave it."""

    header: dict[str, Any]  # a snapshot entry's header: model, session_id, t, times, ttl_s
    state: SessionState | bytes  # bytes: an entry's, decoded once replay is done
    record: bytes | None = None  # the journal's last step (pack_step); None: the header's, if any


def apply_group(
    payload: bytes, sessions: dict[str, Replayed], layout: StateLayout, model: dict[str, str]
) -> None:
    """One commit group's entries onto ``sessions``. A step or reset of a session not there is
    skipped: only a journal replayed again over the snapshot that holds it has one (the session
    was deleted later in that same journal)."""
    offset, size = 0, layout.nbytes
    while offset < len(payload):
        if payload[offset : offset + 1] == ROUND:
            offset = _apply_round(payload, offset, sessions, layout)
            continue
        kind, n = _ID.unpack_from(payload, offset)
        offset += _ID.size
        session_id = payload[offset : offset + n].decode()
        offset += n
        if kind == PUT:
            t, ttl_s, created_at, last_active = _PUT.unpack_from(payload, offset)
            offset += _PUT.size
            header = {
                **model,
                "session_id": session_id,
                "t": t,
                "ttl_s": ttl_s,
                "created_at": created_at,
                "last_active": last_active,
            }
            sessions[session_id] = Replayed(header, payload[offset : offset + size])
            offset += size
        elif kind == STEP:
            t, last_active, record_len = _STEP.unpack_from(payload, offset)
            offset += _STEP.size
            state = payload[offset : offset + size]
            offset += size
            record = payload[offset : offset + record_len]
            offset += record_len
            entry = sessions.get(session_id)
            if entry is not None:
                entry.header["t"], entry.header["last_active"] = t, last_active
                entry.header.pop("last_step", None)
                entry.state, entry.record = state, record or None
        elif kind == DELETE:
            sessions.pop(session_id, None)
        else:
            raise BlobError(f"a journal entry of unknown kind {kind!r}")
    if offset != len(payload):
        raise BlobError("a journal record's entries overrun it")


def journal_header(model: tuple[str, str], layout: StateLayout, *, base: bool = False) -> bytes:
    return json.dumps(
        {
            "format": FORMAT,
            "base": base,
            "model": model[0],
            "model_version": model[1],
            "layers": layout.layers,
            "hidden": layout.hidden,
            "features": layout.features,
            "stats": layout.stats,
        },
        sort_keys=True,
    ).encode()


def _check_header(record: bytes, layout: StateLayout, *, base: bool) -> dict[str, str]:
    """A file's header record checked against the layout; the model its states belong to."""
    try:
        header = json.loads(record)
        shapes = (
            int(header["layers"]),
            int(header["hidden"]),
            int(header["features"]),
            int(header.get("stats", 0)),  # journals from before statistics keep none
        )
        model = {"model": str(header["model"]), "model_version": str(header["model_version"])}
    except (ValueError, KeyError, TypeError) as e:
        raise BlobError(f"not a session journal: {e}") from e
    if header.get("format") != FORMAT or bool(header.get("base")) != base:
        raise BlobError(f"not a session journal {'base' if base else 'file'}")
    if shapes != (layout.layers, layout.hidden, layout.features, layout.stats):
        raise BlobError(f"the journal holds states of shape {shapes}, not this model's")
    return model


@dataclass
class Replay:
    """What reading a journal file found."""

    groups: int = 0
    dropped_bytes: int = 0  # a torn (or damaged) last record, and whatever followed it


def replay_file(data: bytes, sessions: dict[str, Replayed], layout: StateLayout) -> Replay:
    """A journal file's groups onto ``sessions``; BlobError if it is not one (a file whose
    header record is torn holds nothing: it was created, then the process died)."""
    records, dropped = read_records(data)
    if not records:
        return Replay(0, dropped)
    model = _check_header(records[0], layout, base=False)
    for payload in records[1:]:
        apply_group(payload, sessions, layout, model)
    return Replay(len(records) - 1, dropped)


# --- one journal file ----------------------------------------------------------------------------


class JournalFile:
    """One journal file, open for appending: the one owner of its descriptor (``with``, or
    ``close``). Each ``append`` is one record and one ``write(2)``; ``sync`` waits until the disk
    has everything up to an offset, one fdatasync serving every group that waits on it."""

    def __init__(self, path: Path, header: bytes, *, fsync: bool) -> None:
        self.path = path
        self.fsync = fsync
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self.size = 0
        self._synced = 0
        self._sync_lock: asyncio.Lock | None = None
        self.broken = False  # a failed write could not be taken back: nothing more is appended
        try:
            self.append(frame(header))
            if fsync:
                os.fdatasync(self._fd)
                fsync_dir(path.parent)
                self._synced = self.size
        except BaseException:
            self.close()
            raise

    def append(self, record: bytes) -> int:
        """Write one framed record; the file's size after it. On an error the file is cut back
        to where it was (a half-written record would hide every later one), or, failing that,
        marked broken."""
        if self.broken or self._fd < 0:
            raise OSError(f"the journal {self.path} is closed or could not be written")
        start = self.size
        view = memoryview(record)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                self.broken = True
            raise
        self.size = start + len(record)
        return self.size

    async def sync(self, upto: int) -> None:
        """In fsync mode, return once the disk holds the file up to ``upto``: in a thread, so
        the loop keeps filling the next batch meanwhile; whoever waits while one runs is
        covered by the next (group commit). A no-op in write mode."""
        if not self.fsync or self._synced >= upto:
            return
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        async with self._sync_lock:
            if self._synced >= upto:  # the fdatasync we waited behind covered us
                return
            if self.broken:  # it failed: a second fdatasync may report success for lost pages
                raise OSError(f"an earlier fdatasync of {self.path} failed")
            target, fd = self.size, self._fd
            job = asyncio.ensure_future(asyncio.to_thread(os.fdatasync, fd))
            try:
                await asyncio.shield(job)
            except asyncio.CancelledError:
                # Its thread goes on with the descriptor: the lock is held until it ends, and
                # its failure still marks the file (a cancelled waiter let go of the lock while
                # it ran, and its error was lost; a review).
                while not job.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(job)
                if job.exception() is not None:
                    self.broken = True
                else:
                    self._synced = max(self._synced, target)
                raise
            except OSError:
                self.broken = True  # what the kernel held may be gone: trust nothing after
                raise
            self._synced = max(self._synced, target)

    def close(self) -> None:
        """Close the file; in fsync mode after a last fdatasync, so whoever still waits on
        ``sync`` finds its groups on the disk."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                if self.fsync and self._synced < self.size and not self.broken:
                    os.fdatasync(fd)
                    self._synced = self.size
            finally:
                os.close(fd)

    async def aclose(self) -> None:
        """``close`` once no ``sync`` of it is running (its thread holds the descriptor)."""
        if self._sync_lock is None:
            self.close()
            return
        async with self._sync_lock:
            self.close()

    def __enter__(self) -> JournalFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --- the store's files --------------------------------------------------------------------------


@dataclass
class Recovery:
    """What a start found on disk and restored."""

    restored: Restored
    journals: int = 0  # journal files replayed
    groups: int = 0  # commit groups replayed from them
    dropped_bytes: int = 0  # torn or damaged last records dropped


_BASE = struct.Struct("<cI")  # kind, sessions


@dataclass
class _Capture:
    """Every session as of one instant, copied on the loop (its bookkeeping by whole arrays,
    its states by one copy of their pool rows), written as a base in a thread: a few
    microseconds a session, where a snapshot's blobs cost a hundred (JSON, a digest each)."""

    ids: list[bytes]
    records: list[bytes]  # each session's last step, packed (sessions.pack_step); b"": none
    t: np.ndarray  # int64
    ttl_s: np.ndarray  # float64
    created_at: np.ndarray
    last_active: np.ndarray
    states: np.ndarray  # (N, ...) in a state's byte layout (_rows)

    def payload(self) -> bytes:
        """``b"B" | u32 n | n x u16 id length | ids | n x i64 t | n x f64 ttl_s, created_at,
        last_active | n x state | n x u32 record length | records``."""
        return b"".join(
            [
                _BASE.pack(BASE, len(self.ids)),
                np.array([len(i) for i in self.ids], dtype="<u2").tobytes(),
                *self.ids,
                self.t.astype("<i8").tobytes(),
                self.ttl_s.astype("<f8").tobytes(),
                self.created_at.astype("<f8").tobytes(),
                self.last_active.astype("<f8").tobytes(),
                np.ascontiguousarray(self.states).tobytes(),
                np.array([len(r) for r in self.records], dtype="<u4").tobytes(),
                *self.records,
            ]
        )


def read_base(data: bytes, layout: StateLayout) -> dict[str, Replayed]:
    """A base file's sessions; BlobError if it is not one whole (it is written under another
    name and renamed, so a crash never leaves half of one)."""
    records, dropped = read_records(data)
    if len(records) != 2 or dropped:
        raise BlobError("a base of the session journal is damaged")
    model = _check_header(records[0], layout, base=True)
    payload = records[1]
    kind, n = _BASE.unpack_from(payload)
    if kind != BASE:
        raise BlobError("a base of the session journal holds no sessions")
    offset = _BASE.size
    ids, offset = _read_ids(payload, offset, n)
    t = np.frombuffer(payload, "<i8", n, offset).tolist()
    offset += 8 * n
    ttl, created, active = (
        np.frombuffer(payload, "<f8", n, offset + 8 * n * k).tolist() for k in range(3)
    )
    offset += 24 * n
    size = layout.nbytes
    states = payload[offset : offset + n * size]
    offset += n * size
    record_lengths = np.frombuffer(payload, "<u4", n, offset).tolist()
    offset += 4 * n
    sessions = {}
    for i, session_id in enumerate(ids):
        record = payload[offset : offset + record_lengths[i]]
        offset += record_lengths[i]
        header = {
            **model,
            "session_id": session_id,
            "t": t[i],
            "ttl_s": ttl[i],
            "created_at": created[i],
            "last_active": active[i],
        }
        sessions[session_id] = Replayed(header, states[i * size : (i + 1) * size], record or None)
    if offset != len(payload):
        raise BlobError("a base of the session journal has trailing bytes")
    return sessions


class StoreFiles:
    """The embedded store on disk: its snapshot, its journal beside it, and their compaction.

    Built with the snapshot's path, the mode, the compaction limit, the model (name, version)
    states belong to, and ``header_of`` (a session's snapshot header: ``Engine.blob_header``).
    ``recover`` at start, then ``open``; while serving, ``commit`` is the batcher's persist hook
    and ``created``/``reset``/``deleted`` journal the rest; ``close`` at a clean stop.
    """

    def __init__(
        self,
        snapshot: Path,
        mode: JournalMode | str,
        max_bytes: int,
        *,
        model: tuple[str, str],
        header_of: Callable[[Session], dict[str, Any]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.snapshot = snapshot
        self.mode = JournalMode(mode)
        self.max_bytes = max_bytes
        self.model = model
        self.header_of = header_of
        self.clock = clock
        self.store: SessionStore | None = None
        self.layout: StateLayout | None = None
        self._file: JournalFile | None = None
        self._generation = 0
        self._zero: bytes = b""
        # Entries appended whose change is not yet in the pool (a round's states, a reset, a
        # delete: applied once on the disk): no compaction captures the pool meanwhile.
        self._unapplied = 0
        self._compaction: asyncio.Task[None] | None = None
        self._snapshot_lock = threading.Lock()  # one snapshot or base written at a time
        self._base_bytes = 0
        self._closed = False
        # A journal broke (a failed fdatasync): writes wait for the compaction it started, so
        # nothing is answered on top of a journal whose last records may be gone.
        self._unsafe = False
        self._retiring: set[asyncio.Task[None]] = set()
        self.rejected: list[Path] = []  # the files the last refusal set aside, as renamed

    @property
    def journalled(self) -> bool:
        return self.mode is not JournalMode.OFF

    @property
    def healthy(self) -> bool:
        return not self._unsafe and (self._file is None or not self._file.broken)

    # --- start ----------------------------------------------------------------------------------

    def journals(self) -> list[tuple[int, Path]]:
        """The journal files beside the snapshot, oldest first."""
        return self._numbered("journal")

    def bases(self) -> list[tuple[int, Path]]:
        """The bases beside the snapshot (every session as of the start of the journal of the
        same number), oldest first."""
        return self._numbered("base")

    def _numbered(self, kind: str) -> list[tuple[int, Path]]:
        pattern = re.compile(re.escape(self.snapshot.name) + rf"\.{kind}\.(\d+)")
        found = []
        if self.snapshot.parent.is_dir():
            for path in self.snapshot.parent.iterdir():
                match = pattern.fullmatch(path.name)
                if match:
                    found.append((int(match.group(1)), path))
        return sorted(found)

    def recover(
        self,
        store: SessionStore,
        check: Callable[[dict[str, Any], SessionState], None],
        *,
        now: float,
        migrate: Migrator | None = None,
    ) -> Recovery | None:
        """The snapshot and the journals after it, into ``store``, all or nothing; None if there
        was neither. SnapshotRefused, with the files kept aside as ``….rejected``, if they
        cannot be restored whole (another model's, a bad entry, no room; ``rejected`` names
        them). ``migrate``: the
        entries of a snapshot of another version (a restart with a new model), moved to this
        one, each by its window (those that cannot move are left out: it says which)."""
        self._bind(store)
        assert self.layout is not None
        journals, bases = self.journals(), self.bases()
        self._generation = max((g for g, _ in journals + bases), default=0)
        if not self.snapshot.exists() and not journals and not bases:
            return None
        recovery = Recovery(Restored(0, 0))
        on_disk = journals + bases  # all set aside, if refused
        if self._stopped_after(on_disk):
            # A clean stop's snapshot, the removal of the files it holds cut short by a crash:
            # it alone holds every version's sessions and their windows (the newest base won,
            # and they were lost; a review). Those files go once the start writes its base.
            journals, bases = [], []
        try:
            sessions: dict[str, Replayed] = {}
            since = 0
            if bases:  # the newest base holds everything before its journal: the snapshot too
                since, newest = bases[-1]
                sessions = read_base(newest.read_bytes(), self.layout)
            elif self.snapshot.exists():
                for header, state in read_snapshot(self.snapshot):
                    sessions[str(header["session_id"])] = Replayed(header, state)
            for generation, path in journals:
                if generation < since:
                    continue  # held by the base (its removal was cut short)
                found = replay_file(path.read_bytes(), sessions, self.layout)
                recovery.journals += 1
                recovery.groups += found.groups
                recovery.dropped_bytes += found.dropped_bytes
                if found.dropped_bytes:
                    log.warning(
                        "%s: %d bytes of a torn last record dropped (a crash mid-write: never "
                        "answered)",
                        path,
                        found.dropped_bytes,
                    )
            entries = [self._entry(e) for e in sessions.values()]
            if migrate is not None and not bases and not journals:
                entries = migrate(entries)
        except (BlobError, KeyError, TypeError, ValueError, UnicodeDecodeError, struct.error) as e:
            self._reject(on_disk)
            raise SnapshotRefused(str(e)) from e
        try:
            recovery.restored = restore_entries(entries, store, check, now=now)
        except SnapshotRefused:
            self._reject(on_disk)
            raise
        return recovery

    def _stopped_after(self, files: list[tuple[int, Path]]) -> bool:
        """Whether the snapshot was written after every one of ``files``: at a clean stop, once
        the journal was closed (a base's compaction removes the snapshot, after its rename)."""
        if not files or not self.snapshot.exists():
            return False
        written = self.snapshot.stat().st_mtime_ns
        return all(path.stat().st_mtime_ns < written for _, path in files)

    def open(self, store: SessionStore) -> None:
        """Start serving from what ``store`` holds: with a journal, a new journal file and its
        base (what was restored), then the old files removed; without one, the old files
        removed (a later crash must not roll sessions back to them)."""
        self._bind(store)
        if self.journalled:
            capture = self._capture()
            self._open_next()
            self._write_base(capture, self._generation)
        else:
            for _, path in self.journals() + self.bases():
                path.unlink()
            self.snapshot.unlink(missing_ok=True)

    def _bind(self, store: SessionStore) -> None:
        self.store = store
        pool = store.pool
        self.layout = StateLayout(
            pool.h.shape[0], pool.h.shape[2], pool.next_mean.shape[1], pool.stats_width
        )
        self._zero = self.layout.to_bytes(pool.zero_state())

    def _entry(self, replayed: Replayed) -> tuple[dict[str, Any], SessionState]:
        assert self.layout is not None
        header, state = replayed.header, replayed.state
        if isinstance(state, bytes):
            state = self.layout.from_bytes(state)
        if replayed.record is not None:
            header["last_step"] = step_to_json(*unpack_step(replayed.record))
        return header, state

    def _reject(self, files: list[tuple[int, Path]]) -> None:
        """The snapshot and these files set aside as ``….rejected``, or ``….rejected.N`` (the
        least N free for all of them) where an earlier rejection's are: never overwritten (a
        switch of model and back again lost the first set; found by an outside test run)."""
        paths = [p for p in [self.snapshot, *(p for _, p in files)] if p.exists()]
        suffix, n = ".rejected", 0
        while any(p.with_name(p.name + suffix).exists() for p in paths):
            n += 1
            suffix = f".rejected.{n}"
        self.rejected = [path.with_name(path.name + suffix) for path in paths]
        for path, aside in zip(paths, self.rejected, strict=True):
            path.replace(aside)

    # --- while serving -------------------------------------------------------------------------

    async def commit(self, commits: list[Commit]) -> list[BaseException | None]:
        """The batcher's persist hook: a round's steps as one group, appended (and in fsync
        mode on the disk) before any of them is answered; each None, or the error to answer."""
        failure = self._writable()
        if failure is not None:
            return [failure] * len(commits)
        assert self._file is not None and self.layout is not None
        at = self.clock()
        by_group: dict[Group, list[Commit]] = {}
        for c in commits:
            by_group.setdefault(c.computed.group, []).append(c)
        parts = []
        for group, steps in by_group.items():
            if group.mean is not None and steps[0].computed.outputs.gates is None:
                parts.append(round_entry(group, steps, at))
                continue
            rows = _state_rows(group)  # the rare steps that returned gates: one entry each
            for c in steps:
                done = StepDone(c.t, c.computed.outputs)
                record = pack_step(AppliedStep(c.seq, c.digest, done), at)
                state = rows[c.computed.row].tobytes()
                parts.append(step_entry(c.session.id, c.t, at, state, record))
        error = await self._append(b"".join(parts), unapplied=True)
        return [error] * len(commits)

    async def created(self, session: Session, state: SessionState | None = None) -> None:
        """A session created (the zero state) or imported (``state``), already in the store."""
        failure = self._writable()
        if failure is not None:
            raise failure
        assert self.layout is not None
        raw = self._zero if state is None else self.layout.to_bytes(state)
        entry = put_entry(session, raw)
        record = session.step_record()
        if record:  # a migrated session's last step: its retry is answered after a crash too
            entry += step_entry(session.id, session.t, self.clock(), raw, record)
        error = await self._append(entry)
        if error is not None:
            raise error

    async def reset(self, session: Session, apply: Callable[[], None]) -> None:
        """A reset (t 0, the zero state, no last step), journalled (in fsync mode on the disk),
        then ``apply``-ed; nothing is reset if it cannot be journalled (it was applied before
        the fdatasync, and stayed applied when that failed; a review)."""
        failure = self._writable()
        if failure is not None:
            raise failure
        entry = step_entry(session.id, 0, self.clock(), self._zero, b"")
        await self._append_then(entry, apply)

    async def deleted(self, session: Session, apply: Callable[[], None]) -> None:
        """A delete, journalled (in fsync mode on the disk), then ``apply``-ed; nothing is
        deleted if it cannot be journalled."""
        failure = self._writable()
        if failure is not None:
            raise failure
        await self._append_then(delete_entry(session.id), apply)

    async def _append_then(self, entry: bytes, apply: Callable[[], None]) -> None:
        """Append ``entry``, then (no await since the verdict: no compaction captured the pool
        in between) ``apply`` its change, or raise the error to answer. A caller cancelled while
        it is synced has it in the journal all the same: applied then too (a delete left unapplied
        kept serving a session whose later steps a crash's replay then dropped; a review)."""
        try:
            error = await self._append(entry, unapplied=True)
        except asyncio.CancelledError:
            apply()
            raise
        if error is not None:
            raise error
        apply()

    def _writable(self) -> ServiceError | None:
        if self._closed or self._file is None:
            return ShuttingDown("the service is stopping: retry the request (with the same seq)")
        self._maybe_compact()
        if self._file.broken or self._unsafe:
            return StoreUnavailable("the session journal cannot be written (see the server log)")
        return None

    async def _append(self, payload: bytes, *, unapplied: bool = False) -> ServiceError | None:
        """Append one entry and (fsync mode) wait for the disk; None, or the error to answer.
        ``unapplied``: the caller applies the entry's change after a None, with no await in
        between, so no compaction may capture the pool until then."""
        assert self._file is not None
        file = self._file
        try:
            end = file.append(frame(payload))
        except OSError as e:
            log.error("the session journal %s could not be written: %s", file.path, e)
            return StoreUnavailable("the session journal cannot be written (see the server log)")
        self._unapplied += unapplied
        try:
            await file.sync(end)
        except OSError as e:
            log.error("the session journal %s could not be synced: %s", file.path, e)
            failed = True
        else:
            failed = False
        finally:
            self._unapplied -= unapplied
        if not failed:
            return None
        # Nothing of this entry is applied: the compaction that mends the journal may start once
        # the caller has undone what it did before it (a create: the session dropped); it
        # waited for the next write before, and with no traffic never came (a review).
        asyncio.get_running_loop().call_soon(self._maybe_compact)
        return StoreUnavailable("the session journal cannot be written (see the server log)")

    def _maybe_compact(self) -> None:
        """Start a compaction when the journal outgrew its limit (and the snapshot) or broke;
        never while a round's group is appended and its states not yet in the pool (the capture
        would miss them while the journal holding them goes)."""
        file = self._file
        if file is None or self._closed or self._unapplied or self._compaction is not None:
            return
        force = file.broken or self._unsafe
        if not force and file.size < max(self.max_bytes, self._base_bytes):
            return
        try:
            capture = self._capture()
            self._open_next()
        except OSError as e:
            log.error("a new session journal could not be opened: %s", e)
            return
        self._unsafe = force
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self._write_base, capture, self._generation),
            name="journal-compaction",
        )
        self._compaction = task
        task.add_done_callback(self._compacted)

    def _compacted(self, task: asyncio.Task[None]) -> None:
        self._compaction = None
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("a compaction of the session journal failed: %s", task.exception())
            return
        if self._unsafe:
            log.warning("the session journal works again: a new base holds what was answered")
        self._unsafe = False

    def _open_next(self) -> None:
        assert self.layout is not None
        self._generation += 1
        path = self.snapshot.with_name(f"{self.snapshot.name}.journal.{self._generation}")
        self.snapshot.parent.mkdir(parents=True, exist_ok=True)
        new = JournalFile(
            path, journal_header(self.model, self.layout), fsync=self.mode is JournalMode.FSYNC
        )
        old, self._file = self._file, new
        if old is not None:  # once no fdatasync of it is running: one may be, for a create
            retire = asyncio.get_running_loop().create_task(old.aclose())
            self._retiring.add(retire)
            retire.add_done_callback(self._retiring.discard)

    def _capture(self) -> _Capture:
        """Every session as it stands, on the loop: their bookkeeping by whole arrays, their
        states by one copy of their rows of the pool."""
        assert self.store is not None
        sessions = self.store.sessions()
        pool, meta = self.store.pool, self.store.slots
        index = np.array([s.slot for s in sessions], dtype=np.int64)
        slots = torch.from_numpy(index).to(pool.h.device)
        return _Capture(
            [s.id.encode() for s in sessions],
            [s.step_record() or b"" for s in sessions],
            np.frombuffer(meta.t, dtype=np.int64)[index],
            np.array([s.ttl_s for s in sessions], dtype=np.float64),
            np.frombuffer(meta.created_at, dtype=np.float64)[index],
            np.frombuffer(meta.last_active, dtype=np.float64)[index],
            _rows(
                pool.h.index_select(1, slots),
                pool.c.index_select(1, slots),
                pool.next_mean.index_select(0, slots),
                pool.next_std.index_select(0, slots),
                pool.gather_stats(slots),
            ),
        )

    def _write_base(self, capture: _Capture, generation: int) -> None:
        """The capture as base ``generation`` (written aside, then renamed in), then what it
        holds removed: older bases and journals, and the snapshot."""
        assert self.layout is not None
        with self._snapshot_lock:
            if self._closed:  # a compaction run late, after the clean stop: its capture is
                return  # older than the snapshot, which it would have removed (a review)
            path = self.snapshot.with_name(f"{self.snapshot.name}.base.{generation}")
            tmp = path.with_name(path.name + ".tmp")
            header = journal_header(self.model, self.layout, base=True)
            data = frame(header) + frame(capture.payload())
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
            fsync_dir(path.parent)
            self._base_bytes = len(data)
            for older, file in self.journals() + self.bases():
                if older < generation:
                    file.unlink(missing_ok=True)
            self.snapshot.unlink(missing_ok=True)

    # --- stop ----------------------------------------------------------------------------------

    def close(self, others: list[tuple[SessionStore, Any]] | None = None) -> int:
        """At a clean stop: every session into the snapshot (``others``: the stores of other
        model versions too, which a restart migrates), the journals removed, the journal closed
        (a later write is refused ``shutting_down``); how many sessions were written."""
        assert self.store is not None
        self._closed = True
        with self._snapshot_lock:  # after a compaction still writing, never before it
            n = save_sessions(self.snapshot, self.store, self.header_of, others)
            if self._file is not None:
                self._file.close()
            # Bases first, oldest first: cut short, what is left is a base with the journals
            # after it, or the snapshot with journals it holds already (replayed again: no change)
            for _, path in self.bases() + self.journals():
                path.unlink(missing_ok=True)
        return n


def _state_rows(group: Group) -> np.ndarray:
    """A batch's new states, one row each in a state's byte layout (h, c, mean, std), made in
    one conversion: per-row tensor views cost more than the batch's step."""
    return _rows(group.h, group.c, group.next_mean, group.next_std, group.stats)


def _rows(
    h: torch.Tensor,
    c: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    stats: torch.Tensor | None = None,
) -> np.ndarray:
    """States (h, c as (layers, N, hidden); mean, std as (N, F); the statistics (N, S) if the
    model keeps any) as N rows, each a state's bytes once ``tobytes``'d: float32, or, with
    statistics, bytes (float32 then float64). In numpy (on a CPU the tensors' own memory: a
    round's handful of torch ops cost more than its step)."""
    ha, ca, ma, sa = _array(h), _array(c), _array(mean), _array(std)
    n, lh = ma.shape[0], ha.shape[0] * ha.shape[2]
    rows = np.concatenate(
        [ha.transpose(1, 0, 2).reshape(n, lh), ca.transpose(1, 0, 2).reshape(n, lh), ma, sa], axis=1
    ).astype("<f4", copy=False)
    if stats is None or not stats.shape[1]:
        return rows
    kept = stats.detach().cpu().numpy().astype("<f8")
    return np.concatenate([rows.view(np.uint8), kept.view(np.uint8)], axis=1)


def _array(x: torch.Tensor) -> np.ndarray:
    """A tensor's values as float32 numpy: a view of a CPU tensor's memory, else a copy."""
    a = x.detach().numpy() if x.device.type == "cpu" else x.detach().cpu().numpy()
    return a.astype(np.float32, copy=False)


__all__ = [
    "JournalFile",
    "JournalMode",
    "Recovery",
    "StateLayout",
    "StoreFiles",
    "frame",
    "read_records",
    "replay_file",
]
