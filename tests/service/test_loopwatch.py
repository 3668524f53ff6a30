"""The collector policy of `service.server.loopwatch`: what lives past a tick is frozen, frozen cyclic garbage
is collected once the frozen set has grown enough, and the growth ratio backs off when what grew was alive.

Real event loop, real collector; the thresholds are made small (`Reclaim`) so a test needs thousands of
objects, not a million.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from service.metrics import Metrics
from service.server.loopwatch import LoopWatch, Reclaim

SMALL = Reclaim(
    growth=0.25,
    max_growth=4.0,
    min_objects=2_000,
    check_s=0.0,
    recheck_rss=0.0,
    freeze_min_streams=0,
)


class Node:
    """A weak-referenceable object that can sit in a reference cycle."""

    __slots__ = ("other", "__weakref__")

    def __init__(self) -> None:
        self.other: object = None


def _watch(reclaim: Reclaim = SMALL) -> LoopWatch:
    # As the server does after start-up: what the process holds so far is frozen before the watch starts, so
    # the base is what the test process holds, and only the test's objects grow the frozen set.
    gc.collect()
    gc.freeze()
    return LoopWatch(Metrics(CollectorRegistry()), lambda: 0, interval_s=0.01, reclaim=reclaim)


async def _ticks(n: int, interval_s: float = 0.01) -> None:
    for _ in range(n):
        await asyncio.sleep(interval_s)


async def _until(done: Callable[[], bool], ticks: int) -> None:
    """Wait a tick at a time until `done()` holds or `ticks` have passed (the caller asserts)."""
    for _ in range(ticks):
        if done():
            return
        await _ticks(1)


def test_objects_that_live_past_a_tick_leave_the_collectors_generations() -> None:
    async def main() -> None:
        watch = _watch(Reclaim(check_s=3600.0, freeze_min_streams=0))
        watch.start()
        try:
            kept = [Node() for _ in range(5_000)]
            await _ticks(5)
            young = {id(o) for o in gc.get_objects()}  # generations 0-2; the frozen set is not among them
            assert not any(id(n) in young for n in kept)
            assert watch.freezes >= 1
            assert watch.reclaims == 0
        finally:
            watch.stop()

    asyncio.run(main())


async def _frozen_garbage(watch: LoopWatch) -> list[weakref.ref]:
    """Make reference cycles that live past a tick (so they are frozen) and then become garbage, a chunk at a
    time (an eighth of the growth that calls for a collection), until the watch runs a full collection; return
    a weak reference to one cycle of each chunk, the last chunk's (still alive at the collection) last."""
    before = watch.reclaims
    chunk = max(1_000, int(watch._frozen_base * watch._ratio / 16))  # pairs: two objects each
    refs: list[weakref.ref] = []
    for _ in range(200):
        held = []
        for _ in range(chunk):
            a, b = Node(), Node()
            a.other, b.other = b, a
            held.append(a)
        refs.append(weakref.ref(held[0]))
        await _ticks(2)  # frozen while alive: young collections can no longer free them
        del held, a, b  # garbage now, in cycles, in the frozen set
        if watch.reclaims > before:
            return refs
    raise AssertionError(f"no full collection after {len(refs)} chunks of {chunk} frozen cycles")


def test_frozen_cyclic_garbage_is_collected_once_the_frozen_set_has_grown() -> None:
    async def main() -> None:
        watch = _watch()
        watch.start()
        try:
            await _ticks(3)
            refs = await _frozen_garbage(watch)
            assert watch.reclaims == 1
            assert len(refs) >= 2
            # Every chunk dropped before the collection is gone; the last was still alive during it.
            assert [r() is None for r in refs[:-1]] == [True] * (len(refs) - 1)
            assert watch._ratio == SMALL.growth  # the collection found garbage: the ratio stays
        finally:
            watch.stop()

    asyncio.run(main())


def test_growth_that_is_alive_doubles_the_ratio_and_garbage_resets_it() -> None:
    async def main() -> None:
        watch = _watch()
        watch.start()
        try:
            await _ticks(3)
            # Grows the frozen set by far more than a quarter of what the test process holds.
            live = [Node() for _ in range(max(40_000, int(watch._frozen_base * SMALL.growth * 2)))]
            await _until(lambda: watch.reclaims > 0, 200)
            assert watch.reclaims == 1
            assert watch._ratio == 2 * SMALL.growth  # the collection found the growth alive
            refs = await _frozen_garbage(watch)
            assert watch.reclaims == 2
            assert all(r() is None for r in refs[:-1])
            assert watch._ratio == SMALL.growth  # this one found mostly garbage
            assert len(live) >= 40_000
        finally:
            watch.stop()

    asyncio.run(main())


def test_a_quarter_of_the_live_work_ending_collects_the_cycles_it_left() -> None:
    async def main() -> None:
        live = [1_000]  # open streams plus resident sessions, as the server counts them
        gc.collect()
        gc.freeze()
        watch = LoopWatch(
            Metrics(CollectorRegistry()), lambda: 0, interval_s=0.01, reclaim=SMALL, live=lambda: live[0]
        )
        watch.start()
        try:
            held = []
            for _ in range(1_000):  # below every growth threshold: only the fall of the work collects them
                a, b = Node(), Node()
                a.other, b.other = b, a
                held.append(a)
            ref = weakref.ref(held[0])
            await _ticks(5)  # frozen while alive, and the peak seen
            del held, a, b
            await _ticks(5)
            assert ref() is not None and watch.reclaims == 0  # frozen garbage, nothing ended yet
            live[0] = 700  # the work that held them ended; the watch acts once that has held a second
            await _until(lambda: ref() is None, 300)
            assert ref() is None and watch.reclaims == 1
        finally:
            watch.stop()

    asyncio.run(main())
