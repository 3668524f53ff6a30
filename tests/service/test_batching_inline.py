"""Batcher: ORT runs off the event loop by default; with inline_max_steps set, tiny batches run on it."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
from test_batching import make

from service.config import Settings
from service.core.scheduler import StepRequest

INLINE_MAX_STEPS = 8  # the opt-in setting under test


class RecordingRuntime:
    """Delegates to the real Runtime and records which thread ran each batch, and its shape."""

    def __init__(self, runtime):
        self._runtime = runtime
        self.runs: list[tuple[int, tuple[int, ...]]] = []  # (thread id, shape of the data input)

    def run(self, feeds):
        out = self._runtime.run(feeds)
        self.runs.append((threading.get_ident(), feeds["tokens"].shape))
        return out


async def _submit_together(b, rows: int, steps: int):
    loop = asyncio.get_running_loop()
    futs = [loop.create_future() for _ in range(rows)]
    for f in futs:
        b.submit(StepRequest(b.slab.alloc(), (np.full(steps, 3, np.int64),), (steps,), f, steps=steps))
    return await asyncio.gather(*futs)


def test_small_batches_run_inline_bigger_ones_in_the_executor(model_repository):
    async def main():
        b = make(model_repository, inline_max_steps=INLINE_MAX_STEPS)
        rec = b.runtime = RecordingRuntime(b.runtime)
        b.start()
        outs = [
            await _submit_together(b, 1, 1),  # 1 row x 1 step: inline
            await _submit_together(b, INLINE_MAX_STEPS, 1),  # at the threshold: inline
            await _submit_together(b, INLINE_MAX_STEPS + 1, 1),  # one row more: executor
            await _submit_together(b, 1, INLINE_MAX_STEPS + 1),  # one long chunk: executor
        ]
        await b.stop()
        return rec.runs, outs

    loop_thread = threading.get_ident()
    runs, outs = asyncio.run(main())
    assert [shape for _, shape in runs] == [
        (1, 1),
        (INLINE_MAX_STEPS, 1),
        (INLINE_MAX_STEPS + 1, 1),
        (1, INLINE_MAX_STEPS + 1),
    ]
    assert [tid == loop_thread for tid, _ in runs] == [True, True, False, False]
    # Inline or not, the same token from the same (zero) state gives the same output.
    np.testing.assert_allclose(outs[0][0]["logits"], outs[2][0]["logits"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(outs[1][-1]["logits"], outs[2][-1]["logits"], rtol=0, atol=1e-6)


def test_default_keeps_every_ort_run_off_the_loop(model_repository):
    assert Settings().inline_max_steps == 0

    async def main():
        b = make(model_repository)
        rec = b.runtime = RecordingRuntime(b.runtime)
        b.start()
        await _submit_together(b, 1, 1)
        await b.stop()
        return rec.runs

    assert asyncio.run(main())[0][0] != threading.get_ident()
