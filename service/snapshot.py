"""The embedded store's snapshot: every live session written at shutdown, read back at start.

A snapshot file is ``b"LSTMSNAP1\\n"``, a u32 count, then each session as a u32 length and a
state blob (``service.state_blob``: checksummed, no pickle). It is written to a temporary file
and renamed, so a crash mid-write leaves the previous file or none, never half of one.

A session's header may carry ``last_step`` (``step_to_json``): its last applied step, with
when it was recorded, so a retry of it right after a restart is answered again, not refused.
JSON keeps the outputs' doubles exact (Python writes the shortest repr that reads back equal).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import Any

from service.results import Outputs, StepDone
from service.sessions import AppliedStep
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


def step_to_json(step: AppliedStep, at: float) -> dict[str, Any]:
    """A session's last applied step, recorded at ``at`` (wall clock), as a header's JSON."""
    return {
        "seq": step.seq,
        "digest": step.digest.hex(),
        "t": step.response.t,
        "at": at,
        "outputs": dataclasses.asdict(step.response.outputs),
    }


def step_from_json(d: dict[str, Any]) -> tuple[AppliedStep, float]:
    """``step_to_json``'s value back; KeyError, TypeError or ValueError if it is not one."""
    outputs = Outputs(**d["outputs"])
    if not (len(outputs.mean) == len(outputs.std) == len(outputs.anomaly_z) > 0):
        raise ValueError("a last step's outputs differ in length")
    digest = bytes.fromhex(d["digest"])
    if len(digest) != 16:
        raise ValueError("a last step's digest is not 16 bytes")
    done = StepDone(int(d["t"]), outputs)
    return AppliedStep(int(d["seq"]), digest, done), float(d["at"])
