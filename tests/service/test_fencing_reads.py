"""Fenced reads: a replica never answers from a resident copy it cannot vouch for.

Two engines share one persistent store (as two replicas share Redis). A replica may answer from its resident
copy of a session (a describe, an attach, a retry's cached reply, "expected seq N") only while it holds the
session's lease; the lease it believes in must never outlast the one the store gave. Both tests below failed
before the fix and were the cause of the short chaos run's "acknowledged step missing" reports.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from engine_harness import settings
from prometheus_client import CollectorRegistry

from service.core.engine import Engine
from service.errors import Aborted, NotFound, Unavailable
from service.stores.base import InMemoryStore

X = "x"


def _x(v: int) -> dict[str, np.ndarray]:
    return {X: np.array([v], np.int32)}


async def _step_eventually(engine: Engine, sid: str, seq: int, v: int, timeout: float = 20.0):
    """Step on `engine`, retrying while another replica's lease is still alive (as a client would)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await engine.step(sid, seq, _x(v))
        except (Unavailable, NotFound):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)


class SlowClaimStore(InMemoryStore):
    """The shared store, with the answer to a lease claim arriving `delay_s` after the store granted it.

    What a replica sees when it is paused (SIGSTOP, a GC pause) or its event loop is busy between Redis taking
    the claim and the replica reading the reply.
    """

    def __init__(self) -> None:
        super().__init__(persistent=True)
        self.delay_s = 0.0

    async def claim(self, session_id: str, owner: str, lease_s: float) -> bool:
        granted = await super().claim(session_id, owner, lease_s)
        await asyncio.sleep(self.delay_s)
        return granted


def _engines(model_repository, store, lease_s: float) -> tuple[Engine, Engine]:
    def make(name: str) -> Engine:
        return Engine(
            settings(model_repository, replica_id=name, lease_s=lease_s),
            registry=CollectorRegistry(),
            store=store,
        )

    return make("a"), make("b")


def test_describe_on_a_replica_whose_lease_lapsed_shows_the_store_s_session(model_repository):
    """A steps, goes idle past its lease; B advances the session; DescribeSession on A never shows A's copy.

    While B holds the lease, A says the session moved; after B's lease lapses, A reloads and shows seq 3.
    """

    async def main():
        store = InMemoryStore(persistent=True)
        a, b = _engines(model_repository, store, 0.3)
        await a.start()
        await b.start()
        try:
            sid = (await a.create_session("accumulator")).session_id
            await a.step(sid, 1, _x(5))
            await a.step(sid, 2, _x(1))
            await asyncio.sleep(0.45)  # a's lease lapses; its copy (seq 2) stays resident
            r = await _step_eventually(b, sid, 3, 10)
            assert int(r.outputs["y"][0]) == 16
            # DescribeSession and a Stream attach on a, while b holds the lease: the session moved.
            with pytest.raises(NotFound, match="moved"):
                info = await a.attach(sid)
                pytest.fail(f"replica a described its stale copy: last_seq {info.last_seq}, not 3")
            await asyncio.sleep(0.45)  # b's lease lapses too: a may take the session back
            info = await a.attach(sid)
            assert info.last_seq == 3, f"replica a described its stale copy: last_seq {info.last_seq}, not 3"
            r = await a.step(sid, 4, _x(1))  # and a continues from the store's state
            assert int(r.outputs["y"][0]) == 17
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_a_lease_claimed_slowly_is_not_believed_longer_than_the_store_gave_it(model_repository):
    """A resumes a session (claim answered late) for a cached retry, B advances it, A is asked again.

    A must not trust its copy past the lease the store granted: asked for the next seq while B holds the
    lease, it revalidates and says the session moved (a client retries elsewhere) instead of answering
    "expected seq 2" from a copy one step behind the store; once B's lease lapses, A applies the seq.
    """
    lease_s = 0.5

    async def main():
        store = SlowClaimStore()
        a, b = _engines(model_repository, store, lease_s)
        await a.start()
        await b.start()
        try:
            sid = (await b.create_session("accumulator")).session_id
            await b.step(sid, 1, _x(5))
            await b.stop()  # drain: b hands the lease back; a resumes at seq 1
            b = _engines(model_repository, store, lease_s)[1]
            await b.start()
            store.delay_s = 0.4  # a's claim is granted now, its answer read 0.4 s later
            cached = await a.step(sid, 1, _x(5))  # the client's retry of seq 1: answered from the store
            assert cached.cached
            store.delay_s = 0.0
            r = await _step_eventually(b, sid, 2, 1)  # a's lease (granted 0.4 s ago) lapses; b applies seq 2
            assert int(r.outputs["y"][0]) == 6
            # Traffic back on a within what a wrongly believed it held; b's lease is alive.
            with pytest.raises(NotFound, match="moved"):
                await a.step(sid, 3, _x(1))
            r = await _step_eventually(a, sid, 3, 1)  # after b's lease lapses, a resumes from the store
            assert int(r.outputs["y"][0]) == 7
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


class SlowSaveStore(InMemoryStore):
    """The shared store; replica `slow_owner`'s saves take `delay_s` (Redis restarting, a slow disk)."""

    def __init__(self) -> None:
        super().__init__(persistent=True)
        self.delay_s = 0.0
        self.slow_owner = ""

    async def save(self, record):
        if record.owner == self.slow_owner:
            await asyncio.sleep(self.delay_s)
        return await super().save(record)


def test_a_replica_that_lost_the_lease_during_an_operation_says_moved_not_unknown(model_repository):
    """A's save of seq 2 hangs past its lease; B takes the session and applies seq 2; a call reaches A.

    A cannot end its copy yet (its step is still in flight), but the answer must still say the session moved
    (a client retries elsewhere), never "unknown session id", which tells a client its session is gone.
    """

    async def main():
        store = SlowSaveStore()
        a, b = _engines(model_repository, store, 0.3)
        await a.start()
        await b.start()
        try:
            sid = (await a.create_session("accumulator")).session_id
            await a.step(sid, 1, _x(5))
            store.slow_owner, store.delay_s = "a", 1.0
            first = asyncio.ensure_future(a.step(sid, 2, _x(1)))  # applied on a, its save hangs
            await asyncio.sleep(0.1)
            r = await _step_eventually(b, sid, 2, 1)  # the client's retry elsewhere, after a's lease lapsed
            assert int(r.outputs["y"][0]) == 6
            with pytest.raises(NotFound) as info:
                await a.step(sid, 3, _x(1))  # while a's step 2 is still saving
            assert info.value.reason == "moved", info.value.message
            with pytest.raises(Aborted):  # a's own save is refused: b wrote version 3 meanwhile
                await first
            r = await _step_eventually(b, sid, 3, 1)
            assert int(r.outputs["y"][0]) == 7
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_calls_that_wait_for_another_call_s_resume_get_their_own_answer(model_repository):
    """Two calls reach A at once for a session B holds: both hear "owned by another live replica" (retry),
    the one that waited for the other's resume included (it used to hear "unknown session id")."""

    async def main():
        store = InMemoryStore(persistent=True)
        a = Engine(
            settings(model_repository, replica_id="a", lease_s=0.3), registry=CollectorRegistry(), store=store
        )
        b = Engine(
            settings(model_repository, replica_id="b", lease_s=30), registry=CollectorRegistry(), store=store
        )
        await a.start()
        await b.start()
        try:
            sid = (await b.create_session("accumulator")).session_id
            await b.step(sid, 1, _x(5))
            calls = [a.step(sid, 2, _x(1)), a.step(sid, 2, _x(1))]
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, Unavailable) for r in results), results
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())
