"""The event loop under many open streams: its stalls, collections that stay short, memory given back.

Every open gRPC stream keeps about sixty garbage-collected objects alive in grpc.aio alone (its call state,
its handler's coroutines and tasks, their futures and contexts), whatever the handler does. A full collection
walks every tracked object with the loop stopped, so with the interpreter's own policy its pause grows with
the number of open streams: about 0.5 s at 10,000 streams, a latency spike for every step in flight. What is
done about it here, and why:

- **Survivors of a full collection are frozen** (`gc.freeze()` from a `gc.callbacks` hook, right after the
  collection, when the younger generations are empty). The next full collection then walks only what was
  allocated since, so its pause is bounded by the allocation between two full collections, not by the open
  streams. Frozen objects are still freed by reference counting when a stream ends: grpc.aio's and the
  handler's per-stream objects hold no reference cycles (measured on 2,000 streams, closed by the client or
  cancelled: all but 10 objects freed, none of them per stream; `tests/service/test_stream_objects.py`).
  Only a reference cycle formed later through a frozen object would stay until `gc.unfreeze()`. The
  interpreter's thresholds are left as they are: young collections are cheap, and full ones now are too.
- **The loop's lateness is measured**: a callback scheduled every `interval_s` records how late it ran
  (`rnnserve_event_loop_lag_seconds`), and every collection's pause is timed by generation
  (`rnnserve_gc_pause_seconds`). Both cost a few microseconds per tick.
- **Freed heap goes back to the OS** when open streams have fallen by a quarter from their peak and stayed
  there for a second (and once more five seconds later): glibc keeps what grpc core and numpy freed (per-call
  buffers, message copies) in its arenas; `malloc_trim` (in a thread; it releases the GIL) returns it.
  What stays after that (`tests/service/test_stream_memory.py`: about a third of what a burst added) is
  mostly pymalloc arenas that a few objects allocated later pin; the next burst reuses them.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Any

from service.core import limits
from service.metrics import Metrics

TRIM_MIN_CLOSED = 256  # streams that must have closed since the last trim's peak before a trim pays
# The open-stream count must hold this long before a trim (grpc core frees a call's buffers after the handler
# ends), and a second trim follows this long after the first, for what the teardown freed meanwhile.
TRIM_SETTLE_S = 1.0
TRIM_AGAIN_S = 5.0


class LoopWatch:
    """Loop-lag probe, collection timing and freezing, and memory trimming (see the module docstring)."""

    def __init__(
        self,
        metrics: Metrics,
        open_streams: Callable[[], int],
        *,
        interval_s: float = 0.05,
        freeze: bool = True,
    ) -> None:
        self.metrics = metrics
        self.open_streams = open_streams
        self.interval_s = interval_s
        self.freeze = freeze
        self.longest_lag_s = 0.0
        self.freezes = 0
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
        try:
            self._memory()
        finally:
            self._schedule()

    def _memory(self) -> None:
        """Trim the heap once open streams fell by a quarter from their peak since the last trim."""
        n = self.open_streams()
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
        self._peak_streams = n
        self._trimming = True
        loop = self._loop
        assert loop is not None
        fut = loop.run_in_executor(None, limits.trim_memory)
        fut.add_done_callback(self._trimmed)

    def _trimmed(self, fut: asyncio.Future[None]) -> None:
        self._trimming = False
        fut.exception()  # a failed trim is harmless (read so it is not reported as unretrieved)
