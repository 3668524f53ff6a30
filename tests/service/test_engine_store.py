"""The store seam: two engines sharing one persistent store behave like two replicas sharing Redis."""

from __future__ import annotations

import asyncio

import fixtures
import numpy as np
import pytest
from engine_harness import settings
from prometheus_client import CollectorRegistry

from service.core.engine import Engine
from service.errors import NotFound, Unavailable
from service.stores.base import InMemoryStore


def test_session_resumes_on_another_engine_without_loss_or_duplication(model_repository):
    seq = np.random.default_rng(3).integers(0, 39, 30).astype(np.int64)
    want = fixtures.run_whole(model_repository / "tiny_lstm" / "1" / "model.onnx", {"tokens": seq[None]})[
        "logits"
    ][0]

    async def main():
        store = InMemoryStore(persistent=True)
        a = Engine(
            settings(model_repository, replica_id="a", lease_s=30), registry=CollectorRegistry(), store=store
        )
        # b waits at most one of its own leases for a's lease to lapse before it gives up: keep that short
        b = Engine(
            settings(model_repository, replica_id="b", lease_s=0.3), registry=CollectorRegistry(), store=store
        )
        await a.start()
        await b.start()
        try:
            sid = (await a.create_session("tiny_lstm")).session_id
            outs = [
                (await a.step(sid, i + 1, {"tokens": seq[i * 5 : (i + 1) * 5]})).outputs["logits"]
                for i in range(3)
            ]
            with pytest.raises(Unavailable, match="owned by another live replica"):
                await b.step(sid, 4, {"tokens": seq[15:20]})  # a's lease is alive: b must not advance it
            await a.stop()  # drain: flush and release the lease
            retry = await b.step(sid, 3, {"tokens": seq[10:15]})  # the client's retry of its last seq
            assert retry.cached
            np.testing.assert_array_equal(retry.outputs["logits"], outs[-1])
            outs.append((await b.step(sid, 4, {"tokens": seq[15:]})).outputs["logits"])
            assert b.describe(sid).last_seq == 4
            await b.close(sid)
            assert await store.load(sid) is None  # a closed session is gone from the store too
            with pytest.raises(NotFound, match="closed"):
                await b.step(sid, 5, {"tokens": seq[:1]})
            return np.concatenate(outs)
        finally:
            await a.stop()
            await b.stop()

    np.testing.assert_allclose(asyncio.run(main()), want, atol=1e-5)


def test_resume_after_owner_lease_expires(model_repository):
    async def main():
        store = InMemoryStore(persistent=True)
        a = Engine(
            settings(model_repository, replica_id="a", lease_s=0.2), registry=CollectorRegistry(), store=store
        )
        b = Engine(
            settings(model_repository, replica_id="b", lease_s=0.2), registry=CollectorRegistry(), store=store
        )
        await a.start()
        await b.start()
        try:
            sid = (await a.create_session("accumulator")).session_id
            await a.step(sid, 1, {"x": np.array([5], np.int32)})
            # a is "killed": it simply stops renewing; after the lease runs out b takes over
            deadline = asyncio.get_running_loop().time() + 20
            while True:
                try:
                    r = await b.step(sid, 2, {"x": np.array([1], np.int32)})
                    break
                except Unavailable:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.05)
            assert int(r.outputs["y"][0]) == 6
            with pytest.raises(NotFound, match="another replica"):  # the old owner learns it lost the session
                await a.step(sid, 2, {"x": np.array([1], np.int32)})
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_default_memory_store_persists_nothing(model_repository):
    async def main():
        engine = Engine(settings(model_repository), registry=CollectorRegistry())
        assert not engine.store.persistent
        await engine.start()
        sid = (await engine.create_session("accumulator")).session_id
        await engine.step(sid, 1, {"x": np.array([1], np.int32)})
        await engine.stop()
        await engine.stop()  # idempotent
        with pytest.raises(NotFound, match="shutdown"):
            engine.describe(sid)

    asyncio.run(main())
