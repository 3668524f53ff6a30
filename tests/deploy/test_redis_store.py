"""RedisStore against a real redis-server: round trip, leases, the compare-and-set fence, expiry, failures."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.errors import Aborted, InvalidArgument, Unavailable
from service.stores import snapshot
from service.stores.base import SessionRecord, Stale
from service.stores.redis import RedisStore


def record(
    seq: int, owner: str | None = "a", session_id: str = "s1", ttl: float = 60.0, gen: int = 0
) -> SessionRecord:
    rng = np.random.default_rng(seq)
    return SessionRecord(
        session_id=session_id,
        model="tiny_lstm",
        version=1,
        last_seq=seq,
        state={"h": rng.standard_normal((1, 8)).astype(np.float32), "count": np.array([seq], dtype=np.int64)},
        last_outputs={"logits": rng.standard_normal((3, 5)).astype(np.float32)} if seq else None,
        idle_ttl_s=ttl,
        created_at=1000.0,
        owner=owner,
        gen=gen,
    )


def run(coro):
    return asyncio.run(coro)


def assert_same(a: SessionRecord, b: SessionRecord) -> None:
    assert (a.session_id, a.model, a.version, a.last_seq, a.idle_ttl_s, a.owner) == (
        b.session_id,
        b.model,
        b.version,
        b.last_seq,
        b.idle_ttl_s,
        b.owner,
    )
    assert a.state.keys() == b.state.keys()
    for k in a.state:
        assert a.state[k].dtype == b.state[k].dtype and np.array_equal(a.state[k], b.state[k])
    assert (a.last_outputs is None) == (b.last_outputs is None)
    for k in a.last_outputs or {}:
        assert np.array_equal(a.last_outputs[k], b.last_outputs[k])


def test_save_load_round_trip_is_exact(clean_redis):
    async def body():
        store = RedisStore(clean_redis.url, lease_s=5)
        try:
            assert await store.load("s1") is None
            assert await store.claim("s1", "a", 5)
            for seq in (0, 1, 2):
                assert await store.save(record(seq, gen=seq)) == seq + 1
            got = await store.load("s1")
            assert_same(got, record(2))
            assert got.gen == 3
            assert await store.lease_holder("s1") == "a"
            await store.delete("s1")
            assert await store.load("s1") is None and await store.lease_holder("s1") is None
        finally:
            await store.close()

    run(body())


def test_two_replicas_cannot_both_hold_or_advance_a_session(clean_redis):
    async def body():
        a, b = RedisStore(clean_redis.url, lease_s=5), RedisStore(clean_redis.url, lease_s=5)
        try:
            assert await a.claim("s1", "a", 5)
            await a.save(record(1, "a"))
            assert not await b.claim("s1", "b", 5), "a live lease must not be taken over"
            with pytest.raises(Aborted, match="owned by replica a"):
                await b.save(record(2, "b"))
            assert (await a.load("s1")).last_seq == 1, "the refused write changed nothing"
            # Concurrent claims from many replicas: exactly one wins.
            await a.delete("s1")
            results = await asyncio.gather(*(a.claim("s1", f"r{i}", 5) for i in range(20)))
            assert sum(results) == 1
        finally:
            await a.close()
            await b.close()

    run(body())


def test_released_lease_is_taken_at_once_and_the_old_owner_is_fenced(clean_redis):
    async def body():
        a, b = RedisStore(clean_redis.url, lease_s=30), RedisStore(clean_redis.url, lease_s=30)
        try:
            assert await a.claim("s1", "a", 30)
            assert await a.save(record(3, "a")) == 1
            assert await a.release("s1", "a")
            assert not await b.release("s1", "b"), "only the holder releases"
            assert await b.claim("s1", "b", 30)
            resumed = await b.load("s1")
            assert resumed.last_seq == 3
            await b.save(record(4, "b", gen=resumed.gen))
            # The old owner, still holding a stale copy, cannot write over the new owner's history.
            with pytest.raises(Aborted, match="lost its lease"):
                await a.save(record(4, "a", gen=1))
            assert (await b.load("s1")).owner == "b"
        finally:
            await a.close()
            await b.close()

    run(body())


def test_a_stale_copy_is_refused_whatever_the_lease_says(clean_redis):
    """The stale-replica fork: A's copy is at version 2, B advanced the session to version 3 and went idle;
    A retakes the lapsed lease, but its write (based on version 2) is refused, and `acquire` tells it the
    store moved on so it can reload first."""

    async def body():
        a, b = RedisStore(clean_redis.url, lease_s=0.2), RedisStore(clean_redis.url, lease_s=0.2)
        try:
            assert await a.acquire("s1", "a", 0.2) == 0
            assert await a.save(record(1, "a")) == 1
            await asyncio.sleep(0.35)
            assert await a.lease_holder("s1") is None
            # An idle session's lease ran out: a writer at the stored version may carry on ...
            assert await a.save(record(2, "a", gen=1)) == 2
            assert await a.lease_holder("s1") == "a"
            await asyncio.sleep(0.35)
            # ... another replica claims, loads version 2 and advances it.
            assert await b.acquire("s1", "b", 0.2) == 2
            assert await b.save(record(3, "b", gen=2)) == 3
            await asyncio.sleep(0.35)
            # A still holds version 2. The lease is free and A may take it, but the store says version 3 ...
            assert await a.acquire("s1", "a", 0.2) == 3
            # ... and a write based on version 2 is refused: history cannot fork.
            with pytest.raises(Stale, match="version 3, this replica holds 2"):
                await a.save(record(3, "a", gen=2))
            assert (await a.load("s1")).owner == "b"
            # Deletes are fenced the same way: a stale copy expiring on A does not delete B's session.
            assert not await a.delete("s1", 2, "a")
            assert await a.delete("s1", 3, "a")
            assert await a.load("s1") is None
        finally:
            await a.close()
            await b.close()

    run(body())


def test_records_expire_with_the_session(clean_redis):
    async def body():
        store = RedisStore(clean_redis.url, lease_s=0.1)
        try:
            await store.save(record(1, "a", ttl=0.2))
            ttl_ms = clean_redis.client().pttl("rnnserve:{s1}:rec")
            assert 0 < ttl_ms <= 300
            await asyncio.sleep(0.5)
            assert await store.load("s1") is None
        finally:
            await store.close()

    run(body())


def test_stored_blob_is_the_snapshot_format_and_tampering_is_detected(clean_redis):
    async def body():
        store = RedisStore(clean_redis.url, lease_s=5, hmac_key=b"k" * 32)
        try:
            await store.save(record(5, "a"))
            raw = clean_redis.client().hget("rnnserve:{s1}:rec", "blob")
            assert_same(snapshot.decode(raw, b"k" * 32), record(5, "a"))
            assert int(clean_redis.client().hget("rnnserve:{s1}:rec", "seq")) == 5
            clean_redis.client().hset("rnnserve:{s1}:rec", "blob", raw[:-1] + bytes([raw[-1] ^ 1]))
            with pytest.raises(InvalidArgument, match="integrity"):
                await store.load("s1")
            # A store without the key refuses HMAC-signed records instead of trusting them.
            unkeyed = RedisStore(clean_redis.url)
            await store.save(record(6, "a", gen=1))
            with pytest.raises(InvalidArgument):
                await unkeyed.load("s1")
            await unkeyed.close()
        finally:
            await store.close()

    run(body())


def test_save_without_owner_is_a_programming_error(clean_redis):
    async def body():
        store = RedisStore(clean_redis.url)
        try:
            with pytest.raises(ValueError, match="owner"):
                await store.save(record(1, owner=None))
        finally:
            await store.close()

    run(body())


def test_unreachable_redis_is_a_typed_unavailable():
    from tests.deploy.redis_server import free_port

    async def body():
        store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5)
        try:
            for call in (store.ping(), store.load("s1"), store.claim("s1", "a", 1), store.save(record(1))):
                with pytest.raises(Unavailable, match="unreachable"):
                    await call
        finally:
            await store.close()

    run(body())
