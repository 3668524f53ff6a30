"""Closed-loop load generator: N concurrent bidi streams spread over several client processes.

Each stream sends one message, waits for its answer, and sends the next (closed loop, as a device streaming
sensor steps would). Streams are spread over ``workers`` client processes because on a 2-core machine one
Python client process saturates before the server does; every process reports its own CPU time so the report
can show how much of the machine the clients took.

Timing: all workers open their streams first, then meet at a barrier; the measurement window is
``[release + warmup, release + warmup + duration]`` on ``time.monotonic()`` (system-wide on Linux, so the
parent samples server CPU and metrics over the same window). Only round trips that *complete* inside the
window count.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier

import numpy as np
import psutil

from tests.bench.drivers import Driver, make_driver


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to run: picklable, sent to every worker process."""

    target: str  # a driver name (see drivers.make_driver)
    address: str  # host:port
    streams: int  # concurrent streams in total
    workers: int  # client processes
    warmup_s: float
    duration_s: float
    steps_per_message: int = 1  # T of every chunk
    request_bytes: int = 0  # echo: request payload size
    model: str = ""  # service: model name
    input_name: str = "x"  # service: the model's data input
    input_dtype: str = "float32"
    input_tail: tuple[int, ...] = (32,)  # the input's dims after (batch, time)
    sessions_per_message: int = 1  # StreamMany: sessions multiplexed in one message
    channels_per_worker: int = 1
    rate_per_s: float = (
        0.0  # > 0: paced (open-loop per stream) at this many messages/s in total; 0: closed loop
    )


@dataclass(slots=True)
class WorkerResult:
    """One worker's measurements over the window."""

    messages: int
    latencies_s: np.ndarray
    cpu_s: float
    errors: int = 0
    first_error: str = ""


@dataclass(slots=True)
class LoadResult:
    """The aggregate over all workers, plus what the parent sampled during the window."""

    spec: LoadSpec
    messages_per_s: float
    steps_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    client_cpu_cores: float  # CPU seconds of all client processes / window seconds
    server_cpu_cores: float
    errors: int
    first_error: str
    extra: dict[str, float] = field(default_factory=dict)


async def _stream_loop(
    driver: Driver, t0: float, t1: float, lat: list[float], counters: list[int], interval: float, phase: float
) -> None:
    """Run round trips until the window closes; record those that complete inside it.

    With ``interval > 0`` the stream sends on a fixed schedule (latency counts from the scheduled time, so a
    late answer delays the next send and is charged to it: no coordinated omission); otherwise back to back.
    """
    due = time.monotonic() + phase
    while True:
        if interval > 0:
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            start = due
            due += interval
        else:
            start = time.monotonic()
        if start >= t1:
            return
        await driver.step()
        end = time.monotonic()
        if t0 <= end <= t1:
            lat.append(end - start)
            counters[0] += 1


async def _worker_main(spec: LoadSpec, n_streams: int, barrier: Barrier) -> WorkerResult:
    import grpc  # imported in the child so the parent never holds a grpc runtime across fork

    channels = [
        grpc.aio.insecure_channel(spec.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, spec.channels_per_worker))
    ]
    drivers = [make_driver(spec, channels[i % len(channels)]) for i in range(n_streams)]
    errors, first_error = 0, ""
    try:
        # Open in modest groups: hundreds of simultaneous session creations would only measure the queue.
        for i in range(0, len(drivers), 32):
            await asyncio.gather(*(d.open() for d in drivers[i : i + 32]))
        # A few round trips per stream before the barrier, so lazy initialisation is not in the window.
        for d in drivers:
            await d.step()
        await asyncio.to_thread(barrier.wait)
        released = time.monotonic()
        t0, t1 = released + spec.warmup_s, released + spec.warmup_s + spec.duration_s
        proc = psutil.Process()
        lat: list[float] = []
        counters = [0]
        cpu_marks: list[float] = []

        async def sample_cpu() -> None:
            for mark in (t0, t1):
                await asyncio.sleep(max(0.0, mark - time.monotonic()))
                ct = proc.cpu_times()
                cpu_marks.append(ct.user + ct.system)

        interval = spec.streams / spec.rate_per_s if spec.rate_per_s > 0 else 0.0
        phases = (
            np.random.default_rng(os.getpid()).uniform(0, interval, len(drivers))
            if interval
            else [0.0] * len(drivers)
        )
        results = await asyncio.gather(
            sample_cpu(),
            *(
                _stream_loop(d, t0, t1, lat, counters, interval, float(ph))
                for d, ph in zip(drivers, phases, strict=True)
            ),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                errors += 1
                first_error = first_error or "".join(traceback.format_exception_only(r)).strip()
        cpu = cpu_marks[1] - cpu_marks[0] if len(cpu_marks) == 2 else float("nan")
        return WorkerResult(counters[0], np.asarray(lat, dtype=np.float64), cpu, errors, first_error)
    finally:
        await asyncio.gather(*(d.close() for d in drivers), return_exceptions=True)
        for ch in channels:
            await ch.close()


def _worker_entry(spec: LoadSpec, n_streams: int, barrier: Barrier, out: mp.Queue) -> None:  # type: ignore[type-arg]
    try:
        out.put(asyncio.run(_worker_main(spec, n_streams, barrier)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the scenario loudly
        barrier.abort()
        out.put(WorkerResult(0, np.zeros(0), 0.0, 1, "".join(traceback.format_exception(exc))[-2000:]))


def _collect(out: mp.Queue, procs: list) -> list[WorkerResult]:  # type: ignore[type-arg]
    """Gather one result per worker; a worker that died without reporting counts as a failed worker."""
    import queue

    results: list[WorkerResult] = []
    deadline = time.monotonic() + 120
    while len(results) < len(procs) and time.monotonic() < deadline:
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and out.empty():
                break
    for _ in range(len(procs) - len(results)):
        results.append(WorkerResult(0, np.zeros(0), 0.0, 1, "worker process died without a result"))
    return results


class _ServerCpu:
    """CPU seconds of a server process and its workers (`--workers N`: a supervisor and N children)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.procs: list[psutil.Process] = []

    def seconds(self) -> float:
        """User + system seconds so far of the server and the children it had at the first reading."""
        if not self.procs:
            self.procs = [self.root, *self.root.children(recursive=True)]
        total = 0.0
        for proc in self.procs:
            try:
                ct = proc.cpu_times()
            except psutil.Error:
                continue
            total += ct.user + ct.system
        return total


def _split(total: int, parts: int) -> list[int]:
    base, rest = divmod(total, parts)
    return [base + (1 if i < rest else 0) for i in range(parts)]


def run_load(
    spec: LoadSpec,
    server_pid: int,
    on_window: Callable[[str], None] | None = None,
) -> LoadResult:
    """Run ``spec`` against a server whose process is ``server_pid``; return aggregated measurements.

    ``on_window("start"|"end")`` is called at the window edges (the caller scrapes server metrics there).
    """
    ctx = mp.get_context("spawn")
    workers = max(1, min(spec.workers, spec.streams))
    barrier = ctx.Barrier(workers + 1)
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [
        ctx.Process(target=_worker_entry, args=(spec, n, barrier, out), daemon=True)
        for n in _split(spec.streams, workers)
    ]
    for p in procs:
        p.start()
    server = _ServerCpu(server_pid)
    try:
        barrier.wait(timeout=120 + spec.streams * 0.05)
    except Exception:  # noqa: BLE001 - a worker failed to open its streams; its result says why
        pass
    released = time.monotonic()
    t0, t1 = released + spec.warmup_s, released + spec.warmup_s + spec.duration_s
    time.sleep(max(0.0, t0 - time.monotonic()))
    c0 = server.seconds()
    if on_window:
        on_window("start")
    time.sleep(max(0.0, t1 - time.monotonic()))
    c1 = server.seconds()
    if on_window:
        on_window("end")
    results = _collect(out, procs)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    lat = np.concatenate([r.latencies_s for r in results]) if results else np.zeros(0)
    messages = sum(r.messages for r in results)
    dur = spec.duration_s
    pct = np.percentile(lat, [50, 95, 99]) * 1e3 if lat.size else np.full(3, np.nan)
    errors = sum(r.errors for r in results)
    first_error = next((r.first_error for r in results if r.first_error), "")
    return LoadResult(
        spec=spec,
        messages_per_s=messages / dur,
        steps_per_s=messages * spec.steps_per_message * spec.sessions_per_message / dur,
        p50_ms=float(pct[0]),
        p95_ms=float(pct[1]),
        p99_ms=float(pct[2]),
        mean_ms=float(lat.mean() * 1e3) if lat.size else float("nan"),
        client_cpu_cores=sum(r.cpu_s for r in results) / dur,
        server_cpu_cores=(c1 - c0) / dur,
        errors=errors,
        first_error=first_error,
    )


def cpu_count() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0))
