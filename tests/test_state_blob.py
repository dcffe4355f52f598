"""Session state blobs: exact round trip, and refusal of anything corrupted or foreign."""

from __future__ import annotations

import pytest
import torch

from service.state_blob import BlobError, SessionState, decode, encode


def sample() -> SessionState:
    g = torch.Generator().manual_seed(0)
    return SessionState(
        torch.randn(2, 5, generator=g),
        torch.randn(2, 5, generator=g),
        torch.randn(3, generator=g),
        torch.rand(3, generator=g) + 0.1,
    )


def test_round_trip_is_bit_exact() -> None:
    state = sample()
    header, back = decode(encode(state, {"model": "m", "model_version": "abc", "t": 7}))
    assert header["t"] == 7 and header["model_version"] == "abc"
    assert (header["layers"], header["hidden"], header["features"]) == (2, 5, 3)
    for a, b in zip(state.arrays(), back.arrays(), strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("position", [0, 20, -40, -1])
def test_any_flipped_bit_is_refused(position: int) -> None:
    blob = bytearray(encode(sample(), {"t": 1}))
    blob[position] ^= 0x04
    with pytest.raises(BlobError):
        decode(bytes(blob))


def test_truncated_and_foreign_blobs_are_refused() -> None:
    blob = encode(sample(), {"t": 1})
    with pytest.raises(BlobError, match="checksum"):
        decode(blob[:-5])
    with pytest.raises(BlobError, match="unknown format"):
        decode(b"PK\x03\x04" + blob)
