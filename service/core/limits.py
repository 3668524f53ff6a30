"""Bounded work per request: the limits one request may ask for, long requests in slices, memory given back.

Every limit is a setting (service/config.py) with a safe default, and a refusal names it:

- `max_request_steps`: batch x timesteps of one request (a KServe stateless batch, a StreamMany message);
- `max_rows_per_message`: sessions in one StepMany message;
- `max_cached_response_bytes`: the response a session keeps for a retry (bounds the chunk length; see
  `core.inputs.InputValidator`);
- `max_id_length`: session ids and KServe string sequence ids.

A stateless request of more than `slice_steps` batch x timesteps runs in time slices of at most that much
work, the state carried from one to the next, on a thread of its own (the burst executor) at a lower CPU
priority (`burst_nice`): the per-step batches keep their executor thread, and on a busy core the OS runs them
and the event loop before the next slice, so one maximal request does not hold everyone else for its whole
length. Slicing also bounds ONNX Runtime's working memory to one slice. A request of at least
`trim_after_steps` batch x timesteps runs on a second ONNX Runtime session of the model without the CPU
memory arena (`Runtime.for_bursts`) and, once its response is sent, glibc's `malloc_trim` returns the freed
heap to the OS; large buffers are mmapped (`tune_allocator`). So a burst does not leave the process at its
peak RSS, and the per-step batches keep their arena.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from concurrent.futures import Executor

import numpy as np

from service.config import Settings
from service.core.runtime import Runtime
from service.core.types import ModelSpec
from service.errors import InvalidArgument, OutOfRange

_log = logging.getLogger(__name__)


def check_request_steps(settings: Settings, batch: int, steps: int, what: str) -> None:
    """Refuse a request of more than `max_request_steps` batch x timesteps."""
    if batch * steps > settings.max_request_steps:
        raise OutOfRange(
            f"{what} asks for batch {batch} x {steps} steps = {batch * steps} steps; the limit "
            f"max_request_steps is {settings.max_request_steps}: send smaller batches or shorter chunks"
        )


def check_rows(settings: Settings, rows: int) -> None:
    """Refuse a StepMany message with more than `max_rows_per_message` sessions."""
    if rows > settings.max_rows_per_message:
        raise OutOfRange(
            f"message steps {rows} sessions; the limit max_rows_per_message is "
            f"{settings.max_rows_per_message}: split it into several messages"
        )


def check_id(settings: Settings, value: str, what: str) -> None:
    """Refuse an id longer than `max_id_length` (without echoing it)."""
    if len(value) > settings.max_id_length:
        raise InvalidArgument(
            f"{what} is {len(value)} characters long; expected at most max_id_length "
            f"({settings.max_id_length})"
        )


async def run_sliced(
    settings: Settings,
    executor: Executor,
    burst_executor: Executor,
    runtime: Runtime,
    spec: ModelSpec,
    feeds: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Run a stateless request, in time slices when it is large (see the module docstring).

    A request that is sliced runs on `burst_executor`, so the per-step batches in `executor` never wait for a
    slice; a short one runs in `executor` like any batch.
    """
    loop = asyncio.get_running_loop()
    data = [t.name for t in spec.inputs]
    first = feeds[data[0]]
    batch = first.shape[0]
    steps = first.shape[1] if spec.time_axis and first.ndim > 1 else 1
    big = 0 < settings.trim_after_steps <= batch * steps
    if big:  # on the arena-less session, so its memory can go back to the OS afterwards
        runtime = await loop.run_in_executor(burst_executor, runtime.for_bursts)
    n = max(1, settings.slice_steps // batch) if spec.time_axis else steps
    if steps <= n:
        outs = await loop.run_in_executor(executor, runtime.run, feeds)
        result = {t.name: outs[t.name] for t in spec.outputs}
    else:
        # All slices in one call on the burst thread: no event-loop round trip per slice (the loop only
        # serves the other clients), and a cancelled request stops at the next slice boundary.
        cancelled = threading.Event()
        try:
            result = await loop.run_in_executor(
                burst_executor, _run_slices, runtime, spec, feeds, steps, n, cancelled
            )
        except asyncio.CancelledError:
            cancelled.set()
            raise
    if big:
        _trim_soon(loop, executor if steps <= n else burst_executor)
    return result


class _Cancelled(Exception):
    """The request was cancelled while its slices ran: the rest are skipped."""


def _run_slices(
    runtime: Runtime,
    spec: ModelSpec,
    feeds: dict[str, np.ndarray],
    steps: int,
    n: int,
    cancelled: threading.Event,
) -> dict[str, np.ndarray]:
    """Run `feeds` in slices of `n` timesteps, the state carried from one to the next (blocking).

    Time-axis outputs are written into arrays allocated once for the whole request (no list of pieces and
    no concatenated copy: half the peak memory of a burst's outputs).
    """
    data = [t.name for t in spec.inputs]
    timed = {t.name for t in spec.outputs if t.time_axis}
    result: dict[str, np.ndarray] = {}
    part = dict(feeds)
    outs: dict[str, np.ndarray] = {}
    for start in range(0, steps, n):
        if cancelled.is_set():
            raise _Cancelled
        stop = min(steps, start + n)
        for name in data:
            part[name] = np.ascontiguousarray(feeds[name][:, start:stop])
        outs = runtime.run(part)
        for name in timed:
            piece = outs[name]
            whole = result.get(name)
            if whole is None:
                whole = result[name] = np.empty((piece.shape[0], steps, *piece.shape[2:]), piece.dtype)
            whole[:, start:stop] = piece
        for st in spec.states:
            part["state_in_" + st.name] = outs["state_out_" + st.name]
    for t in spec.outputs:
        if t.name not in timed:
            result[t.name] = outs[t.name]
    return {t.name: result[t.name] for t in spec.outputs}


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's niceness by `nice` (Linux: per thread; elsewhere nothing).

    The burst executor's thread runs with it, so that on a busy CPU the event loop and the per-step batches
    preempt a long request's slices instead of sharing the core with them equally. ONNX Runtime runs a
    session with one intra-op thread in the calling thread, so the slices' compute inherits it.
    """
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:  # not allowed here (a seccomp profile): run at the normal priority
        _log.warning("could not lower the burst thread's CPU priority: %s", exc)


_TRIM_DELAY_S = 1.0  # after the response (and its buffers) is gone
_trim_pending = False


def _trim_soon(loop: asyncio.AbstractEventLoop, executor: Executor) -> None:
    """Trim once, shortly after a large request, when its response buffers have been sent and freed."""
    global _trim_pending
    if _trim_pending or _MALLOC_TRIM is None:
        return
    _trim_pending = True

    def run() -> None:
        global _trim_pending
        _trim_pending = False
        executor.submit(trim_memory)

    loop.call_later(_TRIM_DELAY_S, run)


def _libc():  # type: ignore[no-untyped-def]
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None
    return lib


_LIBC = _libc()
_MALLOC_TRIM = _LIBC.malloc_trim if _LIBC is not None else None
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 * 1024


def tune_allocator() -> None:
    """Serve large buffers (a burst's inputs, outputs, messages) from mmap, so freeing them returns them.

    glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), after which such
    blocks come from the heap and stay in the process after a burst. A fixed threshold turns that off.
    """
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def trim_memory() -> None:
    """Give freed heap memory back to the OS: `malloc_trim(0)` (glibc; a no-op elsewhere)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class ByteBudget:
    """A byte-counting semaphore: `take(n)` waits until `n` more bytes fit under the limit (or none held)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    async def take(self, n: int) -> None:
        """Wait for room for `n` bytes, then hold them."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    async def give(self, n: int) -> None:
        """Return `n` held bytes."""
        async with self._changed:
            self.used -= n
            self._changed.notify_all()
