"""The embedded store's snapshot: every live session written at shutdown, read back at start.

A snapshot file is ``b"LSTMSNAP1\\n"``, a u32 count, then each session as a u32 length and a
state blob (``service.state_blob``: checksummed, no pickle). It is written to a temporary file
and renamed, so a crash mid-write leaves the previous file or none, never half of one.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from service.state_blob import BlobError, SessionState, decode, encode

MAGIC = b"LSTMSNAP1\n"


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
