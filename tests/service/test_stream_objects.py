"""Open streams and the garbage collector: what an open stream keeps tracked, what a full collection walks.

The real server runs in this process (so its objects can be counted); the streams come from client processes
(tests/bench/stream_clients.py), 100 per connection, each opened and stepped once, then left idle, as devices
keep them. Counting includes frozen objects (`gc.get_freeze_count`).
"""

from __future__ import annotations

import asyncio
import gc

import pytest

from service.config import Settings
from service.server import app
from tests.bench.stream_clients import StreamClients, Target

STREAMS = 600
# Measured with grpcio 1.85.3: 62.7 tracked objects per open Stream, about 55 of them grpc.aio's own (call
# state, handler coroutines and tasks, their futures and contexts). One more object per stream on the
# server's side of an idle stream fails this test.
MAX_TRACKED_PER_STREAM = 63.8


def _tracked() -> int:
    return len(gc.get_objects()) + gc.get_freeze_count()


@pytest.fixture
def settings(model_repository):
    return Settings(
        model_repository=model_repository,
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=-1,
        repository_poll_s=0,
        max_tombstones=0,
    )


def test_an_idle_open_stream_keeps_few_tracked_objects_and_full_collections_skip_them(settings):
    async def go() -> None:
        running = await app.start(settings)
        assert running.watch is not None
        clients = StreamClients(Target("service", running.address, "tiny_lstm", "tokens", "int64", ()), 2)
        try:
            await asyncio.to_thread(clients.open, 8)  # warm every code path once
            await asyncio.to_thread(clients.close)
            await asyncio.sleep(0.5)
            gc.collect()
            before = _tracked()
            await asyncio.to_thread(clients.open, STREAMS)
            await asyncio.sleep(0.5)
            assert running.streams.open_count == STREAMS
            # A full collection (what survives it is frozen), read a few times: a stray call still being torn
            # down on a busy machine is not the streams' cost.
            readings = []
            for _ in range(3):
                gc.collect()
                readings.append((_tracked() - before) / STREAMS)
                await asyncio.sleep(0.5)
            per_stream = min(readings)
            assert per_stream <= MAX_TRACKED_PER_STREAM, f"{per_stream:.2f} tracked objects per open stream"
            # The open streams' objects are frozen: the next full collection walks only what is newer.
            assert len(gc.get_objects()) < 5 * STREAMS
            assert running.watch.freezes >= 1
            await asyncio.to_thread(clients.close)
            # Closed streams leave nothing behind, frozen or not (no reference cycle keeps them); grpc.aio
            # finishes tearing a call down a little after its handler returned.
            for _ in range(100):
                await asyncio.sleep(0.1)
                gc.collect()
                left = (_tracked() - before) / STREAMS
                if left < 0.5:
                    break
            assert left < 0.5, f"{left:.2f} tracked objects per closed stream stay"
            assert running.streams.open_count == 0
        finally:
            clients.stop()
            await running.stop(1)
            gc.unfreeze()

    asyncio.run(go())


def test_the_loop_probe_publishes_lag_and_collection_pauses(settings):
    async def go() -> None:
        running = await app.start(settings)
        try:
            gc.collect()
            await asyncio.sleep(0.3)
            registry = running.engine.metrics.registry
            assert registry.get_sample_value("rnnserve_event_loop_lag_seconds_count") >= 3
            assert registry.get_sample_value("rnnserve_gc_pause_seconds_count", {"generation": "2"}) >= 1
        finally:
            await running.stop(1)
            gc.unfreeze()

    asyncio.run(go())
