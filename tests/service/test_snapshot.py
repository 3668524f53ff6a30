"""Snapshot blob format: round trip, integrity, HMAC (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import InvalidArgument
from service.stores import snapshot
from service.stores.base import SessionRecord


def record(last_outputs=True) -> SessionRecord:
    return SessionRecord(
        session_id="abc",
        model="m",
        version=3,
        last_seq=17,
        state={
            "h": np.arange(6, dtype=np.float32).reshape(2, 3),
            "count": np.array([5], np.int64),
            "flag": np.array([True, False]),
        },
        last_outputs={"y": np.ones((4, 2), np.float16)} if last_outputs else None,
        idle_ttl_s=12.5,
        created_at=1.0e9,
        owner="replica-1",
    )


@pytest.mark.parametrize("key", [None, b"k"])
@pytest.mark.parametrize("with_outputs", [True, False])
def test_round_trip(key, with_outputs):
    rec = record(with_outputs)
    back = snapshot.decode(snapshot.encode(rec, key), key)
    assert (back.session_id, back.model, back.version, back.last_seq, back.idle_ttl_s, back.owner) == (
        "abc",
        "m",
        3,
        17,
        12.5,
        "replica-1",
    )
    for name, arr in rec.state.items():
        assert back.state[name].dtype == arr.dtype
        np.testing.assert_array_equal(back.state[name], arr)
    if with_outputs:
        np.testing.assert_array_equal(back.last_outputs["y"], rec.last_outputs["y"])
    else:
        assert back.last_outputs is None


def test_every_flipped_byte_is_detected():
    blob = snapshot.encode(record())
    for i in range(0, len(blob), 7):
        bad = bytearray(blob)
        bad[i] ^= 0x40
        with pytest.raises(InvalidArgument):
            snapshot.decode(bytes(bad))


def test_hmac_rules():
    plain = snapshot.encode(record())
    signed = snapshot.encode(record(), b"key")
    with pytest.raises(InvalidArgument, match="not signed"):
        snapshot.decode(plain, b"key")
    with pytest.raises(InvalidArgument, match="no state_hmac_key"):
        snapshot.decode(signed)
    with pytest.raises(InvalidArgument, match="integrity"):
        snapshot.decode(signed, b"other")


def test_format_version_and_magic():
    blob = bytearray(snapshot.encode(record()))
    blob[4] = 9
    with pytest.raises(InvalidArgument, match="format version 9"):
        snapshot.decode(bytes(blob))
    with pytest.raises(InvalidArgument, match="magic"):
        snapshot.decode(b"XXXX" + bytes(blob[4:]))
