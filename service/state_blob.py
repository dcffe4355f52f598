"""One session's state as bytes, without pickle: for export/import, snapshots and Redis.

Layout (version 1)::

    b"LSTMSTATE1\\n" | u32 header length | header JSON | float32 payload | SHA-256 of all before

The header names the model (name and version) the state belongs to, the shapes, ``t`` and the
session's times; the payload is h and c (layers x hidden each), then the forecast already made for
the next value (mean and std, one per feature), little-endian float32. A blob whose checksum
does not match, or that belongs to another model version, is refused.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

MAGIC = b"LSTMSTATE1\n"
DIGEST = 32


class BlobError(ValueError):
    """A blob that is corrupted, tampered with, or of another format."""


@dataclass(frozen=True)
class SessionState:
    """A session's state off the device: tensors on the CPU, shapes (layers, hidden) and (F,)."""

    h: Tensor
    c: Tensor
    next_mean: Tensor
    next_std: Tensor

    def arrays(self) -> list[np.ndarray]:
        return [
            t.detach().to("cpu", torch.float32).contiguous().numpy()
            for t in (self.h, self.c, self.next_mean, self.next_std)
        ]


def encode(state: SessionState, header: dict[str, Any]) -> bytes:
    arrays = state.arrays()
    full_header = {
        **header,
        "layers": arrays[0].shape[0],
        "hidden": arrays[0].shape[1],
        "features": arrays[2].shape[0],
        "dtype": "float32",
    }
    head = json.dumps(full_header, sort_keys=True, separators=(",", ":")).encode()
    payload = b"".join(a.astype("<f4").tobytes() for a in arrays)
    body = MAGIC + struct.pack("<I", len(head)) + head + payload
    return body + hashlib.sha256(body).digest()


def decode(blob: bytes) -> tuple[dict[str, Any], SessionState]:
    """The header and state of a blob; BlobError if it is not intact."""
    if not blob.startswith(MAGIC):
        raise BlobError("not a session state blob (unknown format)")
    body, digest = blob[:-DIGEST], blob[-DIGEST:]
    if len(blob) < len(MAGIC) + 4 + DIGEST or hashlib.sha256(body).digest() != digest:
        raise BlobError("the session state blob is corrupted or was modified (checksum mismatch)")
    (head_len,) = struct.unpack_from("<I", body, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(body[start : start + head_len])
        layers, hidden, features = (int(header[k]) for k in ("layers", "hidden", "features"))
    except (ValueError, KeyError, TypeError) as e:
        raise BlobError(f"the session state blob has an unreadable header: {e}") from e
    payload = np.frombuffer(body, dtype="<f4", offset=start + head_len)
    sizes = [layers * hidden, layers * hidden, features, features]
    if payload.size != sum(sizes):
        raise BlobError("the session state blob's payload does not match its header's shapes")
    parts = np.split(payload.astype(np.float32), np.cumsum(sizes)[:-1])
    state = SessionState(
        torch.from_numpy(parts[0].reshape(layers, hidden).copy()),
        torch.from_numpy(parts[1].reshape(layers, hidden).copy()),
        torch.from_numpy(parts[2].copy()),
        torch.from_numpy(parts[3].copy()),
    )
    return header, state


def check_blob(
    header: dict[str, Any],
    state: SessionState,
    model: tuple[str, str],
    shape: tuple[int, int],
    features: int,
) -> None:
    """Whether a decoded blob may become a session here: of this ``model`` (name, version), of
    its ``shape`` (layers, hidden) and ``features``, finite. ModelMismatch or BlobCorrupted."""
    from service.errors import BlobCorrupted, ModelMismatch

    theirs = (header.get("model"), header.get("model_version"))
    if theirs != model:
        raise ModelMismatch(
            f"the blob belongs to {theirs[0]}:{theirs[1]}; this service runs {model[0]}:{model[1]}",
            model=model[0],
            model_version=model[1],
        )
    if (tuple(state.h.shape), state.next_mean.shape[0]) != (shape, features):
        raise BlobCorrupted("the blob's shapes do not match the model's")
    tensors = (state.h, state.c, state.next_mean, state.next_std)
    if not all(bool(torch.isfinite(a).all()) for a in tensors):
        raise BlobCorrupted("the blob was refused: the state holds NaN or infinite values")
