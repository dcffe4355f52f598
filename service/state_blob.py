"""One session's state as bytes, without pickle: for export/import, snapshots and Redis.

Layout (version 1)::

    b"LSTMSTATE1\\n" | u32 header length | header JSON | float32 payload | digest of all before

The header names the model (name and version) the state belongs to, the shapes, ``t``, the
session's times, how many inputs its ``window`` holds and whether the blob is ``signed``; the
payload is h and c (layers x hidden each), then the forecast already made for the next value (mean
and std, one per feature), then the window's inputs (window x features, oldest first: what a
migration to another model version replays), little-endian float32; then, for a running-scaled
model, its ``stats`` (1 + 2 x features values, little-endian float64: the series' running
statistics, model/scaling.py). A blob without ``window`` or ``stats`` in its header (made before
them) has none. The digest is an HMAC-SHA256 under the deployment's
key (``LSTM_BLOB_KEY``) when the blob is signed, a plain SHA-256 otherwise: the first proves who
made the blob, the second only that it was not damaged (anyone can compute it for a blob of their
own making).

Nothing in a blob is trusted before ``check_blob``: the model version, the shapes, ``t`` and every
value's range (what the LSTM can produce from its zero state in ``t`` steps).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from model.forecaster import ForecastBounds

MAGIC = b"LSTMSTATE1\n"
DIGEST = 32
WINDOW_CEILING = 65_536  # no setting may keep more inputs per session than this


class BlobError(ValueError):
    """A blob that is corrupted, tampered with, or of another format."""


class SignatureError(BlobError):
    """A blob whose signature is missing, wrong, or cannot be checked here."""


def digest(body: bytes, key: bytes | None) -> bytes:
    if key is None:
        return hashlib.sha256(body).digest()
    return hmac.new(key, body, hashlib.sha256).digest()


@dataclass(frozen=True)
class SessionState:
    """A session's state off the device: tensors on the CPU, shapes (layers, hidden) and (F,)."""

    h: Tensor
    c: Tensor
    next_mean: Tensor
    next_std: Tensor
    # The session's last inputs, oldest first, (k, F) raw values (k <= LSTM_MIGRATION_WINDOW):
    # what a migration to another model version replays. None: none kept.
    window: Tensor | None = None
    # The model's state beyond (h, c): a running-scaled model's statistics (model/scaling.py),
    # (stats_width,) float64. None: the model keeps none.
    stats: Tensor | None = None

    def stats_array(self) -> np.ndarray:
        """The statistics as little-endian float64 (empty when there are none)."""
        if self.stats is None:
            return np.zeros(0, "<f8")
        return self.stats.detach().to("cpu", torch.float64).contiguous().numpy().astype("<f8")

    def arrays(self) -> list[np.ndarray]:
        tensors = [self.h, self.c, self.next_mean, self.next_std]
        if self.window is not None and self.window.shape[0]:
            tensors.append(self.window)
        return [t.detach().to("cpu", torch.float32).contiguous().numpy() for t in tensors]

    def window_rows(self) -> int:
        return 0 if self.window is None else int(self.window.shape[0])


def encode(state: SessionState, header: dict[str, Any], key: bytes | None = None) -> bytes:
    """The blob of ``state``: signed with ``key`` (HMAC-SHA256) if given, else checksummed."""
    arrays = state.arrays()
    full_header = {
        **header,
        "layers": arrays[0].shape[0],
        "hidden": arrays[0].shape[1],
        "features": arrays[2].shape[0],
        "window": state.window_rows(),
        "stats": 0 if state.stats is None else int(state.stats.shape[0]),
        "dtype": "float32",
        "signed": key is not None,
    }
    head = json.dumps(full_header, sort_keys=True, separators=(",", ":")).encode()
    payload = b"".join(a.astype("<f4").tobytes() for a in arrays) + state.stats_array().tobytes()
    body = MAGIC + struct.pack("<I", len(head)) + head + payload
    return body + digest(body, key)


def decode(blob: bytes, key: bytes | None = None) -> tuple[dict[str, Any], SessionState]:
    """The header and state of a blob; BlobError if it is not intact, SignatureError if ``key``
    is given and the blob is not signed with it, or the blob is signed and no key is given."""
    if not blob.startswith(MAGIC):
        raise BlobError("not a session state blob (unknown format)")
    if len(blob) < len(MAGIC) + 4 + DIGEST:
        raise BlobError("the session state blob is truncated")
    body, theirs = blob[:-DIGEST], blob[-DIGEST:]
    (head_len,) = struct.unpack_from("<I", body, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        # Read before it is verified, only to learn which digest to check: JSON, no more.
        header = json.loads(body[start : start + head_len])
        if not isinstance(header, dict):
            raise TypeError("the header is not an object")
        signed = header.get("signed", False)
    except (ValueError, TypeError) as e:
        raise BlobError(f"the session state blob has an unreadable header: {e}") from e
    if signed is not True and key is not None:
        raise SignatureError("the blob is not signed, and this service accepts signed blobs only")
    if signed is True and key is None:
        raise SignatureError("the blob is signed, and this service has no key to check it with")
    if not hmac.compare_digest(digest(body, key), theirs):
        if key is not None:
            raise SignatureError("the blob's signature does not match: forged, or another key's")
        raise BlobError("the session state blob is corrupted or was modified (checksum mismatch)")
    try:
        layers, hidden, features = (int(header[k]) for k in ("layers", "hidden", "features"))
    except (ValueError, KeyError, TypeError) as e:
        raise BlobError(f"the session state blob has an unreadable header: {e}") from e
    window = header.get("window", 0)  # blobs from before windows have none
    stats = header.get("stats", 0)  # nor statistics
    if header.get("dtype") != "float32" or min(layers, hidden, features) < 1:
        raise BlobError("the session state blob's header has impossible shapes or dtype")
    if not (type(window) is int and 0 <= window <= WINDOW_CEILING):
        raise BlobError(f"the session state blob's window is not a count in [0, {WINDOW_CEILING}]")
    if not (type(stats) is int and 0 <= stats <= 1 + 2 * features):
        raise BlobError("the session state blob's statistics are not a count in [0, 1 + 2F]")
    sizes = [layers * hidden, layers * hidden, features, features, window * features]
    offset = start + head_len
    if len(body) - offset != 4 * sum(sizes) + 8 * stats:
        raise BlobError("the session state blob's payload does not match its header's shapes")
    payload = np.frombuffer(body, dtype="<f4", offset=offset, count=sum(sizes))
    parts = np.split(payload.astype(np.float32), np.cumsum(sizes)[:-1])
    values = np.frombuffer(body, dtype="<f8", offset=offset + 4 * sum(sizes), count=stats)
    state = SessionState(
        torch.from_numpy(parts[0].reshape(layers, hidden).copy()),
        torch.from_numpy(parts[1].reshape(layers, hidden).copy()),
        torch.from_numpy(parts[2].copy()),
        torch.from_numpy(parts[3].copy()),
        torch.from_numpy(parts[4].reshape(window, features).copy()) if window else None,
        torch.from_numpy(values.astype(np.float64)) if stats else None,
    )
    return header, state


def check_blob(
    header: dict[str, Any],
    state: SessionState,
    model: tuple[str, str],
    shape: tuple[int, int],
    features: int,
    stats_width: int = 0,
    stats_decay: float = 1.0,
    *,
    bounds: ForecastBounds,
) -> None:
    """Whether a decoded blob may become a session here: of this ``model`` (name, version), of
    its ``shape`` (layers, hidden) and ``features``, and within what the model can produce
    (its forecasts within ``bounds``, the model's ``forecast_bounds``).
    ModelMismatch, BlobCorrupted, or BlobOutOfRange."""
    from service.errors import BlobCorrupted, BlobOutOfRange, ModelMismatch
    from service.schemas import SEQ_CEILING, VALUE_CEILING

    theirs = (header.get("model"), header.get("model_version"))
    if theirs != model:
        raise ModelMismatch(
            f"the blob belongs to {theirs[0]}:{theirs[1]}; this service runs {model[0]}:{model[1]}",
            model=model[0],
            model_version=model[1],
        )
    if (tuple(state.h.shape), state.next_mean.shape[0]) != (shape, features):
        raise BlobCorrupted("the blob's shapes do not match the model's")
    theirs_width = 0 if state.stats is None else int(state.stats.shape[0])
    if theirs_width != stats_width:
        raise BlobCorrupted(
            f"the blob keeps {theirs_width} statistics per session; this model keeps {stats_width}"
        )
    tensors = (state.h, state.c, state.next_mean, state.next_std)
    if not all(bool(torch.isfinite(a).all()) for a in tensors):
        raise BlobCorrupted("the blob was refused: the state holds NaN or infinite values")
    t = header.get("t")
    if not (type(t) is int and 0 <= t <= SEQ_CEILING):
        raise BlobOutOfRange(f"the blob was refused: t must be an integer in [0, {SEQ_CEILING}]")
    # h = o * tanh(c) lies in [-1, 1]; each step adds i * g, in [-1, 1], to f * c with f in
    # [0, 1], so after t steps from the zero state |c| <= t. Slack for float32 rounding only.
    if float(state.h.abs().max()) > 1.0 + 1e-6:
        raise BlobOutOfRange("the blob was refused: |h| > 1, which no LSTM state reaches")
    if float(state.c.abs().max()) > t * (1 + 1e-5) + 1e-6:
        raise BlobOutOfRange(f"the blob was refused: |c| exceeds t = {t}, which no LSTM reaches")
    if t == 0:  # no forecast made yet: what a fresh session holds
        fresh = bool((state.next_mean == 0).all()) and bool((state.next_std == 1).all())
        if not fresh:
            raise BlobOutOfRange("the blob was refused: a forecast before any value (t = 0)")
    else:
        # The model's own bounds: a fixed ceiling refused forecasts the model makes from inputs
        # it accepts, and with them every session of a snapshot at restore (a review).
        mean, std = state.next_mean.double().cpu(), state.next_std.double().cpu()
        if bool((mean.abs() > bounds.mean).any()):
            raise BlobOutOfRange("the blob was refused: a forecast mean beyond the model's reach")
        if not bool(((std >= bounds.std_min) & (std <= bounds.std_max)).all()):
            raise BlobOutOfRange("the blob was refused: a forecast std beyond the model's range")
    if state.stats is not None:
        check_stats(state.stats, t, features, stats_decay)
    if state.window is not None:
        if state.window.shape[1] != features:
            raise BlobCorrupted("the blob's window does not match the model's features")
        if state.window.shape[0] > t:
            raise BlobOutOfRange(f"the blob was refused: a window of more inputs than t = {t}")
        if not (
            bool(torch.isfinite(state.window).all())
            and float(state.window.abs().max()) <= VALUE_CEILING
        ):
            raise BlobOutOfRange(f"the blob was refused: a window value beyond {VALUE_CEILING:g}")


def check_stats(stats: Tensor, t: int, features: int, decay: float = 1.0) -> None:
    """A running-scaled session's statistics (model/scaling.py's RunningStats, flat: n, the
    means, the squared deviations) within what ``t`` values no larger than VALUE_CEILING make:
    each value adds 1 to n after n is multiplied by ``decay`` (so n is at most
    (1 - decay^t) / (1 - decay), t when nothing decays, and at least 1 after the first), the
    means lie among the values, and each variance is at most (2 * VALUE_CEILING)^2."""
    from service.errors import BlobCorrupted, BlobOutOfRange
    from service.schemas import VALUE_CEILING

    if not bool(torch.isfinite(stats).all()):
        raise BlobCorrupted("the blob was refused: its statistics hold NaN or infinite values")
    n, mean, m2 = float(stats[0]), stats[1 : 1 + features], stats[1 + features :]
    most = float(t) if decay >= 1.0 else -math.expm1(t * math.log(decay)) / (1.0 - decay)
    if not (min(t, 1) * (1 - 1e-9) <= n <= most * (1 + 1e-9)):
        raise BlobOutOfRange(
            f"the blob was refused: its statistics' weight is not in [{min(t, 1)}, {most:.6g}], "
            f"what t = {t} values make"
        )
    if float(mean.abs().max()) > VALUE_CEILING:
        raise BlobOutOfRange(f"the blob was refused: a running mean beyond {VALUE_CEILING:g}")
    if not (float(m2.min()) >= 0 and float(m2.max()) <= n * (2 * VALUE_CEILING) ** 2):
        raise BlobOutOfRange(
            "the blob was refused: a running variance below 0 or beyond its values'"
        )
