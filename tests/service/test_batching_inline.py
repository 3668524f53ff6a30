"""Batcher: a lone one-step request runs on the event loop; anything bigger runs in the executor."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
from test_batching import make

from service.batching import StepRequest


class RecordingRuntime:
    """Delegates to the real Runtime and records which thread ran each batch."""

    def __init__(self, runtime):
        self._runtime = runtime
        self.threads: list[tuple[int, int]] = []  # (thread id, batch size)

    def run(self, feeds):
        out = self._runtime.run(feeds)
        self.threads.append((threading.get_ident(), len(next(iter(feeds.values())))))
        return out


def test_lone_one_step_request_runs_inline_others_in_executor(model_repository):
    async def main():
        b = make(model_repository)
        rec = b.runtime = RecordingRuntime(b.runtime)
        loop = asyncio.get_running_loop()
        b.start()
        outs = []
        # One session, one step: inline on the loop thread.
        f = loop.create_future()
        b.submit(StepRequest(b.slab.alloc(), (np.full(1, 3, np.int64),), (1,), f, steps=1))
        outs.append(await f)
        # One session, a 4-step chunk: executor.
        f = loop.create_future()
        b.submit(StepRequest(b.slab.alloc(), (np.full(4, 3, np.int64),), (4,), f, steps=4))
        outs.append(await f)
        # Two sessions queued together: one batch of two, executor.
        futs = [loop.create_future() for _ in range(2)]
        for fut in futs:
            b.submit(StepRequest(b.slab.alloc(), (np.full(1, 3, np.int64),), (1,), fut, steps=1))
        outs += await asyncio.gather(*futs)
        await b.stop()
        return rec.threads, outs

    loop_thread = threading.get_ident()
    threads, outs = asyncio.run(main())
    assert [n for _, n in threads] == [1, 1, 2]
    assert threads[0][0] == loop_thread
    assert threads[1][0] != loop_thread and threads[2][0] != loop_thread
    # Inline or not, the same input from the same (zero) state gives the same output.
    np.testing.assert_allclose(outs[0]["logits"], outs[2]["logits"], rtol=0, atol=1e-6)
    assert outs[1]["logits"].shape[0] == 4


def test_inline_threshold_zero_keeps_everything_off_the_loop(model_repository):
    async def main():
        b = make(model_repository, inline_max_steps=0)
        rec = b.runtime = RecordingRuntime(b.runtime)
        f = asyncio.get_running_loop().create_future()
        b.start()
        b.submit(StepRequest(b.slab.alloc(), (np.full(1, 3, np.int64),), (1,), f, steps=1))
        await f
        await b.stop()
        return rec.threads

    assert asyncio.run(main())[0][0] != threading.get_ident()
