"""Batcher: pure merge/split, shape grouping, and failure propagation (real ONNX Runtime, no server)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import fixtures
import numpy as np
import pytest

from service.config import Settings
from service.core.contract import describe
from service.core.runtime import Runtime
from service.core.scheduler import Batcher, StepRequest, merge, split
from service.core.slab import StateSlab
from service.core.types import ModelConfig
from service.errors import InvalidArgument, Unavailable


def req(arrays, fut=None, slot=0):
    return StepRequest(slot, tuple(arrays), arrays[0].shape, fut)


def test_merge_and_split_are_exact_inverses():
    a = [np.arange(6).reshape(3, 2), np.arange(3)]
    b = [np.arange(6, 12).reshape(3, 2), np.arange(3, 6)]
    merged = merge([req(a), req(b)], 2)
    assert merged[0].shape == (2, 3, 2) and merged[1].shape == (2, 3)
    parts = split(merged, ["p", "q"], 2)
    np.testing.assert_array_equal(parts[0]["p"], a[0])
    np.testing.assert_array_equal(parts[1]["q"], b[1])
    single = merge([req(a)], 2)
    assert single[0].shape == (1, 3, 2)
    assert split([np.zeros((3, 4))], ["y"], 3)[2]["y"].shape == (4,)


def make(repo, **kw):
    settings = Settings(model_repository=repo)
    runtime = Runtime(repo / "tiny_lstm" / "1" / "model.onnx")
    spec = describe(runtime, "tiny_lstm", 1, ModelConfig.from_settings(settings))
    slab = StateSlab(spec.states)
    return Batcher(
        spec, runtime, slab, ThreadPoolExecutor(1), max_batch_size=kw.pop("max_batch_size", 64), **kw
    )


def test_groups_by_shape_preserving_order(model_repository):
    async def main():
        sizes = []
        b = make(model_repository, observe=lambda n, steps, t0, t1, batch: sizes.append((n, steps)))
        loop = asyncio.get_running_loop()
        futs = []
        for i, t in enumerate([1, 2, 1, 3, 2, 1]):
            f = loop.create_future()
            b.submit(StepRequest(b.slab.alloc(), (np.full(t, i % 5, np.int64),), (t,), f, steps=t))
            futs.append(f)
        b.start()  # everything is queued before the task runs: one batch per distinct length
        outs = await asyncio.gather(*futs)
        await b.stop()
        return sizes, outs

    sizes, outs = asyncio.run(main())
    assert sizes == [(3, 1), (2, 2), (1, 3)]
    assert [o["logits"].shape[0] for o in outs] == [1, 2, 1, 3, 2, 1]


def test_batcher_task_failure_reaches_every_waiting_future(model_repository):
    async def main():
        def broken(n, steps, t0, t1, batch):
            raise RuntimeError("observer bug")

        b = make(model_repository, observe=broken)
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(5)]
        for i, f in enumerate(futs):
            b.submit(StepRequest(b.slab.alloc(), (np.full(1 + i % 2, 1, np.int64),), (1 + i % 2,), f))
        b.start()
        results = await asyncio.gather(*futs, return_exceptions=True)
        with pytest.raises(Unavailable, match="batcher failed"):
            b.submit(StepRequest(0, (np.ones(1, np.int64),), (1,), loop.create_future()))
        await b.stop()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, Unavailable) for r in results), results


def test_ort_error_fails_only_that_batch(model_repository):
    async def main():
        b = make(model_repository)
        b.start()
        loop = asyncio.get_running_loop()
        bad = loop.create_future()
        b.submit(StepRequest(b.slab.alloc(), (np.array([999], np.int64),), (1,), bad))  # out-of-vocab index
        with pytest.raises(Exception):  # noqa: B017 (ORT raises its own exception types)
            await bad
        good = loop.create_future()
        b.submit(StepRequest(b.slab.alloc(), (np.array([1], np.int64),), (1,), good))
        out = await good
        await b.stop()
        return out

    assert asyncio.run(main())["logits"].shape == (1, 39)
    assert fixtures  # the fixture module builds the repository used here


def test_one_rejected_input_fails_only_its_own_request(model_repository):
    """ORT rejects a batch because of one row: the others rerun alone and succeed (no validation here)."""

    async def main():
        b = make(model_repository)
        slots = [b.slab.alloc() for _ in range(3)]
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in slots]
        for slot, tok, f in zip(slots, (1, 999, 2), futs, strict=True):
            b.submit(StepRequest(slot, (np.array([tok], np.int64),), (1,), f))
        b.start()
        results = await asyncio.gather(*futs, return_exceptions=True)
        await b.stop()
        return results

    ok1, bad, ok2 = asyncio.run(main())
    assert isinstance(bad, InvalidArgument) and "rejected the input" in str(bad)
    assert ok1["logits"].shape == (1, 39) and ok2["logits"].shape == (1, 39)
