"""The embedded store's snapshot: every live session written at shutdown, read back at start
(with the journal after it, ``service.journal``, replayed over it).

A snapshot file is ``b"LSTMSNAP1\\n"``, a u32 count, then each session as a u32 length and a
state blob (``service.state_blob``: checksummed, no pickle). It is written to a temporary file
and renamed, so a crash mid-write leaves the previous file or none, never half of one.

A session's header may carry ``last_step`` (``step_to_json``): its last applied step, with
when it was recorded, so a retry of it right after a restart is answered again, not refused.
JSON keeps the outputs' doubles exact (Python writes the shortest repr that reads back equal).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import ServiceError, TooManySessions, TTLTooLong
from service.sessions import AppliedStep, Session, SessionStore, step_from_dict, step_to_dict
from service.state_blob import BlobError, SessionState, decode, encode

MAGIC = b"LSTMSNAP1\n"


class SnapshotRefused(Exception):
    """The snapshot cannot be restored whole; nothing of it was restored."""


class SnapshotInUse(Exception):
    """Another process holds this snapshot path: a server serving from it."""


# The snapshot paths this process holds, each by an open lock file: path -> its descriptor.
_HELD: dict[Path, int] = {}


def hold_snapshot(path: Path, holder: str) -> bool:
    """Hold ``path`` and its journal for this process until it exits (an exclusive ``flock`` of
    ``<path>.lock``, which the kernel lets go of however the process ends, ``kill -9`` too);
    ``holder`` (who is serving: the server's pid, host) is written in it for the next to read.

    A second server started with the same ``LSTM_SNAPSHOT_PATH`` (two from one checkout) would
    restore the first's live sessions and remove the journal the first is writing, so the steps
    the first answers after that are gone at its crash (found by an outside test run). Where
    another process holds it: ``SnapshotInUse``, naming that holder. Again in this process:
    True, nothing more (several services in one process, as tests make, share one snapshot
    anyway). False where the filesystem has no locks (NFS without lockd, some FUSE mounts):
    unheld, as before. Any other failure to open the lock file: its OSError."""
    key = path.resolve()
    if key in _HELD:
        return True
    key.parent.mkdir(parents=True, exist_ok=True)
    lock = key.with_name(key.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
        writable = True
    except PermissionError:  # another user's lock file (a server once run as root): lock it
        fd, writable = os.open(lock, os.O_RDONLY), False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SnapshotInUse(f"{path} is in use by another server ({other})") from None
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
            return False
        raise
    if writable:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder}\n".encode(), 0)
    _HELD[key] = fd
    return True


@dataclass(frozen=True)
class Restored:
    sessions: int  # restored
    expired: int  # skipped: their TTL ran out while the service was down
    evicted: int = 0  # the oldest, left out for want of room (LSTM_EVICT_WHEN_FULL only)


HeaderOf = Callable[[Session], dict[str, Any]]


def snapshot_entries(
    store: SessionStore, header_of: HeaderOf
) -> list[tuple[dict[str, Any], SessionState]]:
    """Every session of ``store``: ``header_of`` it with its last applied step, and its state."""
    sessions = []
    for session in store.sessions():
        header = header_of(session)
        recorded = session.recorded_step()
        if recorded is not None:  # a retry right after the restart is answered from it
            header["last_step"] = step_to_json(*recorded)
        sessions.append((header, store.pool.read(session.slot)))
    return sessions


def save_sessions(
    path: Path,
    store: SessionStore,
    header_of: HeaderOf,
    others: list[tuple[SessionStore, HeaderOf]] | None = None,
) -> int:
    """Every session of ``store`` (and of ``others``: the stores of other model versions, whose
    sessions a restart migrates) into a snapshot at ``path``; how many."""
    sessions = snapshot_entries(store, header_of)
    for other, other_header in others or []:
        sessions += snapshot_entries(other, other_header)
    write_snapshot(path, sessions)
    return len(sessions)


def restore_sessions(
    path: Path,
    store: SessionStore,
    check: Callable[[dict[str, Any], SessionState], None],
    *,
    now: float,
) -> Restored:
    """The snapshot's sessions back into ``store``, all or nothing (``restore_entries``)."""
    try:
        entries = read_snapshot(path)
    except BlobError as e:
        raise SnapshotRefused(str(e)) from e
    return restore_entries(entries, store, check, now=now)


def restore_entries(
    entries: list[tuple[dict[str, Any], SessionState]],
    store: SessionStore,
    check: Callable[[dict[str, Any], SessionState], None],
    *,
    now: float,
) -> Restored:
    """Sessions (a snapshot's, with its journal's changes: ``service.journal``) into ``store``,
    all or nothing.

    Every entry is read and checked (``check``: its model, its shapes; the store's TTL limit and
    room) before the first is restored, and a restore that fails after all undoes the ones
    before it: a snapshot is never half restored. SnapshotRefused says why. The one exception
    is the one a store that evicts when full makes anyway: too many for its room, the newest
    that fit come back and ``Restored.evicted`` says how many did not.
    """
    try:
        entries = sorted(entries, key=lambda e: float(e[0]["last_active"]))
        live, expired = [], []
        for header, state in entries:
            check(header, state)
            if float(header["last_active"]) + float(header["ttl_s"]) <= now:
                expired.append(str(header["session_id"]))  # while the service was down
                continue
            if float(header["ttl_s"]) > store.limits.max_ttl_s:
                raise TTLTooLong(
                    f"session {header['session_id']!r} has ttl_s {header['ttl_s']}, over "
                    f"LSTM_MAX_SESSION_TTL_S = {store.limits.max_ttl_s}"
                )
            last = header.get("last_step")
            live.append((header, state, None if last is None else step_from_json(last)))
        room = store.limits.max_sessions - len(store)
        evicted = max(0, len(live) - room)
        if evicted and not store.limits.evict_when_full:
            raise TooManySessions(
                f"{len(live)} sessions to restore, room for {room} (LSTM_MAX_SESSIONS)"
            )
        # oldest first: with eviction on, the newest that fit come back
        no_room, live = live[:evicted], live[evicted:]
    except (BlobError, ServiceError, KeyError, TypeError, ValueError) as e:
        raise SnapshotRefused(str(e)) from e
    restored: list[Session] = []
    try:
        for header, state, last in live:
            session = store.restore(
                header["session_id"],
                state,
                t=int(header["t"]),
                ttl_s=float(header["ttl_s"]),
                created_at=float(header["created_at"]),
            )
            restored.append(session)
            session.last_active = float(header["last_active"])
            if last is not None and last[1] + store.limits.replay_window_s > now:
                session.restore_step(*last)
    except (ServiceError, KeyError, TypeError, ValueError) as e:
        for session in restored:  # all or nothing
            store.drop(session)
        raise SnapshotRefused(str(e)) from e
    # Asked for, they answer as they would have with no restart between (a plain 404 before;
    # an outside test run).
    for session_id in expired:
        store.remember_gone(session_id, "expired")
    for header, _, _ in no_room:
        store.remember_gone(str(header["session_id"]), "evicted")
    return Restored(len(restored), len(entries) - len(live) - evicted, evicted)


def set_aside(path: Path, suffix: str, sessions: list[tuple[dict[str, Any], SessionState]]) -> Path:
    """``sessions`` as a snapshot of their own beside ``path``: ``….suffix``, or ``….suffix.N``
    (the least N free) where one is already; never over an earlier one. Its path."""
    aside, n = path.with_name(path.name + suffix), 0
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}{suffix}.{n}")
    write_snapshot(aside, sessions)
    return aside


def write_snapshot(path: Path, sessions: list[tuple[dict[str, Any], SessionState]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(MAGIC + struct.pack("<I", len(sessions)))
        for header, state in sessions:
            blob = encode(state, header)
            f.write(struct.pack("<I", len(blob)) + blob)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)  # the rename itself survives a power loss before a journal goes


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a file created, renamed or removed) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_snapshot(path: Path) -> list[tuple[dict[str, Any], SessionState]]:
    """Every session in a snapshot; BlobError if any part of the file is not intact."""
    data = path.read_bytes()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise BlobError(f"{path} is not a session snapshot")
    (count,) = struct.unpack_from("<I", data, len(MAGIC))
    offset = len(MAGIC) + 4
    sessions = []
    for _ in range(count):
        if offset + 4 > len(data):
            raise BlobError(f"{path} is truncated")
        (size,) = struct.unpack_from("<I", data, offset)
        sessions.append(decode(data[offset + 4 : offset + 4 + size]))
        offset += 4 + size
    if offset != len(data):
        raise BlobError(f"{path} has trailing bytes")
    return sessions


def step_to_json(step: AppliedStep, at: float) -> dict[str, Any]:
    """A session's last applied step, recorded at ``at`` (wall clock), as a header's JSON."""
    return {**step_to_dict(step), "at": at}


def step_from_json(d: dict[str, Any]) -> tuple[AppliedStep, float]:
    """``step_to_json``'s value back; KeyError, TypeError or ValueError if it is not one."""
    return step_from_dict(d), float(d["at"])
