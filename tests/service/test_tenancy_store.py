"""Ownership survives the shared store: a session resumes on another replica only for its own tenant."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from engine_harness import settings
from prometheus_client import CollectorRegistry

from service.core.engine import Engine
from service.core.tenancy import CALLER, Principal
from service.errors import NotFound
from service.stores import snapshot
from service.stores.base import InMemoryStore


def test_resume_on_another_replica_is_for_the_owner_only(model_repository):
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
            CALLER.set(Principal("alice"))
            sid = (await a.create_session("tiny_lstm")).session_id
            await a.step(sid, 1, {"tokens": np.array([1, 2], dtype=np.int64)})
            assert (await store.load(sid)).tenant == "alice"
            await a.stop()
            CALLER.set(Principal("bob"))
            with pytest.raises(NotFound, match="unknown session id"):
                await b.step(sid, 2, {"tokens": np.array([3], dtype=np.int64)})
            with pytest.raises(NotFound, match="unknown session id"):
                await b.attach(sid)
            CALLER.set(Principal("alice"))
            assert (await b.attach(sid)).last_seq == 1  # bob's attempts left it resumable for alice
            blob = await b.get_state(sid)
            assert snapshot.decode(blob).tenant == "alice"
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())
