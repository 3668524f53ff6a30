"""The batcher's adaptive policy: learnt holds at partial load, and cheap batches run on the event loop."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
from test_batching import make

from service.config import Settings
from service.core.policy import BatchPolicy, size_class
from service.core.scheduler import StepRequest


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


def test_size_classes_are_powers_of_two():
    assert [size_class(n) for n in (1, 2, 3, 4, 5, 8, 9, 64, 65)] == [0, 1, 2, 2, 3, 3, 4, 6, 7]


def test_hold_only_while_holds_gather_steps():
    p = BatchPolicy(target_rows=16, max_delay_s=0.001, probe_every=10)
    assert p.hold_for(20) == 0.0  # a full batch never waits
    # Nothing learnt yet: no hold, except a probe once every `probe_every` batches.
    decisions = [p.hold_for(1) for _ in range(20)]
    assert decisions.count(0.001) == 2 and decisions[9] == 0.001 and decisions[19] == 0.001
    # Holds that gather several steps each (open load): hold every small batch.
    for _ in range(10):
        p.held(4)
    assert p.gain > 1 and all(p.hold_for(2) == 0.001 for _ in range(5))
    # Closed-loop clients all waiting on this batch: holds gather nothing, so holding stops again.
    for _ in range(30):
        p.held(0)
    assert p.gain < 1 and [p.hold_for(1) for _ in range(9)] == [0.0] * 9
    assert BatchPolicy(max_delay_s=0).hold_for(1) == 0.0  # holding off


def test_inline_only_for_measured_cheap_classes():
    p = BatchPolicy(inline_max_s=0.0002)
    assert not p.inline(1)  # not measured yet: executor
    p.ran(1, 0.00005)
    p.ran(64, 0.002)
    assert p.inline(1) and not p.inline(64) and not p.inline(2)
    assert not BatchPolicy(inline_max_s=0).inline(1)


def test_with_nothing_else_waiting_a_costlier_batch_runs_inline():
    """Idle (the queue empty once the batch is taken): the larger bound applies; 0 still turns inline off."""
    p = BatchPolicy(inline_max_s=0.0002, idle_inline_max_s=0.001)
    p.ran(1, 0.0005)  # e.g. batch 1 of a model that costs more than inline_max_s
    p.ran(64, 0.003)
    assert not p.inline(1) and p.inline(1, idle=True)
    assert not p.inline(64, idle=True)  # too costly to block the loop even when idle
    assert not p.inline(2, idle=True)  # not measured yet
    off = BatchPolicy(inline_max_s=0, idle_inline_max_s=0.001)
    off.ran(1, 0.00001)
    assert not off.inline(1, idle=True)
    low = BatchPolicy(inline_max_s=0.002, idle_inline_max_s=0.001)  # never below inline_max_s
    low.ran(1, 0.0015)
    assert low.inline(1) and low.inline(1, idle=True)


def test_cheap_batches_move_onto_the_loop_and_costly_ones_stay_off(model_repository):
    """First run of a size class: executor (cost unknown); then tiny batches run inline, big ones do not."""

    async def main():
        b = make(model_repository, policy=BatchPolicy(inline_max_s=0.05, max_delay_s=0))
        rec = b.runtime = RecordingRuntime(b.runtime)
        b.start()
        outs = [await _submit_together(b, 1, 1) for _ in range(3)]
        b.policy.ran(64, 1.0)  # a class measured as costly stays in the executor
        outs.append(await _submit_together(b, 64, 1))
        await b.stop()
        return rec.runs, outs

    loop_thread = threading.get_ident()
    runs, outs = asyncio.run(main())
    assert [tid == loop_thread for tid, _ in runs] == [False, True, True, False]
    # Inline or not, the same token from the same (zero) state gives the same output.
    np.testing.assert_allclose(outs[0][0]["logits"], outs[1][0]["logits"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(outs[0][0]["logits"], outs[3][-1]["logits"], rtol=0, atol=1e-6)


def test_inline_off_keeps_every_ort_run_off_the_loop(model_repository):
    assert Settings(inline_max_us=0).inline_max_us == 0

    async def main():
        b = make(model_repository, policy=BatchPolicy(inline_max_s=0, max_delay_s=0))
        rec = b.runtime = RecordingRuntime(b.runtime)
        b.start()
        for _ in range(3):
            await _submit_together(b, 1, 1)
        await b.stop()
        return rec.runs

    assert all(tid != threading.get_ident() for tid, _ in asyncio.run(main()))


def test_a_learnt_hold_batches_steps_that_arrive_during_it(model_repository):
    """Steps submitted while the batcher holds go into the same batch."""

    async def main():
        p = BatchPolicy(max_delay_s=0.05, target_rows=16)
        p.gain = 5.0  # holds have been paying off
        b = make(model_repository, policy=p)
        rec = b.runtime = RecordingRuntime(b.runtime)
        b.start()
        loop = asyncio.get_running_loop()
        futs = []
        for _ in range(4):
            f = loop.create_future()
            b.submit(StepRequest(b.slab.alloc(), (np.full(1, 3, np.int64),), (1,), f))
            futs.append(f)
            await asyncio.sleep(0.005)
        await asyncio.gather(*futs)
        await b.stop()
        return rec.runs

    runs = asyncio.run(main())
    assert runs[0][1] == (4, 1)
