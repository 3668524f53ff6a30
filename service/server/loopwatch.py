"""The event loop under many open streams: its stalls, collections that stay short, memory given back.

Every open gRPC stream keeps about sixty garbage-collected objects alive in grpc.aio alone (its call state,
its handler's coroutines and tasks, their futures and contexts), whatever the handler does. A full collection
walks every tracked object with the loop stopped, so with the interpreter's own policy its pause grows with
the number of open streams: about 0.5 s at 10,000 streams, a latency spike for every step in flight. What is
done about it here, and why:

- **What lives past one probe tick is frozen** (`gc.freeze()` on every tick, 50 ms by default, from 1,000 open
  streams), and a full collection runs only when the frozen set has grown by a quarter since the last one, or
  when the live work fell by a quarter (see the heap trim below; `Reclaim`). Why: the interpreter counts
  allocations minus deallocations to decide when to collect, and an open stream's per-read objects (a
  coroutine, its future, grpc's batch-operation tag and callbacks: about a dozen) are freed and replaced each
  time the stream steps. Freeing the old ones (long promoted) cancels out allocating the new ones, so the
  youngest generation fills far past its threshold without triggering, and the next young collection walks all
  of it: measured at 20,000 open streams and 1,000 steps/s, 15,000-30,000 objects in generation 0 (5-10 ms
  pauses), 40,000-80,000 in generation 1 (30-110 ms), and full collections every few seconds walking
  140,000-220,000 (140-390 ms), because the interpreter triggers those on objects promoted, not on objects
  still alive. Frozen objects are still freed by reference counting when their stream steps or ends
  (grpc.aio's and the handler's per-stream objects hold no reference cycles: measured on 2,000 streams,
  `tests/service/test_stream_objects.py`), so the frozen set tracks the live objects. Only garbage in a
  reference cycle (an error's traceback, for one) outlives its use once frozen; it is collected by the full
  collection the quarter's growth triggers (`gc.unfreeze()`, `gc.collect()`, `gc.freeze()`), the same rule the
  interpreter applies to its oldest generation, counted on what is actually alive. When such a collection
  finds that the growth was live objects (more streams open), the ratio doubles (up to 4x), so a server that
  grows pays for a few full collections, not one per quarter. The interpreter's own young collections keep
  running between ticks and walk at most one tick's worth of objects. Measured with this (`python -m
  tests.bench.streams`): at 20,000 open streams and 1,000 steps/s no full collection and under 1 ms of young
  collections per second of run.
- **The loop's lateness is measured**: a callback scheduled every `interval_s` records how late it ran
  (`rnnserve_event_loop_lag_seconds`), and every collection's pause is timed by generation
  (`rnnserve_gc_pause_seconds`). Both cost a few microseconds per tick.
- **Freed heap goes back to the OS** when the live work (open streams plus resident sessions) has fallen by a
  quarter from its peak and stayed there for a second (and once more five seconds later). The first trim is
  preceded by a full collection over the frozen set, for the cycles the ended work may have left: glibc keeps
  what grpc core and numpy freed (per-call buffers, message copies) in its arenas; `malloc_trim` (in a thread;
  it releases the GIL) returns it. What stays after that (`tests/service/test_stream_memory.py`: about a third
  of what a burst added) is mostly pymalloc arenas that a few objects allocated later pin; the next burst
  reuses them.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.core import limits
from service.metrics import Metrics

TRIM_MIN_CLOSED = 256  # streams and sessions ended since the last trim's peak before a trim pays
# The live count must hold this long before a trim (grpc core frees a call's buffers after the handler
# ends), and a second trim follows this long after the first, for what the teardown freed meanwhile.
TRIM_SETTLE_S = 1.0
TRIM_AGAIN_S = 5.0


@dataclass(frozen=True, slots=True)
class Reclaim:
    """When the full collection of the frozen set runs (see the module docstring).

    It runs when the frozen set has grown by the current ratio since the last one: `growth` (the interpreter's
    own ratio for its oldest generation), doubled up to `max_growth` each time a collection finds the growth
    was live objects (under half of it freed), back to `growth` when one finds garbage; never for fewer than
    `min_objects`. Counting walks the frozen set (measured: about 200 ms at 1.3 million objects, 20,000 open
    streams, a cache miss per object), so it is done only when the resident memory grew by `recheck_rss`
    since the last count, looked at every `check_s`. It also runs right before the heap trim that follows a
    fall of the live work (`LoopWatch._memory`): sessions and streams that ended may have left reference
    cycles in the frozen set, and the live set, hence the pause, is smaller then.
    """

    growth: float = 0.25
    max_growth: float = 4.0
    min_objects: int = 100_000
    check_s: float = 1.0
    recheck_rss: float = 0.25
    # Per-tick freezing starts at this many open streams: below it the interpreter's own policy keeps its
    # pauses short (measured before per-tick freezing: p99 4.7 ms at 1,000 open streams, 15 ms at 10,000).
    freeze_min_streams: int = 1_000


_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """Return the resident set size of this process (0 where /proc is not available: every check counts)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class LoopWatch:
    """Loop-lag probe, collection timing and freezing, and memory trimming (see the module docstring)."""

    def __init__(
        self,
        metrics: Metrics,
        open_streams: Callable[[], int],
        *,
        interval_s: float = 0.05,
        freeze: bool = True,
        reclaim: Reclaim = Reclaim(),
        live: Callable[[], int] | None = None,
    ) -> None:
        self.metrics = metrics
        self.open_streams = open_streams
        self.interval_s = interval_s
        self.freeze = freeze
        self.reclaim = reclaim
        self.live = live if live is not None else open_streams
        self.longest_lag_s = 0.0
        self.freezes = 0
        self.reclaims = 0
        self._frozen_base = 0
        self._ratio = reclaim.growth
        self._rss_counted = 0
        self._next_check = 0.0
        self._lag = metrics.loop_lag_seconds
        self._pause = {g: metrics.gc_pause_seconds.labels(str(g)) for g in range(3)}
        # Pauses are recorded by the gc callback (any thread) and published by the loop's tick: no lock is
        # taken inside a collection.
        self._pauses: list[tuple[int, float]] = []
        self._gc_started = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._peak_streams = 0
        self._last_count = 0
        self._count_since = 0.0
        self._trimming = False
        self._trim_again = 0.0

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the probe on the running loop and hook the collector."""
        self._loop = asyncio.get_running_loop()
        gc.callbacks.append(self._on_gc)
        self._frozen_base = gc.get_freeze_count()
        self._next_check = time.monotonic() + self.reclaim.check_s
        self._schedule()

    def stop(self) -> None:
        """Unhook, and give what was frozen back to the collector (idempotent).

        A process that outlives its server (tests, embedding) collects its garbage as before.
        """
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
            if self.freezes:
                gc.unfreeze()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    # -- collector ------------------------------------------------------------------------------------------
    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        generation = info["generation"]
        self._pauses.append((generation, time.perf_counter() - self._gc_started))
        if generation == 2 and self.freeze:
            # The younger generations were merged into this collection: what is tracked now survived it.
            gc.freeze()
            self.freezes += 1

    def _freeze_tick(self) -> None:
        """Freeze what lived past this tick; run the full collection the frozen set's growth calls for."""
        if self.open_streams() >= self.reclaim.freeze_min_streams:
            gc.freeze()
            self.freezes += 1
        now = time.monotonic()
        if now < self._next_check:
            return
        r = self.reclaim
        self._next_check = now + r.check_s
        rss = resident_bytes()
        if r.recheck_rss and rss and rss < self._rss_counted * (1 + r.recheck_rss):
            self._rss_counted = min(self._rss_counted, rss)
            return
        self._rss_counted = rss
        frozen = gc.get_freeze_count()
        grown = frozen - self._frozen_base
        if grown <= max(r.min_objects, self._frozen_base * self._ratio):
            self._frozen_base = min(self._frozen_base, frozen)  # follows the live set down as streams end
            return
        freed = frozen - self._collect_frozen()
        self._ratio = r.growth if 2 * freed >= grown else min(2 * self._ratio, r.max_growth)

    def _collect_frozen(self) -> int:
        """Run a full collection over the frozen set too; return the frozen count after it (the new base)."""
        gc.unfreeze()
        gc.collect()  # its callback freezes the survivors
        self.reclaims += 1
        self._frozen_base = gc.get_freeze_count()
        return self._frozen_base

    # -- probe ----------------------------------------------------------------------------------------------
    def _schedule(self) -> None:
        loop = self._loop
        assert loop is not None
        self._handle = loop.call_at(loop.time() + self.interval_s, self._tick, loop.time() + self.interval_s)

    def _tick(self, due: float) -> None:
        lag = max(0.0, self._loop.time() - due)  # type: ignore[union-attr]
        self._lag.observe(lag)
        if lag > self.longest_lag_s:
            self.longest_lag_s = lag
        if self._pauses:
            pauses, self._pauses = self._pauses, []
            for generation, seconds in pauses:
                self._pause[generation].observe(seconds)
        self._schedule()  # first: the work below, if it is long, shows as the next tick's lag
        if self.freeze:
            self._freeze_tick()
        self._memory()

    def _memory(self) -> None:
        """Trim the heap once the live work (open streams, resident sessions) fell a quarter from its peak."""
        n = self.live()
        now = time.monotonic()
        if n != self._last_count:
            self._last_count, self._count_since = n, now
        if n > self._peak_streams:
            self._peak_streams = n
            return
        if self._trimming:
            return
        if self._trim_again and now >= self._trim_again:
            self._trim_again = 0.0
        elif self._peak_streams - n < TRIM_MIN_CLOSED or n > self._peak_streams * 3 // 4:
            return
        elif now - self._count_since < TRIM_SETTLE_S:
            return
        else:
            self._trim_again = now + TRIM_AGAIN_S
            if self.freeze:  # the work that ended may have left reference cycles in the frozen set
                self._collect_frozen()
        self._peak_streams = n
        self._trimming = True
        loop = self._loop
        assert loop is not None
        fut = loop.run_in_executor(None, limits.trim_memory)
        fut.add_done_callback(self._trimmed)

    def _trimmed(self, fut: asyncio.Future[None]) -> None:
        self._trimming = False
        fut.exception()  # a failed trim is harmless (read so it is not reported as unretrieved)
